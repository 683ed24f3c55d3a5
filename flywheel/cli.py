"""The `flywheel` command. User mistakes print one line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from flywheel.errors import UserError

DEFAULT_DEMO_DIR = Path("flywheel-demo")
EXIT_USER_ERROR = 2


def _quiet_libraries(verbose: bool) -> None:
    # vLLM and Prefect log every engine start and task run at INFO; the table is the output.
    if not verbose:
        # ERROR, not WARNING: each in-place weight reload warns that the (tied, unsaved)
        # lm_head and rotary buffers "failed to load", which is expected and harmless.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # The temporary Prefect server tries to send telemetry; this machine may have no network.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_object(spec: str, what: str) -> Any:
    """`package.module:attribute` -> the attribute, or a one-line UserError."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UserError(f"{what} {spec!r} must look like 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(f"{what} {spec!r} does not import: {error}") from error
    try:
        return getattr(module, attribute)
    except AttributeError as error:
        raise UserError(f"{what} {spec!r}: module {module_name} has no {attribute!r}") from error


# -- commands -----------------------------------------------------------------------------


def _run_flywheel(config, score: Callable[[str, str], float], judge_name: str, rounds: int) -> None:
    from flows.rounds import run_rounds
    from flywheel.rounds import Flywheel
    from judges import RuleJudge

    judge = RuleJudge(score, name=judge_name)
    flywheel = Flywheel(config, judge, score=score, log=_log)
    try:
        flywheel.initialise()
        run_rounds(flywheel, rounds)
    finally:
        flywheel.close()


def command_demo(args: argparse.Namespace) -> None:
    from flywheel.config import EvalConfig, FlywheelConfig, SampleConfig, TrainConfig
    from flywheel.demo_task import DemoPolicyConfig, addition_score, build_demo_policy, write_demo_prompts

    started = time.monotonic()
    workdir = args.dir.resolve()
    policy_config = DemoPolicyConfig(seed=args.seed)
    cache = Path(os.environ.get("FLYWHEEL_CACHE", Path.home() / ".cache" / "flywheel"))
    _log(f"demo policy: noisy-SFT tiny Llama on two-number addition (cache {cache})")
    reference = build_demo_policy(cache, policy_config, log=_log)
    prompts, heldout = write_demo_prompts(workdir, policy_config, num_train_prompts=4096)
    config = FlywheelConfig(
        workdir=workdir,
        reference_model=reference,
        prompts=prompts,
        heldout_prompts=heldout,
        seed=args.seed,
        # A model this small gains nothing from torch.compile, which costs ~30 s per start.
        sample=SampleConfig(prompts_per_round=512, n=4, max_tokens=8, dtype="float32", enforce_eager=True),
        train=TrainConfig(beta=args.beta, learning_rate=args.lr, batch_size=32, epochs=2,
                          nll_weight=args.nll_weight),
        eval=EvalConfig(samples_per_prompt=4),
    )
    _log(f"running {args.rounds} rounds in {workdir}")
    _run_flywheel(config, addition_score, "addition-verifier", args.rounds)
    _print_round_table(config.database)
    _log(f"done in {time.monotonic() - started:.0f} s. Query it: flywheel sql --db {config.database} "
         "\"SELECT * FROM round_summary\"")


def command_run(args: argparse.Namespace) -> None:
    from flywheel.checkpoints import require_checkpoint
    from flywheel.config import FlywheelConfig, SampleConfig, TrainConfig

    from flywheel.prompts import load_prompts

    # Check every input before anything slow starts (engine, Prefect API).
    require_checkpoint(args.model)
    load_prompts(args.prompts)
    load_prompts(args.heldout)
    score = load_object(args.score, "score function")
    if not callable(score):
        raise UserError(f"score function {args.score!r} is not callable")
    config = FlywheelConfig(
        workdir=args.workdir,
        reference_model=args.model,
        prompts=args.prompts,
        heldout_prompts=args.heldout,
        seed=args.seed,
        sample=SampleConfig(prompts_per_round=args.prompts_per_round, n=args.n, max_tokens=args.max_tokens),
        train=TrainConfig(beta=args.beta, learning_rate=args.lr, nll_weight=args.nll_weight),
    )
    _run_flywheel(config, score, f"rule:{args.score}", args.rounds)
    _print_round_table(config.database)


