"""DPO training against a frozen reference, in three parts as a torchtune recipe:
`setup_training` (models, LoRA, optimiser, batch schedule), `training_loop` (written out
top to bottom) and `save_trained_policy`; `train_dpo` runs the three.

The reference's log-probs are computed once per completion and cached in the store
(`reference_logps_for`), so training holds only the policy in memory (and, with
`train.keep_reference_loaded`, the flywheel keeps the reference loaded between rounds).
Every pass runs on the trainer's device (`trainer_device`: the first GPU, else the CPU)
in the policy's precision (`logps_precision`), and hands its cached memory back when it ends.
"""

from __future__ import annotations

import gc
import math
import random
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from tqdm import tqdm

from flywheel.checkpoints import save_checkpoint
from flywheel.config import TrainConfig
from flywheel.dpo import (
    chosen_nll,
    collate_concatenated,
    collate_sequences,
    completion_lengths,
    concatenated_logps,
    dpo_loss,
    sequence_logps,
)
from storage import tables
from storage.records import Checkpoint, Completion, PreferenceTriple, StepMetrics
from storage.store import Store

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class ReferenceLogps:
    """The frozen reference's log-probs (sums over completion tokens) of each triple's
    chosen and rejected completion, in triple order, `(len(triples),)` each."""

    chosen: torch.Tensor
    rejected: torch.Tensor


@dataclass(frozen=True)
class TrainingSetup:
    """What `training_loop` steps and `save_trained_policy` saves, from `setup_training`."""

    accelerator: Accelerator
    tokenizer: PreTrainedTokenizerBase
    policy: torch.nn.Module  # wrapped in a PeftModel under LoRA
    # The cached log-probs, or the live reference model (frozen, eval mode).
    reference: ReferenceLogps | torch.nn.Module
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    batches: list[list[int]]  # the triples' indices of each optimiser step (`batch_schedule`)
    compute_dtype: torch.dtype  # autocast's, when not float32 (`train_dtype`)


def train_dpo(
    policy_path: Path,
    reference: Path | ReferenceLogps,
    triples: Sequence[PreferenceTriple],
    config: TrainConfig,
    output_dir: Path,
    seed: int,
) -> list[StepMetrics]:
    """Train a copy of the policy on the triples; save it to `output_dir`; return per-step metrics.

    Given `ReferenceLogps` (cached, see `reference_logps_for`), only the policy is ever
    loaded. Given the reference checkpoint's path, the reference runs beside the policy on
    every micro-batch: the live path, which holds both models.

    Under `accelerate launch` (see `flywheel.train_job`) every process runs this same
    function: each takes its share of every batch, and the gradients are summed across
    processes before the step, so N processes take exactly the steps one process would.
    """
    setup = setup_training(policy_path, reference, len(triples), config, seed)
    metrics = training_loop(setup, triples, config)
    save_trained_policy(setup, config, output_dir)
    del setup
    free_accelerator_memory()  # for the passes and the sampler that come next
    return metrics


def train_dtype(config: TrainConfig) -> torch.dtype:
    """The trainer's precision (`train.dtype`): auto is bfloat16 on CUDA, float32 elsewhere
    (a CPU has no bfloat16 speed to gain, and float32 keeps CPU runs exact)."""
    if config.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, config.dtype)


def trainer_device() -> torch.device:
    """Where the flywheel's own log-prob passes run (the reference's, the KL's, the
    sampler check's): the GPU training uses, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def free_accelerator_memory() -> None:
    """Return the allocator's cached blocks to the GPU after a pass, so that the next pass
    or the woken sampler finds them free (no-op on CPU, where memory goes back as the last
    reference to a tensor does). The collection first frees tensors held only in cycles."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def logps_precision(config: TrainConfig) -> tuple[torch.dtype, torch.dtype]:
    """(weights, autocast) dtypes for the log-prob passes (reference, KL, sampler check):
    those the policy trains with, so that at step 0 the policy's log-probs and the cached
    reference's are computed alike. Float32 weights for full fine-tuning (the policy's
    are float32), `train.dtype` for LoRA (its base is); autocast in `train.dtype`."""
    compute = train_dtype(config)
    return (compute if config.lora_rank > 0 else torch.float32), compute


