"""How large `sampler_logprob_gap` is when the sampler holds the right weights, and when a
reload was skipped, on a demo flywheel (run `flywheel demo` first).

    .venv/bin/python benchmarks/sampler_logprob_gap.py --demo flywheel-demo

1. vLLM samples held-out prompts from the demo's initial policy in float32 and in
   bfloat16; the trainer scores them in float32 (the gap numerics alone make).
2. For each demo round whose policy was newly promoted, its stored completions are scored
   under the previous policy: the gap the round would have shown had vLLM kept the old
   weights (a skipped reload).
The last line compares the smallest skipped-reload gap with the largest numeric one.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from flywheel.config import SampleConfig
from flywheel.prompts import load_prompts
from flywheel.sampling import VLLMSampler
from flywheel.training import sampler_logprob_gap
from storage import tables
from storage.records import Prompt
from storage.store import Store

CHECKED = 32  # completions per round, as the round's own check


def numeric_gaps(policy: Path, prompts_file: Path, dtypes: list[str]) -> dict[str, float]:
    prompts = [Prompt(i, text, "heldout") for i, text in enumerate(load_prompts(prompts_file)[:64])]
    gaps = {}
    for dtype in dtypes:
        sampler = VLLMSampler(SampleConfig(max_tokens=8, dtype=dtype, enforce_eager=True), seed=0)
        try:
            completions = sampler.sample(policy, 1, prompts, n=2, temperature=1.0, seed=0, purpose="eval",
                                         round_id=None, progress=False)
        finally:
            sampler.close()
        gaps[dtype] = sampler_logprob_gap(policy, completions, batch_size=64)
    return gaps


def skipped_reload_gaps(database: Path) -> dict[int, float]:
    store = Store.open(database)
    rounds = [store.read(tables.get_round, r) for r in range(1, store.read(tables.count, "rounds") + 1)]
    gaps = {}
    for previous, round_ in zip(rounds, rounds[1:]):
        if round_.policy_checkpoint_id == previous.policy_checkpoint_id:
            continue  # not promoted: the same weights, nothing to miss
        completions = store.read(tables.completions, round_id=round_.round_id, purpose="train")
        checked = random.Random(0).sample(completions, min(CHECKED, len(completions)))
        old = Path(store.read(tables.checkpoint, previous.policy_checkpoint_id).path)
        gaps[round_.round_id] = sampler_logprob_gap(old, checked, batch_size=CHECKED)
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("flywheel-demo"), help="a `flywheel demo` directory")
    args = parser.parse_args()
    numeric = numeric_gaps(args.demo / "policy", args.demo / "prompts" / "heldout.jsonl", ["float32", "bfloat16"])
    for dtype, gap in numeric.items():
        print(f"right weights, vLLM {dtype:>8}, trainer float32: {gap:.2g} nats/token")
    skipped = skipped_reload_gaps(args.demo / "flywheel.duckdb")
    for round_id, gap in skipped.items():
        print(f"reload skipped before round {round_id}: {gap:.3f} nats/token")
    if skipped:
        print(f"smallest skipped-reload gap / largest numeric gap: {min(skipped.values()) / max(numeric.values()):.1f}x")


if __name__ == "__main__":
    main()
