"""The DPO objective, in the shape of the DPO authors' reference `trainers.py`.

Rafailov et al. 2023, eq. 7:
    L = -log sigmoid( beta * [ (log pi(yw|x) - log ref(yw|x)) - (log pi(yl|x) - log ref(yl|x)) ] )
and the implicit reward of a completion is r(x, y) = beta * (log pi(y|x) - log ref(y|x)).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from flywheel.config import LOSS_TYPES
from storage.records import PreferenceTriple


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example losses and the chosen and rejected implicit rewards, all `(batch,)`.

    With h = (log pi(yw) - log pi(yl)) - (log ref(yw) - log ref(yl)) and eps = label_smoothing:
      sigmoid  -(1 - eps) log s(beta h) - eps log s(-beta h)   Rafailov et al. 2023, eq. 7;
               eps > 0 is conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences")
      robust   ((1 - eps)(-log s(beta h)) + eps log s(-beta h)) / (1 - 2 eps)
               Chowdhury et al. 2024, "Provably robust DPO", eq. 8 (unbiased under label flips)
      hinge    max(0, 1 - beta h)                           Liu et al. 2023 (RSO), eq. 8
      ipo      (h - 1 / (2 beta))^2                          Azar et al. 2023 (IPO), eq. 17
    Given the completions' token counts, IPO divides each log-ratio by its length first, as
    the IPO authors' results and TRL do (the squared loss would otherwise grow with length).
    The implicit rewards are beta * (log pi - log ref) of the log-probs given, whatever the loss.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    logits = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * logits)
                  - label_smoothing * F.logsigmoid(-beta * logits))
    elif loss_type == "robust":
        losses = ((1 - label_smoothing) * -F.logsigmoid(beta * logits)
                  + label_smoothing * F.logsigmoid(-beta * logits)) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        if chosen_lengths is not None and rejected_lengths is not None:
            logits = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (logits - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over completion tokens only, `(batch,)`.

    Logits at position t predict token t+1, so labels are the inputs shifted left; the
    mask (1 on completion tokens, 0 on prompt and padding) is shifted the same way.
    Divided by `completion_lengths` it is the length-normalised log-prob (the reference
    code's `average_log_prob`).
    """
    logits = logits[:, :-1, :]
    labels = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(logits.dtype)
    token_logps = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
    return (token_logps * mask).sum(-1)


def collate_concatenated(triples: Sequence[PreferenceTriple], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one right-padded batch of `2 * len(triples)`.

    The completion mask comes from the stored token ids (prompt length is known exactly),
    never from re-tokenising text, as in TRL's preference collator.
    """
    return collate_sequences(
        [(t.prompt_token_ids, t.chosen_token_ids) for t in triples]
        + [(t.prompt_token_ids, t.rejected_token_ids) for t in triples],
        pad_token_id,
    )


def collate_sequences(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """(prompt ids, completion ids) rows, right-padded, with a mask of completion tokens."""
    rows = [list(prompt) + list(completion) for prompt, completion in sequences]
    masks = [[0] * len(prompt) + [1] * len(completion) for prompt, completion in sequences]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, mask) in enumerate(zip(rows, masks)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        completion_mask[i, : len(row)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def chosen_nll(chosen_logps: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token negative log-likelihood of each chosen completion, `(batch,)`."""
    half = batch["input_ids"].shape[0] // 2
    chosen_tokens = batch["completion_mask"][:half, 1:].sum(-1).clamp(min=1)
    return -chosen_logps / chosen_tokens


def completion_lengths(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion token counts of the chosen and rejected rows, `(batch,)` each (at least 1)."""
    lengths = batch["completion_mask"].sum(-1).clamp(min=1)
    half = lengths.shape[0] // 2
    return lengths[:half], lengths[half:]


def concatenated_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over chosen+rejected; returns (chosen_logps, rejected_logps), summed."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = sequence_logps(logits.float(), batch["input_ids"], batch["completion_mask"])
    half = batch["input_ids"].shape[0] // 2
    return logps[:half], logps[half:]