def command_sql(args: argparse.Namespace) -> None:
    from storage.store import Store

    columns, rows = Store.open(args.db).query(args.query)
    _print_table(columns, rows)


def _print_round_table(database: Path) -> None:
    from storage.store import Store

    columns, rows = Store.open(database).query(
        "SELECT round_id AS round, pairs, preferences, round(final_train_loss, 4) AS train_loss, "
        "round(incumbent_accuracy, 3) AS incumbent_acc, round(candidate_accuracy, 3) AS heldout_acc, "
        "round(win_rate, 3) AS win_rate, promoted FROM round_summary ORDER BY round_id"
    )
    _print_table(columns, rows, title="flywheel rounds (held-out accuracy at temperature 1)")


def _print_table(columns: Sequence[str], rows: Sequence[tuple], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    Console(width=max(100, sum(len(c) + 6 for c in columns))).print(table)


# -- parsing ------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flywheel",
        description="An online-DPO data flywheel: sample, pair, label, train, evaluate, promote.",
    )
    parser.add_argument("--verbose", action="store_true", help="show vLLM and Prefect logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="run the demo flywheel on two-number addition",
        description="Build (or reuse) a noisy tiny policy for two-number addition and run "
        "flywheel rounds on it; prints a per-round table.",
    )
    demo.add_argument("--dir", type=Path, default=DEFAULT_DEMO_DIR, help="working directory (default: %(default)s)")
    demo.add_argument("--rounds", type=positive_int, default=8, help="rounds to run (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--beta", type=float, default=0.1, help="DPO beta (default: %(default)s)")
    demo.add_argument("--lr", type=float, default=3e-4, help="DPO learning rate (default: %(default)s)")
    demo.add_argument("--nll-weight", type=float, default=1.0,
                      help="weight of the chosen-answer NLL term added to DPO (default: %(default)s; 0 = pure DPO)")
    demo.set_defaults(handler=command_demo)

    run = commands.add_parser(
        "run", help="run rounds on your own model, prompts and scoring rule",
        description="Run flywheel rounds on a save_pretrained checkpoint with a rule judge "
        "given as a Python scoring function score(prompt, completion) -> float.",
    )
    run.add_argument("--model", type=Path, required=True, help="reference (SFT) checkpoint directory")
    run.add_argument("--prompts", type=Path, required=True, help="train prompts: .jsonl, .csv or .parquet with a 'prompt' column")
    run.add_argument("--heldout", type=Path, required=True, help="held-out prompts, same format")
    run.add_argument("--score", required=True, help="scoring function as 'package.module:function'")
    run.add_argument("--workdir", type=Path, required=True, help="where the database and checkpoints go")
    run.add_argument("--rounds", type=positive_int, default=1, help="rounds to run (default: %(default)s)")
    run.add_argument("--prompts-per-round", type=int, default=512, help="prompts sampled per round (default: %(default)s)")
    run.add_argument("--n", type=int, default=4, help="completions per prompt (default: %(default)s)")
    run.add_argument("--max-tokens", type=int, default=64, help="completion length limit (default: %(default)s)")
    run.add_argument("--beta", type=float, default=0.1, help="DPO beta (default: %(default)s)")
    run.add_argument("--lr", type=float, default=3e-5, help="DPO learning rate (default: %(default)s)")
    run.add_argument("--nll-weight", type=float, default=0.0,
                     help="weight of the chosen-answer NLL term added to DPO (default: %(default)s = pure DPO)")
    run.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    run.set_defaults(handler=command_run)

    sql = commands.add_parser(
        "sql", help="read-only SQL against a flywheel database",
        description="Run one read-only SQL statement (SELECT or EXPLAIN) and print a table. "
        "Views: preferences, round_summary. Tables: prompts, completions, pairs, labels, "
        "checkpoints, rounds, train_steps, evals.",
    )
    sql.add_argument("query", help='e.g. "SELECT * FROM round_summary"')
    sql.add_argument("--db", type=Path, default=DEFAULT_DEMO_DIR / "flywheel.duckdb",
                     help="database file (default: %(default)s)")
    sql.set_defaults(handler=command_sql)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries(args.verbose)
    from judges import JudgeError
    from storage.store import StoreError

    try:
        args.handler(args)
    except (UserError, StoreError, JudgeError) as error:
        print(f"flywheel: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("flywheel: interrupted; rerun to resume the unfinished round", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
