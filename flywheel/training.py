"""DPO training against a frozen reference, the loop written out top to bottom."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import torch

from flywheel.checkpoints import save_checkpoint
from flywheel.config import TrainConfig
from flywheel.dpo import chosen_nll, collate_concatenated, concatenated_logps, dpo_loss
from storage.records import PreferenceTriple, StepMetrics


def train_dpo(
    policy_path: Path,
    reference_path: Path,
    triples: Sequence[PreferenceTriple],
    config: TrainConfig,
    output_dir: Path,
    seed: int,
) -> list[StepMetrics]:
    """Train a copy of the policy on the triples; save it to `output_dir`; return per-step metrics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(reference_path, dtype=torch.float32)
    reference.eval().requires_grad_(False)
    # Dropout would make the policy's log-probs differ from the reference's at step 0.
    policy.eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.learning_rate, weight_decay=0.0)
    # The reference is frozen: its log-probs are computed once per triple, not every epoch.
    reference_chosen_all, reference_rejected_all = _reference_logps(reference, triples, config, tokenizer.pad_token_id)
    del reference

    order = list(range(len(triples)))
    rng = random.Random(seed)
    metrics: list[StepMetrics] = []
    step = 0
    for _ in range(config.epochs):
        rng.shuffle(order)
        for start in range(0, len(order), config.batch_size):
            indices = order[start : start + config.batch_size]
            batch_triples = [triples[i] for i in indices]
            batch = collate_concatenated(batch_triples, tokenizer.pad_token_id)
            reference_chosen, reference_rejected = reference_chosen_all[indices], reference_rejected_all[indices]
            policy_chosen, policy_rejected = concatenated_logps(policy, batch, config.length_normalised)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                policy_chosen, policy_rejected, reference_chosen, reference_rejected, config.beta,
                config.loss_type, config.label_smoothing,
            )
            loss = losses.mean()
            objective = loss
            if config.nll_weight > 0:
                # Length-normalised log-probs are already per token.
                nll = -policy_chosen if config.length_normalised else chosen_nll(policy_chosen, batch)
                objective = loss + config.nll_weight * nll.mean()
            objective.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            metrics.append(StepMetrics(
                step=step,
                loss=loss.item(),  # the DPO part, comparable with log 2 at step 1
                chosen_reward=chosen_rewards.mean().item(),
                rejected_reward=rejected_rewards.mean().item(),
                reward_margin=(chosen_rewards - rejected_rewards).mean().item(),
                accuracy=(chosen_rewards > rejected_rewards).float().mean().item(),
                grad_norm=grad_norm.item(),
                learning_rate=config.learning_rate,
                num_pairs=len(batch_triples),
            ))
    save_checkpoint(policy, tokenizer, output_dir)
    return metrics


@torch.no_grad()
def _reference_logps(
    reference: torch.nn.Module, triples: Sequence[PreferenceTriple], config: TrainConfig, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) reference log-probs of every triple, in triple order, `(len(triples),)`."""
    chosen, rejected = [], []
    for start in range(0, len(triples), config.batch_size):
        batch = collate_concatenated(triples[start : start + config.batch_size], pad_token_id)
        batch_chosen, batch_rejected = concatenated_logps(reference, batch, config.length_normalised)
        chosen.append(batch_chosen)
        rejected.append(batch_rejected)
    return torch.cat(chosen), torch.cat(rejected)
