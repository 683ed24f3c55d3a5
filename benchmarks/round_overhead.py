"""How much of a demo round is not sampling, judging or training, and where it goes.

Runs the demo flywheel (`flywheel demo`'s config) through the real Prefect flow as the
demo does (one flow run of all the rounds, in one process, with one vLLM engine kept
alive across rounds) and splits each round's wall time (its begin-round task to the end of
its publish-report task) into:
- sampling: time inside the sampler (training pairs and held-out samples);
- judging: time inside the judge (labelling and the win rate);
- training: the DPO steps' own time (`train_steps.seconds`: forward, backward and
  optimiser step) and the log-prob forward passes (the reference's for DPO, and the
  candidate's and reference's for the KL at evaluation), without their model loads;
- overhead: everything else, itself split into
  - model I/O: transformers model and tokenizer loads, the candidate's save, and moving
    the vLLM engine to a new checkpoint (its weights reloaded in place);
  - store: time inside store transactions and queries (opening the file, reads, writes,
    commits, closing it, and the run lease's writes on the round's thread);
  - plot: the per-round PNG (`flywheel.report.plot_round_table`);
  - the rest: Prefect's task runs and the markdown artifact, and our own Python between
    the steps.
Each moment is charged to the innermost of these it is in (a model load inside the
log-prob pass is model I/O, not training), on the thread running the round only (the
lease's heartbeat thread runs beside it). The engine starts once, before round 1, and the
flow run starts and ends once for all rounds: both are printed, not counted in a round.
The median share of the rounds after the first is the figure (round 1 also pays costs
that come once per process: matplotlib's first import, Prefect's first task runs). There
is no target: on a real round, minutes of sampling and training, this overhead does not
grow with the model.

    .venv/bin/python benchmarks/round_overhead.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

BUCKETS = ("sampling", "judging", "training", "model I/O", "store", "plot")
TIMERS: dict[str, float] = defaultdict(float)
_STACKS = threading.local()  # per thread: [bucket, charged since] of the open buckets
HEARTBEAT_THREAD = "flywheel-lease-heartbeat"


@contextmanager
def charged_to(bucket: str):
    """Charge the time inside to `bucket`, pausing the bucket it is nested in."""
    if threading.current_thread().name == HEARTBEAT_THREAD:
        yield
        return
    stack = _STACKS.__dict__.setdefault("stack", [])
    now = time.perf_counter()
    if stack:
        TIMERS[stack[-1][0]] += now - stack[-1][1]
    stack.append([bucket, now])
    try:
        yield
    finally:
        now = time.perf_counter()
        inner, since = stack.pop()
        TIMERS[inner] += now - since
        if stack:
            stack[-1][1] = now


def timed(bucket: str, fn):
    """`fn`, charging its time to `bucket`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with charged_to(bucket):
            return fn(*args, **kwargs)
    return wrapper


def timed_context(bucket: str, manager):
    """A context-manager function whose whole `with` block is charged to `bucket`."""
    @contextmanager
    @functools.wraps(manager)
    def wrapper(*args, **kwargs):
        with charged_to(bucket), manager(*args, **kwargs) as value:
            yield value
    return wrapper


def instrument(sampler, judge) -> None:
    """Wrap the functions whose time goes into each bucket (see the module docstring)."""
    import transformers

    import flows.rounds
    import flywheel.rounds
    import flywheel.training
    from storage.store import Store

    sampler.sample = timed("sampling", sampler.sample)
    sampler._load = timed("model I/O", sampler._load)
    judge.judge = timed("judging", judge.judge)
    judge.score = timed("judging", judge.score)
    # Both names: the KL at evaluation calls it from rounds, the reference cache from training.
    flywheel.rounds.completion_logps = timed("training", flywheel.rounds.completion_logps)
    flywheel.training.completion_logps = timed("training", flywheel.training.completion_logps)
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        auto.from_pretrained = timed("model I/O", auto.from_pretrained)
    flywheel.training.save_checkpoint = timed("model I/O", flywheel.training.save_checkpoint)
    Store.transaction = timed_context("store", Store.transaction)
    Store.query = timed("store", Store.query)
    flows.rounds.plot_round_table = timed("plot", flows.rounds.plot_round_table)