def setup_training(
    policy_path: Path, reference: Path | ReferenceLogps, num_triples: int, config: TrainConfig, seed: int,
) -> TrainingSetup:
    """Load the policy (LoRA-wrapped if `config.lora_rank`) and, given a path, the live
    reference; the AdamW optimiser over the trainable parameters; the batch schedule.

    Precision: the weights that train, and so their gradients and AdamW states, are
    float32 whatever `train.dtype`. DPO's learning rates (1e-7 to 1e-5) move a weight by
    far less than bfloat16 can resolve (2^-8 of the weight), so bfloat16 weights would
    round most updates away. Weights that do not train need no such headroom: with LoRA
    the policy's base and the live reference load in `train.dtype` (bfloat16 on a GPU)
    and only the adapters are float32 (peft's `autocast_adapter_dtype`), which is what
    fits a 7B policy on one 80 GB card (docs/gpu.md). The forward passes run under
    autocast in `train.dtype`; the log-prob sums are float32 (`concatenated_logps`).
    """
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    compute_dtype = train_dtype(config)
    torch.manual_seed(seed)  # before LoRA draws its A matrices
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    weights_dtype = compute_dtype if config.lora_rank > 0 else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=weights_dtype).to(accelerator.device)
    if not isinstance(reference, ReferenceLogps):
        reference = AutoModelForCausalLM.from_pretrained(reference, dtype=compute_dtype).to(accelerator.device)
        reference.eval().requires_grad_(False)
    if config.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        # LoRA's B matrices start at zero, so the policy starts exactly at its base weights.
        policy = get_peft_model(policy, LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                                   lora_dropout=0.0, target_modules="all-linear"),
                                autocast_adapter_dtype=True)
    # Dropout would make the policy's log-probs differ from the reference's at step 0.
    policy.eval()
    if config.gradient_checkpointing:
        # transformers checkpoints only in training mode; with every dropout off, training
        # mode computes exactly what eval mode does (as TRL's disable_dropout).
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        _disable_dropout(policy)
        policy.train()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    # Its own generator, seeded alike in every process: the same shuffles in all of them.
    batches = batch_schedule(num_triples, config, random.Random(seed))
    return TrainingSetup(accelerator, tokenizer, policy, reference, trainable, optimizer, batches, compute_dtype)


