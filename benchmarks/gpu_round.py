"""Two flywheel rounds on a model of a real size, on one GPU: what a user's round costs.

    bash scripts/gpu_check.sh                           # on a GPU host, `gpu` extra installed
    .venv/bin/python benchmarks/gpu_round.py --cpu-dry-run   # the same script, tiny, on CPU

It builds a random-init model from a config only (no download): Qwen2-0.5B's shape (24
layers, hidden 896, 14 heads, 2 KV heads, MLP 4864) over the demo's character tokenizer,
so about 0.36B parameters outside the embedding. It runs 2 rounds of the real flywheel
(vLLM sampling, sleep, DPO in bfloat16 with float32 weights, evaluation) with a rule
judge that prefers completions with more digits (random weights give varied ones), and
prints from the store:
- sampling tokens/s: completion tokens of round 2 over its sample phase, less the
  engine's wake, reload and sleep in it;
- DPO tokens/s and MFU: training's tokens/s of round 2, and 6 N tokens/s over the GPU's
  dense bf16 peak (forward and backward of the N non-embedding parameters; the
  reference's log-probs are a separate, cached pass, not counted);
- peak GPU memory by phase, and whether the engine slept through training;
- the sampler log-prob gap of each round.
`--cpu-dry-run` runs a 2-layer model with few prompts in float32, so that a test can run
the script end to end on CPU (the figures then mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a name fragment of the device.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 125.0, "L4": 121.0}


def digit_share(prompt: str, completion: str) -> float:
    """The share of the completion's characters that are digits: a rule that random
    weights do not satisfy evenly, so pairs have winners."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def build_random_model(directory: Path, dry_run: bool) -> tuple[Path, int]:
    """A random-init causal LM saved with `save_pretrained`; (its path, its non-embedding
    parameter count)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from flywheel.checkpoints import save_checkpoint
    from flywheel.examples.addition import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   tie_word_embeddings=True)
    if dry_run:
        config = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=2, max_position_embeddings=256, **special)
        dtype = torch.float32
    else:  # Qwen2-0.5B's shape
        config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                             num_key_value_heads=2, max_position_embeddings=4096, **special)
        dtype = torch.bfloat16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    non_embedding = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    path = directory / "policy"
    save_checkpoint(model, tokenizer, path)
    return path, non_embedding


def flywheel_config(workdir: Path, policy: Path, dry_run: bool):
    from flywheel.config import EvalConfig, FlywheelConfig, JudgeConfig, PairConfig, SampleConfig, TrainConfig
    from flywheel.examples.addition import DemoPolicyConfig, write_demo_prompts

    prompts, heldout = write_demo_prompts(workdir / "prompts", DemoPolicyConfig(heldout_size=64),
                                          num_train_prompts=32 if dry_run else 1024)
    if dry_run:
        sample = SampleConfig(prompts_per_round=32, n=4, max_tokens=8, max_model_len=64, dtype="float32",
                              enforce_eager=True)
        train = TrainConfig(batch_size=16, steps_per_round=2, dtype="float32")
    else:
        sample = SampleConfig(prompts_per_round=1024, batch_prompts=1024, n=4, max_tokens=64, max_model_len=256,
                              dtype="bfloat16", gpu_memory_utilization=0.5)
        train = TrainConfig(batch_size=64, steps_per_round=16, learning_rate=1e-5, dtype="auto")
    return FlywheelConfig(
        workdir=workdir / "flywheel", reference_model=policy, prompts=prompts, heldout_prompts=heldout, seed=0,
        judge=JudgeConfig(f"rule:{Path(__file__).stem}:digit_share", {"name": "digits"}, batch_size=1024),
        sample=sample, pair=PairConfig(strategy="best_vs_worst", truncated="keep"), train=train,
        eval=EvalConfig(samples_per_prompt=4 if not dry_run else 2),
    )


def report(store, non_embedding: int, peak_tflops: float | None) -> dict:
    """The figures of round 2 (round 1 also pays the engine start), from the store."""
    _, rows = store.query(
        "SELECT round_id, kind, name, detail, seconds, peak_gpu_bytes, started_at FROM round_phases "
        "ORDER BY round_id, started_at, phase_id")
    last = max(r[0] for r in rows)
    rows = [r[:6] + (r[6].timestamp(),) for r in rows if r[0] == last]
    phases = {name: (seconds, peak) for _, kind, name, _, seconds, peak, _ in rows if kind == "phase"}
    sample_start, sample_seconds = next((at, s) for _, kind, name, _, s, _, at in rows
                                        if (kind, name) == ("phase", "sample"))
    # The engine's start, wake, reload and sleep inside the sample phase are not sampling.
    engine = sum(s for _, kind, _, _, s, _, at in rows
                 if kind == "sampler" and sample_start <= at <= sample_start + sample_seconds)
    _, (tokens,) = store.query("SELECT sum(num_tokens) FROM completions WHERE round_id = ? AND purpose = 'train'",
                               [last])
    _, (train_tps,) = store.query("SELECT avg(tokens_per_second) FROM train_steps WHERE round_id = ?", [last])
    _, gaps = store.query("SELECT round_id, sampler_logprob_gap FROM rounds ORDER BY round_id")
    dpo_tps = train_tps[0]
    figures = {
        "round": last,
        "non_embedding_parameters": non_embedding,
        "sampling_tokens_per_s": tokens[0] / (sample_seconds - engine),
        "dpo_tokens_per_s": dpo_tps,
        "mfu": None if peak_tflops is None or dpo_tps is None else 6 * non_embedding * dpo_tps / (peak_tflops * 1e12),
        "phases": {name: {"seconds": round(s, 2), "peak_gib": None if p is None else round(p / 2**30, 2)}
                   for name, (s, p) in phases.items()},
        "sampler_events": [(name, detail) for _, kind, name, detail, _, _, _ in rows if kind == "sampler"],
        "logprob_gap": {round_id: gap for round_id, gap in gaps},
    }
    return figures


def device_peak_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for fragment, peak in BF16_PEAK_TFLOPS.items() if fragment in name), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="a 2-layer model on CPU: checks the script runs")
    parser.add_argument("--rounds", type=int, default=2, help="rounds to run (default 2)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak, for MFU (default: looked up from the device name)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    import torch

    from flywheel.rounds import Flywheel

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_round: no CUDA device; run with --cpu-dry-run to check the script on CPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-round-") as scratch:
        scratch = Path(scratch)
        policy, non_embedding = build_random_model(scratch, args.cpu_dry_run)
        wheel = Flywheel(flywheel_config(scratch, policy, args.cpu_dry_run), log=print)
        try:
            wheel.initialise()
            for _ in range(args.rounds):
                wheel.run_round()
            figures = report(wheel.store, non_embedding, args.peak_tflops or device_peak_tflops())
        finally:
            wheel.close()
    figures["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    figures["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(f"device: {figures['device']}; {non_embedding / 1e6:,.1f}M non-embedding parameters; "
          f"{figures['wall_seconds']} s for {args.rounds} rounds")
    print(f"sampling: {figures['sampling_tokens_per_s']:,.0f} tokens/s (round {figures['round']})")
    mfu = "n/a (no bf16 peak known)" if figures["mfu"] is None else f"{figures['mfu']:.1%}"
    print(f"DPO training: {figures['dpo_tokens_per_s']:,.0f} tokens/s, MFU {mfu}")
    for name, phase in figures["phases"].items():
        memory = "no GPU" if phase["peak_gib"] is None else f"{phase['peak_gib']:.2f} GiB peak"
        print(f"  {name:<16} {phase['seconds']:>8.2f} s  {memory}")
    for name, detail in figures["sampler_events"]:
        print(f"  sampler {name}: {detail}")
    print("sampler log-prob gap by round (nats/token): "
          + ", ".join(f"{r}: {g:.2e}" for r, g in figures["logprob_gap"].items() if g is not None))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