def after_round_1(values: list[float]) -> list[float]:
    """The rounds the figure is taken on: all but round 1 (with one round, that round)."""
    return values[1:] or values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="demo rounds to run (default: %(default)s)")
    parser.add_argument("--dir", type=Path, help="working directory (default: a new temporary one)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    from prefect.testing.utilities import prefect_test_harness

    from flywheel.examples.addition import DemoPolicyConfig, demo_flywheel_config
    from flywheel.sampling import VLLMSampler
    from judges import load_judge
    from storage.records import Prompt
    from storage.store import Store

    workdir = (args.dir or Path(tempfile.mkdtemp())) / "flywheel"
    cache = Path(os.environ.get("FLYWHEEL_CACHE", Path.home() / ".cache" / "flywheel"))
    config = demo_flywheel_config(workdir, DemoPolicyConfig(), cache, log=print)
    # The engine and the judge are made here, started and instrumented, and given to the flow.
    sampler = VLLMSampler(config.sample, seed=config.seed)
    judge = load_judge(config.judge.spec, config.judge.options)
    started = time.perf_counter()
    sampler.sample(config.reference_model, 0, [Prompt(0, "1+1=", "heldout")], n=2, temperature=1.0,
                   seed=0, purpose="eval", round_id=None, progress=False)
    engine_start = time.perf_counter() - started
    instrument(sampler, judge)

    # The rounds run as `flywheel demo` runs them: one flow run of all rounds. A round is
    # from its begin-round task to the end of its publish-report task; the flow run's own
    # start and end (once per run, not per round) are printed apart.
    marks: list[tuple[str, float, dict[str, float]]] = []
    import flows.rounds

    def marked(name, task):
        def call(*args, **kwargs):
            if name == "begin":
                marks.append(("begin", time.perf_counter(), dict(TIMERS)))
            result = task(*args, **kwargs)
            if name == "end":
                marks.append(("end", time.perf_counter(), dict(TIMERS)))
            return result
        return call

    flows.rounds.begin_round = marked("begin", flows.rounds.begin_round)
    flows.rounds.publish_report = marked("end", flows.rounds.publish_report)
    try:
        with prefect_test_harness(server_startup_timeout=120):
            run_started = time.perf_counter()
            round_ids = flows.rounds.flywheel_rounds(config, args.rounds, judge=judge, sampler=sampler, log=print)
            run_wall = time.perf_counter() - run_started
    finally:
        sampler.close()
    _, steps = Store.open(config.database).query(
        "SELECT round_id, coalesce(sum(seconds), 0) FROM train_steps GROUP BY round_id")
    step_seconds = dict(steps)
    if len(marks) != 2 * len(round_ids):
        raise SystemExit(f"expected every round to reach publish-report: {len(round_ids)} rounds, marks {marks}")
    rows = []
    for round_id, (_, began, before), (_, ended, after) in zip(round_ids, marks[0::2], marks[1::2]):
        spent = {bucket: after.get(bucket, 0.0) - before.get(bucket, 0.0) for bucket in BUCKETS}
        # The steps' own time is inside train_dpo, which is otherwise uncharged (the rest).
        spent["training"] += step_seconds.get(round_id, 0.0)
        rows.append((round_id, ended - began, spent))
    in_rounds = sum(wall for _, wall, _ in rows)

    print(f"\ndemo rounds ({config.sample.prompts_per_round} prompts x {config.sample.n}) through the Prefect flow, "
          f"one vLLM engine kept alive (started once in {engine_start:.1f} s, before round 1); seconds")
    head = (f"{'round':>5} {'wall':>6} {'sampling':>9} {'judging':>8} {'training':>9} {'overhead':>9} {'share':>6}"
            f"   {'model I/O':>9} {'store':>6} {'plot':>5} {'rest':>5}")
    print(head)
    shares = []
    for round_id, wall, spent in rows:
        overhead = wall - spent["sampling"] - spent["judging"] - spent["training"]
        rest = overhead - spent["model I/O"] - spent["store"] - spent["plot"]
        shares.append(overhead / wall)
        print(f"{round_id:>5} {wall:>6.2f} {spent['sampling']:>9.2f} {spent['judging']:>8.2f} "
              f"{spent['training']:>9.2f} {overhead:>9.2f} {overhead / wall:>6.1%}   {spent['model I/O']:>9.2f} "
              f"{spent['store']:>6.2f} {spent['plot']:>5.2f} {rest:>5.2f}")
    print(f"outside the rounds (the flow run's start and end, once for all {len(rows)} rounds): "
          f"{run_wall - in_rounds:.2f} s")
    steady = after_round_1(shares)
    print(f"overhead share of a round after round 1: median {statistics.median(steady):.1%}, "
          f"range {min(steady):.1%}-{max(steady):.1%} over {len(steady)} round(s); round 1: {shares[0]:.1%}")


if __name__ == "__main__":
    main()