def training_loop(setup: TrainingSetup, triples: Sequence[PreferenceTriple], config: TrainConfig) -> list[StepMetrics]:
    """Take the optimiser steps of `setup.batches` over the triples; each step's metrics.

    Each step minimises the batch mean of the configured DPO loss (`dpo_loss`; sigmoid is
    Rafailov et al. 2023, eq. 7) plus `nll_weight` times the chosen completions' per-token
    NLL (Pang et al. 2024, eq. 1), with the learning rate of `learning_rate_at`.
    """
    accelerator, policy, reference = setup.accelerator, setup.policy, setup.reference
    optimizer, trainable, batches = setup.optimizer, setup.trainable, setup.batches
    rank, world = accelerator.process_index, accelerator.num_processes
    autocast = torch.autocast(accelerator.device.type, dtype=setup.compute_dtype,
                              enabled=setup.compute_dtype != torch.float32)
    total_steps = len(batches)
    metrics: list[StepMetrics] = []
    # One bar, in the main process; None: shown only on a terminal.
    bar = tqdm(total=total_steps, desc="DPO training", unit="step", disable=None if rank == 0 else True)
    for step, indices in enumerate(batches, start=1):
        learning_rate = learning_rate_at(step, total_steps, config)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        started = time.perf_counter()
        # This process's share, in micro-batches. Each adds its part of the batch mean,
        # so the gradients summed over micro-batches and processes are the full batch's.
        share = indices[rank::world]
        micro_size = max(math.ceil(len(share) / config.gradient_accumulation_steps), 1)
        # loss, chosen reward, rejected reward, correctly ranked pairs, tokens
        totals = torch.zeros(5, dtype=torch.float64)
        for micro_start in range(0, len(share), micro_size):
            micro = share[micro_start : micro_start + micro_size]
            batch = {k: v.to(accelerator.device) for k, v in
                     collate_concatenated([triples[i] for i in micro], setup.tokenizer.pad_token_id).items()}
            # One forward pass over the chosen and rejected rows together.
            with autocast:
                policy_chosen, policy_rejected = concatenated_logps(policy, batch)
            if isinstance(reference, ReferenceLogps):
                reference_chosen = reference.chosen[micro].to(accelerator.device)
                reference_rejected = reference.rejected[micro].to(accelerator.device)
            else:
                with torch.no_grad():
                    reference_chosen, reference_rejected = concatenated_logps(reference, batch)
            chosen_lengths, rejected_lengths = completion_lengths(batch)
            nll = chosen_nll(policy_chosen, batch)
            lengths = (chosen_lengths, rejected_lengths)  # IPO's per-token log-ratios
            if config.length_normalised:
                policy_chosen, reference_chosen = policy_chosen / chosen_lengths, reference_chosen / chosen_lengths
                policy_rejected = policy_rejected / rejected_lengths
                reference_rejected = reference_rejected / rejected_lengths
                lengths = (None, None)  # already per token
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                config.beta, config.loss_type, config.label_smoothing, *lengths,
            )
            objective = losses.sum()
            if config.nll_weight > 0:
                objective = objective + config.nll_weight * nll.sum()
            (objective / len(indices)).backward()
            totals += torch.tensor([losses.sum().item(), chosen_rewards.sum().item(),
                                    rejected_rewards.sum().item(),
                                    (chosen_rewards > rejected_rewards).sum().item(),
                                    batch["attention_mask"].sum().item()], dtype=torch.float64)
        if world > 1:
            for parameter in trainable:
                if parameter.grad is None:  # a process whose share was empty
                    parameter.grad = torch.zeros_like(parameter)
                parameter.grad = accelerator.reduce(parameter.grad, reduction="sum")
            totals = accelerator.reduce(totals, reduction="sum")
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        loss_sum, chosen_sum, rejected_sum, correct, tokens = totals.tolist()
        metrics.append(StepMetrics(
            step=step,
            loss=loss_sum / len(indices),  # the DPO part, comparable with log 2 at step 1
            chosen_reward=chosen_sum / len(indices),
            rejected_reward=rejected_sum / len(indices),
            reward_margin=(chosen_sum - rejected_sum) / len(indices),
            accuracy=correct / len(indices),
            grad_norm=grad_norm.item(),
            learning_rate=learning_rate,
            num_pairs=len(indices),
            tokens_per_second=tokens / elapsed,
            seconds=elapsed,
            pair_ids=tuple(triples[i].pair_id for i in indices),
        ))
        bar.set_postfix(loss=f"{metrics[-1].loss:.4f}", refresh=False)
        bar.update(1)
    bar.close()
    return metrics


def save_trained_policy(setup: TrainingSetup, config: TrainConfig, output_dir: Path) -> None:
    """Save the trained policy and its tokenizer to `output_dir` (from the main process),
    with any LoRA adapters merged in: a plain checkpoint, no adapter files to serve. It is
    saved in float32 whatever its parent's dtype: a bfloat16 copy would round away most
    of a round's updates, the reason the trained weights are float32 (`setup_training`).
    vLLM's `sample.dtype: auto` still samples a float32 checkpoint in bfloat16 on a GPU."""
    # LoRA merges its float32 adapters into a float32 copy of the base: exact.
    policy = setup.policy.to(torch.float32)
    policy = policy.merge_and_unload() if config.lora_rank > 0 else policy
    if setup.accelerator.is_main_process:
        save_checkpoint(policy, setup.tokenizer, output_dir)
    setup.accelerator.wait_for_everyone()


