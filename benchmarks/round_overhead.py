"""How much of a demo round is not sampling, judging or training.

Runs the demo flywheel (`flywheel demo`'s config) through the real Prefect flow, one
flow run per round in one process, with one vLLM engine kept alive across rounds, and
splits each round's wall time into:
- sampling: time inside the sampler (training pairs and held-out samples);
- judging: time inside the judge (labelling and the win rate);
- training: the DPO steps' own time (`train_steps.seconds`: forward, backward and
  optimiser step) and the log-prob forward passes (the reference's for DPO, and the
  candidate's and reference's for the KL at evaluation);
- overhead: everything else: model loads and checkpoint saves, the store, the plot,
  and the Prefect flow and task runs.
The engine starts once, before round 1 (its time is printed, not counted in a round).
Target (issue 7): overhead under 15 % of a round's wall time with the engine kept alive.

    .venv/bin/python benchmarks/round_overhead.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

TIMERS: dict[str, float] = defaultdict(float)


def timed(bucket: str, fn):
    """`fn`, adding its wall time to TIMERS[bucket]."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMERS[bucket] += time.perf_counter() - started
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="demo rounds to run (default: %(default)s)")
    parser.add_argument("--dir", type=Path, help="working directory (default: a new temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    from prefect.testing.utilities import prefect_test_harness

    import flywheel.rounds
    from flows.rounds import run_rounds
    from flywheel.demo_task import DemoPolicyConfig, demo_flywheel_config
    from storage.records import Prompt

    workdir = (args.dir or Path(tempfile.mkdtemp())) / "flywheel"
    cache = Path(os.environ.get("FLYWHEEL_CACHE", Path.home() / ".cache" / "flywheel"))
    config = demo_flywheel_config(workdir, DemoPolicyConfig(), cache, log=print)
    import flywheel.training

    # Both names: the KL at evaluation calls it from rounds, the reference cache from training.
    flywheel.rounds.completion_logps = timed("training", flywheel.rounds.completion_logps)
    flywheel.training.completion_logps = timed("training", flywheel.training.completion_logps)
    wheel = flywheel.rounds.Flywheel(config)
    wheel.initialise()
    started = time.perf_counter()
    wheel.sampler.sample(config.reference_model, 0, [Prompt(0, "1+1=", "heldout")], n=2, temperature=1.0,
                         seed=0, purpose="eval", round_id=None, progress=False)
    engine_start = time.perf_counter() - started
    wheel.sampler.sample = timed("sampling", wheel.sampler.sample)
    wheel.judge.judge = timed("judging", wheel.judge.judge)
    wheel.judge.score = timed("judging", wheel.judge.score)

    rows = []
    try:
        with prefect_test_harness(server_startup_timeout=120):
            for _ in range(args.rounds):
                TIMERS.clear()
                round_started = time.perf_counter()
                (round_id,) = run_rounds(wheel, 1)
                wall = time.perf_counter() - round_started
                _, ((step_seconds,),) = wheel.store.query(
                    "SELECT coalesce(sum(seconds), 0) FROM train_steps WHERE round_id = ?", [round_id])
                rows.append((round_id, wall, TIMERS["sampling"], TIMERS["judging"], TIMERS["training"] + step_seconds))
    finally:
        wheel.close()

    print(f"demo rounds ({config.sample.prompts_per_round} prompts x {config.sample.n}) through the Prefect flow, "
          f"one vLLM engine kept alive (started once in {engine_start:.1f} s, before round 1)")
    print(f"{'round':>5} {'wall s':>7} {'sampling':>9} {'judging':>8} {'training':>9} {'overhead':>9} {'share':>6}")
    shares = []
    for round_id, wall, sampling, judging, training in rows:
        overhead = wall - sampling - judging - training
        shares.append(overhead / wall)
        print(f"{round_id:>5} {wall:>7.1f} {sampling:>9.1f} {judging:>8.1f} {training:>9.1f} {overhead:>9.1f} "
              f"{overhead / wall:>6.1%}")
    print(f"overhead share of a round: median {statistics.median(shares):.1%}, max {max(shares):.1%} (target < 15%)")


if __name__ == "__main__":
    main()
