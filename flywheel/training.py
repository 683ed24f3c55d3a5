"""DPO training against a frozen reference, the loop written out top to bottom."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Sequence

import torch

from flywheel.checkpoints import save_checkpoint
from flywheel.config import TrainConfig
from flywheel.dpo import chosen_nll, collate_concatenated, completion_lengths, concatenated_logps, dpo_loss
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
    total_steps = config.epochs * math.ceil(len(triples) / config.batch_size)
    metrics: list[StepMetrics] = []
    step = 0
    for _ in range(config.epochs):
        rng.shuffle(order)
        for start in range(0, len(order), config.batch_size):
            indices = order[start : start + config.batch_size]
            step += 1
            learning_rate = learning_rate_at(step, total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
            started = time.perf_counter()
            # Each micro-batch adds its share of the batch mean, so the summed gradient is
            # exactly the full batch's whatever the number of micro-batches.
            micro_size = math.ceil(len(indices) / config.gradient_accumulation_steps)
            loss_sum, tokens, chosen_rewards, rejected_rewards = 0.0, 0, [], []
            for micro_start in range(0, len(indices), micro_size):
                micro = indices[micro_start : micro_start + micro_size]
                batch = collate_concatenated([triples[i] for i in micro], tokenizer.pad_token_id)
                policy_chosen, policy_rejected = concatenated_logps(policy, batch, config.length_normalised)
                # Length-normalised log-probs are already per token; IPO otherwise divides by length.
                lengths = (None, None) if config.length_normalised else completion_lengths(batch)
                losses, micro_chosen, micro_rejected = dpo_loss(
                    policy_chosen, policy_rejected, reference_chosen_all[micro], reference_rejected_all[micro],
                    config.beta, config.loss_type, config.label_smoothing, *lengths,
                )
                objective = losses.sum()
                if config.nll_weight > 0:
                    # Length-normalised log-probs are already per token.
                    nll = -policy_chosen if config.length_normalised else chosen_nll(policy_chosen, batch)
                    objective = objective + config.nll_weight * nll.sum()
                (objective / len(indices)).backward()
                loss_sum += losses.sum().item()
                tokens += int(batch["attention_mask"].sum())
                chosen_rewards.append(micro_chosen)
                rejected_rewards.append(micro_rejected)
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
            chosen, rejected = torch.cat(chosen_rewards), torch.cat(rejected_rewards)
            metrics.append(StepMetrics(
                step=step,
                loss=loss_sum / len(indices),  # the DPO part, comparable with log 2 at step 1
                chosen_reward=chosen.mean().item(),
                rejected_reward=rejected.mean().item(),
                reward_margin=(chosen - rejected).mean().item(),
                accuracy=(chosen > rejected).float().mean().item(),
                grad_norm=grad_norm.item(),
                learning_rate=learning_rate,
                num_pairs=len(indices),
                tokens_per_second=tokens / elapsed,
            ))
    save_checkpoint(policy, tokenizer, output_dir)
    return metrics


def learning_rate_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """The learning rate of optimiser step `step` (1-based) of `total_steps`: linear warm-up
    to `config.learning_rate` over `warmup_steps`, then constant, linear or cosine decay
    that starts at the peak and would reach 0 one step after the last."""
    peak = config.learning_rate
    if step <= config.warmup_steps:
        return peak * step / config.warmup_steps
    if config.lr_schedule == "constant":
        return peak
    progress = (step - config.warmup_steps - 1) / max(total_steps - config.warmup_steps, 1)
    if config.lr_schedule == "linear":
        return peak * (1 - progress)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


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