def batch_schedule(num_triples: int, config: TrainConfig, rng: random.Random) -> list[list[int]]:
    """The triples' indices for each optimiser step, in a fresh shuffle each pass.

    `config.epochs` passes of `batch_size` (each pass ends with what is left), or with
    `config.steps_per_round` exactly that many steps of `batch_size` triples each (all of
    them, if fewer): each pass is cut into whole batches and its remainder waits for a
    later pass, so every step weighs the same whatever the number of preferences.
    """
    if num_triples == 0:
        return []
    fixed_steps = config.steps_per_round is not None
    size = min(config.batch_size, num_triples)
    # Where a pass's batches start: whole batches only with fixed steps, else the remainder too.
    starts = range(0, num_triples - size + 1 if fixed_steps else num_triples, size)
    total = config.steps_per_round if fixed_steps else config.epochs * len(starts)
    order = list(range(num_triples))
    batches: list[list[int]] = []
    while len(batches) < total:
        rng.shuffle(order)
        batches.extend(order[start : start + size] for start in starts)
    return batches[:total]


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, name):  # dropout applied functionally from the config
            setattr(model.config, name, 0.0)


class KeptModel:
    """A checkpoint's model for log-prob passes, loaded at the first call and kept for the
    next ones while they ask for the same checkpoint: DPO's frozen reference, which every
    round otherwise loads twice (its log-probs for training and for the KL at evaluation).
    A checkpoint whose files changed since (another save at the same path) is loaded
    again. Holds the model's memory until `release()` or a call for another checkpoint."""

    def __init__(self, precision: tuple[torch.dtype, torch.dtype] = (torch.float32, torch.float32)) -> None:
        self.precision = precision  # (weights, autocast): `logps_precision`
        self._files: tuple | None = None
        self._loaded: tuple[torch.nn.Module, int | None] | None = None

    def get(self, checkpoint_path: Path) -> tuple[torch.nn.Module, int | None]:
        """(the model, in eval mode, the tokenizer's pad token id)."""
        files = _checkpoint_files(checkpoint_path)
        if self._loaded is None or files != self._files:
            self.release()
            self._loaded, self._files = _load_for_logps(checkpoint_path, self.precision[0]), files
        return self._loaded

    def release(self) -> None:
        self._loaded = self._files = None
        free_accelerator_memory()


def _checkpoint_files(checkpoint_path: Path) -> tuple:
    """What identifies a checkpoint's files: its resolved path, and the inode, size,
    modification and change time of each file in it (a save renames a new directory into
    place; a copy over the files in place that keeps their times still changes ctime)."""
    directory = Path(checkpoint_path).resolve()
    files = []
    for entry in sorted(directory.iterdir()):
        status = entry.stat()
        if stat.S_ISREG(status.st_mode):
            files.append((entry.name, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns))
    return str(directory), tuple(files)


