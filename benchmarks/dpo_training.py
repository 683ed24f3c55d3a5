"""DPO training benchmarks: peak memory (cached vs live reference) and throughput (ours vs TRL).

    .venv/bin/python benchmarks/dpo_training.py [--layers 8] [--hidden 512] [--steps 8]

Builds one Llama policy (random weights, the demo's character tokenizer) and one batch
shape, then prints ratios measured in this run:
- memory: peak tensor memory of a training run (torch.profiler's allocation events,
  summed in time order: weights, gradients, optimiser states, activations) with cached
  reference log-probs, over the live-reference path, each in a fresh process, on a larger
  model than the throughput one; for full fine-tuning, and for LoRA with gradient
  checkpointing;
- throughput: tokens per second of our DPO steps over TRL's DPOTrainer steps, on the same
  model, data, batch shape, beta and loss.
Targets (issue 5): memory ratio <= 0.60, throughput ratio >= 1.0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model(directory: Path, layers: int, hidden: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from flywheel.examples.addition import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                         num_key_value_heads=max(hidden // 64, 1), max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_data(model: Path, count: int, prompt_len: int, completion_len: int):
    """`count` random preference rows as text (for TRL) and as our token-id triples: a BOS
    prompt and EOS-ended completions, as TRL tokenises them (checked in tests/test_trl_peer.py)."""
    import random

    from transformers import AutoTokenizer

    from flywheel.examples.addition import ALPHABET
    from storage.records import PreferenceTriple

    tokenizer = AutoTokenizer.from_pretrained(model)
    rng = random.Random(0)
    text = lambda n: "".join(rng.choice(ALPHABET) for _ in range(n))  # noqa: E731
    rows = [{"prompt": text(prompt_len - 1), "chosen": text(completion_len - 1), "rejected": text(completion_len - 1)}
            for _ in range(count)]
    ids = lambda t: tokenizer(t, add_special_tokens=False).input_ids  # noqa: E731
    triples = [PreferenceTriple(i, [tokenizer.bos_token_id] + ids(r["prompt"]), ids(r["chosen"]) + [tokenizer.eos_token_id],
                                ids(r["rejected"]) + [tokenizer.eos_token_id], 2 * i + 1, 2 * i + 2)
               for i, r in enumerate(rows)]
    return rows, triples


def memory_child(model: Path, path_kind: str, steps: int, batch: int, prompt_len: int, completion_len: int,
                 lora_rank: int, gradient_checkpointing: bool) -> dict:
    """Runs in a fresh process: one training run on one path; reports its peak tensor memory."""
    import torch

    from flywheel.config import TrainConfig
    from flywheel.training import ReferenceLogps, train_dpo

    _, triples = make_data(model, batch * steps, prompt_len, completion_len)
    if path_kind == "cached":
        # What the flywheel does before training: in a separate process, so this one never
        # holds the reference (the store is the hand-over).
        sequences = [(t.prompt_token_ids, c) for t in triples for c in (t.chosen_token_ids, t.rejected_token_ids)]
        logps = json.loads(subprocess.run(
            [sys.executable, __file__, "--reference-logps", str(model)], input=json.dumps(sequences),
            capture_output=True, text=True, check=True).stdout)
        reference = ReferenceLogps(torch.tensor(logps[0::2]), torch.tensor(logps[1::2]))
    else:
        reference = model
    from torch.profiler import ProfilerActivity, profile

    config = TrainConfig(batch_size=batch, learning_rate=1e-5, lora_rank=lora_rank,
                         gradient_checkpointing=gradient_checkpointing)
    # Tensor memory, not resident memory: the profiler records every allocation and free,
    # and their running sum peaks where training holds the most (weights, gradients,
    # optimiser states and activations; a second model on the live path).
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        train_dpo(model, reference, triples, config, Path(tempfile.mkdtemp()) / "out", seed=0)
    changes = sorted((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    held = peak = 0
    for _, change in changes:
        held += change
        peak = max(peak, held)
    return {"peak_mib": peak / 2**20}


def trl_steps_per_second(model: Path, rows, batch: int, steps: int, precompute: bool) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.started)

    data = Dataset.from_list(rows)
    timer = StepTimes()
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps,
                     learning_rate=1e-5, beta=0.1, loss_type=["sigmoid"], logging_steps=steps, report_to=[],
                     save_strategy="no", use_cpu=True, bf16=False, max_length=None, disable_tqdm=True,
                     precompute_ref_log_probs=precompute)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model),
                         ref_model=AutoModelForCausalLM.from_pretrained(model), args=args,
                         train_dataset=data, processing_class=AutoTokenizer.from_pretrained(model),
                         callbacks=[timer])
    trainer.train()
    return 1.0 / (sum(timer.times[1:]) / len(timer.times[1:]))  # the first step warms up


def ours_steps_per_second(model: Path, triples, batch: int) -> float:
    import torch

    from flywheel.config import TrainConfig
    from flywheel.training import ReferenceLogps, completion_logps, train_dpo

    sequences = [(t.prompt_token_ids, c) for t in triples for c in (t.chosen_token_ids, t.rejected_token_ids)]
    logps = completion_logps(model, sequences, batch_size=2 * batch)
    reference = ReferenceLogps(torch.tensor(logps[0::2]), torch.tensor(logps[1::2]))
    metrics = train_dpo(model, reference, triples, TrainConfig(batch_size=batch, learning_rate=1e-5),
                        Path(tempfile.mkdtemp()) / "out", seed=0)
    tokens_per_step = sum(len(t.prompt_token_ids) * 2 + len(t.chosen_token_ids) + len(t.rejected_token_ids)
                          for t in triples[:batch])
    return sum(m.tokens_per_second for m in metrics[1:]) / len(metrics[1:]) / tokens_per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=8, help="steps timed for throughput")
    parser.add_argument("--memory-layers", type=int, default=12, help="layers of the model for memory")
    parser.add_argument("--memory-hidden", type=int, default=1024, help="hidden size of the model for memory")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps taken for memory")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--completion-len", type=int, default=64)
    parser.add_argument("--memory-child", nargs=4, metavar=("MODEL", "PATH", "LORA", "CKPT"), help=argparse.SUPPRESS)
    parser.add_argument("--reference-logps", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_logps:
        from flywheel.training import completion_logps

        print(json.dumps(completion_logps(Path(args.reference_logps), json.load(sys.stdin), 64)))
        return
    if args.memory_child:
        model, kind, lora_rank, checkpointing = args.memory_child
        print(json.dumps(memory_child(Path(model), kind, args.steps, args.batch, args.prompt_len,
                                      args.completion_len, int(lora_rank), checkpointing == "1")))
        return

    model = build_model(Path(tempfile.mkdtemp()) / "policy", args.layers, args.hidden)
    memory_model = build_model(Path(tempfile.mkdtemp()) / "memory", args.memory_layers, args.memory_hidden)
    shape = ["--steps", str(args.memory_steps), "--batch", str(args.batch), "--prompt-len", str(args.prompt_len),
             "--completion-len", str(args.completion_len)]
    memory = {}
    for setting, (lora_rank, checkpointing) in {"full": ("0", "0"), "lora": ("16", "1")}.items():
        for kind in ("cached", "live"):
            run = subprocess.run([sys.executable, __file__, "--memory-child", str(memory_model), kind, lora_rank,
                                  checkpointing, *shape], capture_output=True, text=True, check=True)
            memory[setting, kind] = json.loads(run.stdout.strip().splitlines()[-1])["peak_mib"]

    rows, triples = make_data(model, args.batch * args.steps, args.prompt_len, args.completion_len)
    ours = ours_steps_per_second(model, triples, args.batch)
    theirs = trl_steps_per_second(model, rows, args.batch, args.steps, precompute=False)
    theirs_precomputed = trl_steps_per_second(model, rows, args.batch, args.steps, precompute=True)
    tokens = args.batch * 2 * (args.prompt_len + args.completion_len)
    print(f"{args.batch} pairs per step, prompt {args.prompt_len} + completion {args.completion_len} tokens; "
          "fp32 on CPU")
    print(f"memory: Llama {args.memory_layers} layers, hidden {args.memory_hidden}, {args.memory_steps} steps")
    for setting, words in (("full", "full fine-tuning, AdamW"), ("lora", "LoRA r=16 + gradient checkpointing")):
        cached, live = memory[setting, "cached"], memory[setting, "live"]
        print(f"  peak tensor memory ({words}): cached reference {cached:.0f} MiB, live reference "
              f"{live:.0f} MiB, ratio {cached / live:.2f} (target <= 0.60)")
    print(f"throughput: Llama {args.layers} layers, hidden {args.hidden}, {args.steps} steps")
    print(f"  ours (cached reference) {ours * tokens:.0f} tokens/s; TRL DPOTrainer "
          f"{theirs * tokens:.0f} tokens/s (live reference), ratio {ours / theirs:.2f}; "
          f"{theirs_precomputed * tokens:.0f} tokens/s (precompute_ref_log_probs), ratio "
          f"{ours / theirs_precomputed:.2f} (target >= 1.0)")


if __name__ == "__main__":
    main()