def _load_for_logps(checkpoint_path: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, int | None]:
    """A checkpoint's model in `dtype` on the trainer's device, frozen, for log-prob passes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pad_token_id = AutoTokenizer.from_pretrained(checkpoint_path).pad_token_id
    model = AutoModelForCausalLM.from_pretrained(checkpoint_path, dtype=dtype).to(trainer_device())
    return model.eval().requires_grad_(False), pad_token_id


@torch.no_grad()
def completion_logps(
    checkpoint_path: Path, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int,
    kept: KeptModel | None = None, precision: tuple[torch.dtype, torch.dtype] = (torch.float32, torch.float32),
) -> list[float]:
    """A checkpoint's log-prob (sum over completion tokens) of each (prompt ids,
    completion ids), in micro-batches of `batch_size` on the trainer's device. For DPO's
    reference, and for the KL of a candidate to it. The model is loaded with `precision`'s
    weights dtype for this call and freed on return, or taken from (and left in) `kept`,
    which has its own; the forward runs under autocast in `precision`'s second dtype."""
    if kept is not None:
        precision = kept.precision
    model, pad_token_id = kept.get(checkpoint_path) if kept is not None else _load_for_logps(checkpoint_path,
                                                                                             precision[0])
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=precision[1], enabled=precision[1] != torch.float32)
    logps: list[float] = []
    with tqdm(total=len(sequences), desc=f"log-probs under {Path(checkpoint_path).name}", unit="completion", leave=False,
              disable=not sequences) as bar:
        for start in range(0, len(sequences), batch_size):
            batch = {k: v.to(device) for k, v in
                     collate_sequences(sequences[start : start + batch_size], pad_token_id).items()}
            with autocast:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logps.extend(sequence_logps(logits.float(), batch["input_ids"], batch["completion_mask"]).tolist())
            bar.update(len(batch["input_ids"]))
            del logits, batch  # before the next micro-batch's, and before the cache is emptied
    del model
    free_accelerator_memory()  # a kept model stays; the last micro-batch's blocks go back
    return logps


def sampler_logprob_gap(checkpoint_path: Path, completions: Sequence[Completion], batch_size: int,
                        kept: KeptModel | None = None,
                        precision: tuple[torch.dtype, torch.dtype] = (torch.float32, torch.float32)) -> float | None:
    """How far the sampler's log-probs of `completions` are from the trainer's under
    `checkpoint_path`: the mean of |log p_vLLM(y|x) - log p_trainer(y|x)| / len(y), in nats
    per token; None when no completion carries vLLM's log-prob. Both read the raw logits
    (vLLM's default `logprobs_mode`), so the sampling temperature does not enter. Near 0
    when vLLM holds this checkpoint's weights; stale weights (a missed reload) show at once."""
    checked = [c for c in completions if c.cumulative_logprob is not None and len(c.token_ids) > 0]
    if not checked:
        return None
    trainer = completion_logps(checkpoint_path, [(c.prompt_token_ids, c.token_ids) for c in checked], batch_size,
                               kept, precision)
    return sum(abs(c.cumulative_logprob - t) / len(c.token_ids) for c, t in zip(checked, trainer)) / len(checked)


def reference_logps_for(
    store: Store, triples: Sequence[PreferenceTriple], reference: Checkpoint, batch_size: int,
    kept: KeptModel | None = None, precision: tuple[torch.dtype, torch.dtype] = (torch.float32, torch.float32),
) -> ReferenceLogps:
    """The reference's log-probs of the triples' completions, from the store's cache; those
    not cached for this reference yet are computed (loading it, or from `kept`) and stored first."""
    sequences: dict[int, tuple[list[int], list[int]]] = {}
    for t in triples:
        sequences[t.chosen_completion_id] = (t.prompt_token_ids, t.chosen_token_ids)
        sequences[t.rejected_completion_id] = (t.prompt_token_ids, t.rejected_token_ids)
    cached = store.read(tables.reference_logps, reference.checkpoint_id, list(sequences))
    missing = [completion_id for completion_id in sequences if completion_id not in cached]
    if missing:
        computed = dict(zip(missing, completion_logps(
            Path(reference.path), [sequences[c] for c in missing], batch_size, kept, precision)))
        with store.transaction() as tx:
            tables.add_reference_logps(tx, reference.checkpoint_id, computed)
        cached.update(computed)
    return ReferenceLogps(
        chosen=torch.tensor([cached[t.chosen_completion_id] for t in triples], dtype=torch.float32),
        rejected=torch.tensor([cached[t.rejected_completion_id] for t in triples], dtype=torch.float32),
    )


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
