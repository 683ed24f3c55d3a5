"""The `flywheel` command. User mistakes print one line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from flywheel.errors import EngineDiedError, UserError

DEFAULT_DEMO_DIR = Path("flywheel-demo")
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


def _quiet_libraries(verbose: bool) -> None:
    # vLLM and Prefect log every engine start and task run at INFO; the table is the output.
    if not verbose:
        # ERROR, not WARNING: each in-place weight reload warns that a tied lm_head and
        # the rotary buffers "failed to load"; `CheckpointReload` repacks the head.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        # A failed task or flow run logs its exception's traceback at ERROR. The error a
        # user can act on is printed in one line by `main`, and any other exception
        # still reaches the terminal with its traceback when it leaves `main`.
        for runs in ("FLOW_RUNS", "TASK_RUNS"):
            os.environ.setdefault(f"PREFECT_LOGGING_LOGGERS_PREFECT_{runs}_LEVEL", "CRITICAL")
    # The temporary Prefect server tries to send telemetry; this machine may have no network.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- commands -----------------------------------------------------------------------------


def _run_flywheel(config, rounds: int, judge=None, eval_judge=None) -> None:
    from flows.rounds import run_rounds
    from flywheel.rounds import Flywheel

    flywheel = Flywheel(config, log=_log, judge=judge, eval_judge=eval_judge)
    try:
        flywheel.initialise()
        run_rounds(flywheel, rounds)
    finally:
        flywheel.close()


def command_demo(args: argparse.Namespace) -> None:
    from flywheel.examples.addition import DemoPolicyConfig, demo_flywheel_config

    started = time.monotonic()
    workdir = args.dir.resolve()
    cache = Path(os.environ.get("FLYWHEEL_CACHE", Path.home() / ".cache" / "flywheel"))
    _log(f"demo policy: noisy-SFT tiny Llama on two-number addition (cache {cache})")
    config = demo_flywheel_config(workdir, DemoPolicyConfig(seed=args.seed), cache, _log, beta=args.beta,
                                  learning_rate=args.lr, nll_weight=args.nll_weight, pairing=args.pairing)
    _log(f"running {args.rounds} rounds in {workdir}")
    _run_flywheel(config, args.rounds)
    _print_round_table(config.database)
    _log(f"done in {time.monotonic() - started:.0f} s. Query it: flywheel sql --db {config.database} "
         "\"SELECT * FROM round_summary\"")


def command_run(args: argparse.Namespace) -> None:
    config, rounds = _run_config_from_file(args) if args.config is not None else _run_config_from_flags(args)
    judge, eval_judge = _check_inputs(config)
    _run_flywheel(config, rounds, judge, eval_judge)
    _print_round_table(config.database)


def _run_config_from_file(args: argparse.Namespace):
    from flywheel.config import load_config_file

    # Every flag but --rounds is a key of the file: refuse both, rather than pick one.
    defaults = vars(build_parser().parse_args(["run"]))
    given = [f"--{dest.replace('_', '-')}" for dest, value in vars(args).items()
             if dest not in ("config", "rounds", "verbose") and value != defaults[dest]]
    if given:
        raise UserError(f"{', '.join(given)} cannot be given with --config: set "
                        f"{'them' if len(given) > 1 else 'it'} in {args.config} (only --rounds overrides the file)")
    run_file = load_config_file(args.config)
    return run_file.config, args.rounds or run_file.rounds or 1


def _run_config_from_flags(args: argparse.Namespace):
    from flywheel.config import EvalConfig, FlywheelConfig, JudgeConfig, PairConfig, SampleConfig, TrainConfig

    missing = [flag for flag in ("--model", "--prompts", "--heldout", "--workdir") if getattr(args, flag[2:]) is None]
    if missing:
        raise UserError(f"run needs {', '.join(missing)} (or --config FILE)")
    if args.judge is None and args.score is None:
        raise UserError("give --judge SPEC, or --score for a rule judge (or both)")
    config = FlywheelConfig(
        workdir=args.workdir,
        reference_model=args.model,
        prompts=args.prompts,
        heldout_prompts=args.heldout,
        judge=JudgeConfig(args.judge or f"rule:{args.score}", _judge_options(args.judge_option)),
        seed=args.seed,
        sample=SampleConfig(prompts_per_round=args.prompts_per_round, n=args.n, max_tokens=args.max_tokens),
        pair=PairConfig(strategy=args.pairing, max_pairs_per_round=args.max_pairs_per_round),
        train=TrainConfig(beta=args.beta, learning_rate=args.lr, nll_weight=args.nll_weight,
                          loss_type=args.loss_type, label_smoothing=args.label_smoothing,
                          length_normalised=args.length_normalised,
                          gradient_accumulation_steps=args.gradient_accumulation_steps,
                          warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule,
                          reference=args.reference, replay_fraction=args.replay_fraction,
                          lora_rank=args.lora_rank, num_processes=args.num_processes, bf16=args.bf16,
                          gradient_checkpointing=args.gradient_checkpointing,
                          keep_reference_loaded=args.keep_reference_loaded),
        eval=EvalConfig(accuracy_score=args.score, judge=JudgeConfig(args.eval_judge) if args.eval_judge else None),
    )
    return config, args.rounds or 1


def _check_inputs(config):
    """Check every input before anything slow starts (engine, Prefect API); returns the
    judge and eval judge (None: the round's own), built now so a judge that cannot be
    built fails in one line."""
    from flywheel.checkpoints import require_checkpoint
    from flywheel.prompts import load_prompts
    from judges import import_object, load_judge

    require_checkpoint(config.reference_model)
    load_prompts(config.prompts)
    load_prompts(config.heldout_prompts)
    score = config.eval.accuracy_score
    if score is not None and not callable(import_object(score, "score function")):
        raise UserError(f"score function {score!r} is not callable")
    judge = load_judge(config.judge.spec, config.judge.options)
    eval_judge = load_judge(config.eval.judge.spec, config.eval.judge.options) if config.eval.judge else None
    return judge, eval_judge


def command_judge(args: argparse.Namespace) -> None:
    from flywheel.labelling import label_pairs
    from judges import close_judge, load_judge
    from storage.store import Store

    store = Store.open(args.db)
    round_id = args.round
    if round_id is None:
        _, rows = store.query("SELECT max(round_id) FROM pairs")
        round_id = rows[0][0]
        if round_id is None:
            raise UserError(f"{args.db} has no pairs to judge yet")
    if store.count("pairs", "round_id = ?", [round_id]) == 0:
        raise UserError(f"round {round_id} has no pairs (it has not finished pairing, or does not exist)")
    if args.judge == "human":
        raise UserError("people label through the queue: `flywheel label enqueue --round N`, then `flywheel label serve`")
    judge = load_judge(args.judge, _judge_options(args.judge_option))
    try:
        result = label_pairs(store, judge, round_id, args.batch_size)
    finally:
        close_judge(judge)
    _log(f"round {round_id}: {judge.name}@{judge.version} labelled {result.labelled} pairs"
         f" ({result.failed} undecided, {result.already_done} judged before)")
    labeller = f"{judge.name}@{judge.version}"
    columns, rows = store.query(
        "SELECT judge_a, judge_b, pairs, agreements, round(agreement_rate, 3) AS agreement_rate, "
        "decisive_pairs, round(decisive_agreement_rate, 3) AS decisive_agreement_rate "
        "FROM judge_agreement WHERE judge_a = ? OR judge_b = ?", [labeller, labeller])
    _print_table(columns, rows, title="agreement with other labellers (all rounds)")


def _judge_options(pairs: Sequence[str]) -> dict[str, str]:
    """KEY=VALUE strings -> options (the judge loader converts numbers and booleans)."""
    options: dict[str, str] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--judge-option takes KEY=VALUE, got {item!r}")
        options[key] = value
    return options


def command_annotators_add(args: argparse.Namespace) -> None:
    from judges.human import new_annotator
    from storage.store import Store

    token = new_annotator(Store.open(args.db), args.name)
    print(token)
    _log(f"annotator {args.name} added; the line above is their token, shown only this once. "
         f"They log in with it at `flywheel label serve --db {args.db}`.")


def command_annotators_list(args: argparse.Namespace) -> None:
    from storage import queue
    from storage.store import Store

    with Store.open(args.db).transaction() as tx:
        rows = queue.annotators(tx)
    _print_table(["annotator", "labels"], rows)


def command_label_serve(args: argparse.Namespace) -> None:
    import socket

    import uvicorn

    from judges.labelling_app import create_app

    app = create_app(args.db)
    try:  # uvicorn would log a bind failure and exit 3; say it in one line instead
        socket.create_server((args.host, args.port)).close()
    except OSError as error:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}") from error
    _log(f"labelling page: http://{args.host}:{args.port}/  (database {args.db}; Ctrl-C stops)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")


def command_label_enqueue(args: argparse.Namespace) -> None:
    from storage import queue
    from storage.store import Store

    from judges.human import HUMAN_JUDGE_NAME, MAX_LEASE_MINUTES

    if args.lease_minutes > MAX_LEASE_MINUTES:
        raise UserError(f"--lease-minutes must be at most {MAX_LEASE_MINUTES} (a week), got {args.lease_minutes}")
    store = Store.open(args.db)
    with store.transaction() as tx:
        if tx.count("pairs", "round_id = ?", [args.round]) == 0:
            raise UserError(f"round {args.round} has no pairs (it has not finished pairing, or does not exist)")
        # Only a round an AI judge has started labelling: a round with no judge yet, queued
        # here, would later be mistaken for a human round's own queue.
        judge_name = tx.get_round(args.round).judge_name
        if judge_name is None or judge_name == HUMAN_JUDGE_NAME:
            raise UserError(f"round {args.round} " + ("is labelled by people already" if judge_name else
                            "has no judge yet: enqueue it for comparison once its judge has labelled it"))
        request = queue.request_labels(tx, args.round, judge_version="1", labels_per_pair=args.labels_per_pair,
                                       lease_seconds=args.lease_minutes * 60, now=queue.utc_now())
        done = queue.progress(tx, args.round)
    _log(f"round {args.round}: {done.pairs} pairs queued for people, {request.labels_per_pair} label(s) each "
         f"({done.labels} given so far). People's labels of it are compared, not trained on.")


def command_label_export(args: argparse.Namespace) -> None:
    import json

    from storage import queue
    from storage.store import Store

    with Store.open(args.db).transaction() as tx:
        rows = queue.people_labels(tx, args.round) if args.labels else queue.pending_pairs(tx, args.round)
    try:
        out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    except OSError as error:
        raise UserError(f"cannot write {args.out}: {error.strerror or error}") from error
    try:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if args.out:
            out.close()
    _log(f"exported {len(rows)} {'labels' if args.labels else 'pending pairs'}"
         + (f" to {args.out}" if args.out else ""))


def command_label_import(args: argparse.Namespace) -> None:
    from judges.human import HUMAN_JUDGE_NAME
    from storage import queue
    from storage.store import Store

    labels = _read_label_lines(args.file, args.annotator)
    with Store.open(args.db).transaction() as tx:
        try:
            added, present = queue.import_labels(tx, labels, queue.utc_now(), judge_name=HUMAN_JUDGE_NAME)
        except queue.QueueError as error:
            raise UserError(f"{args.file}: {error}; nothing imported") from error
    _log(f"imported {added} labels from {args.file} ({present} were already there)")


def _read_label_lines(path: Path, default_annotator: str | None) -> list:
    """JSONL lines {"pair_id", "winner", "annotator", "rationale"?}; extra keys (the
    texts an export wrote) are ignored. Any bad line refuses the file, naming the line."""
    import json

    from judges.human import HumanLabel
    from storage.queue import QueueError

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from error
    labels = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("each line must be a JSON object")
            if "pair_id" not in row or "winner" not in row or ("annotator" not in row and not default_annotator):
                raise ValueError("needs a pair_id, a winner and an annotator (or --annotator)")
            labels.append(HumanLabel(row["pair_id"], row["winner"], row.get("annotator", default_annotator),
                                     row.get("rationale")))
        except (ValueError, QueueError) as error:
            raise UserError(f"{path}:{number}: {error}; nothing imported") from error
    return labels


def command_serve(args: argparse.Namespace) -> None:
    from flows.rounds import deployment_name, serve_rounds
    from flows.server import check_cron, find_or_start_server
    from flywheel.config import load_config_file
    from judges import close_judge

    check_cron(args.cron)
    run_file = load_config_file(args.config)
    rounds = args.rounds or run_file.rounds or 1
    # Each scheduled run builds its own judges; these were built only to check them now.
    for judge in _check_inputs(run_file.config):
        if judge is not None:
            close_judge(judge)

    api_url, server = find_or_start_server(args.server_host, args.server_port,
                                           run_file.config.workdir / "prefect-server.log", _log)
    name = f"flywheel-scheduled/{deployment_name(args.config)}"
    _log(f"serving {name}: {rounds} round(s) of {args.config} on cron {args.cron!r} (UTC), never two at once. "
         f"Ctrl-C stops serving and {'leaves the schedule on' if args.keep_schedule else 'pauses the schedule'}. "
         f"Run one now: PREFECT_API_URL={api_url} prefect deployment run '{name}'")
    try:
        serve_rounds(api_url, args.config.resolve(), args.cron, rounds, pause_on_shutdown=not args.keep_schedule)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


def command_promote(args: argparse.Namespace) -> None:
    from flywheel.promotion import promote_checkpoint
    from storage.store import Store

    promote_checkpoint(Store.open(args.db), args.checkpoint, args.by, args.reason)
    _log(f"checkpoint {args.checkpoint} is now the policy (promoted by {args.by}); the next round samples from it")


def command_rollback(args: argparse.Namespace) -> None:
    from flywheel.promotion import roll_back
    from storage.store import Store

    policy = roll_back(Store.open(args.db), args.by, args.reason)
    _log(f"rolled back by {args.by}: checkpoint {policy} is the policy again")


def _add_override_arguments(parser: argparse.ArgumentParser) -> None:
    _add_db_argument(parser)
    parser.add_argument("--by", default=os.environ.get("USER") or "unknown",
                        help="who decided, recorded in the promotions table (default: $USER, %(default)s)")
    parser.add_argument("--reason", help="why, recorded in the promotions table")


def command_sql(args: argparse.Namespace) -> None:
    from storage.store import Store

    columns, rows = Store.open(args.db).query(args.query)
    _print_table(columns, rows)


def command_status(args: argparse.Namespace) -> None:
    from flywheel.report import display_rows, plot_rounds, recent_promotions, status_lines
    from storage.store import Store

    _print_round_table(args.db)
    store = Store.open(args.db)
    for line in status_lines(store):
        print(line)
    columns, rows = recent_promotions(store)
    if rows:
        _print_table(columns, display_rows(rows), title="last promotion decisions (newest first)")
    if args.plot is not None:
        _log(f"plot: {plot_rounds(store, args.plot)}")


def _print_round_table(database: Path) -> None:
    """The per-round table of a database (`flywheel.report.round_table`)."""
    from flywheel.report import ROUND_TABLE_TITLE, display_rows, round_table
    from storage.store import Store

    columns, rows = round_table(Store.open(database))
    _print_table(columns, display_rows(rows), title=ROUND_TABLE_TITLE)


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


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number greater than 0, got {text}")
    return value


def port_number(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 1-65535, got {value}")
    return value


JUDGE_SPECS = """judge specs:
  human                          people, through `flywheel label serve`; the round waits in
                                 state labelling until the quota or deadline is met
  rule:package.module:function   score(prompt, completion) -> float; higher wins, equal ties
  reward-model:PATH              a sequence-classification checkpoint with one output
  llm:PATH                       a causal checkpoint asked "A or B?" through vLLM, in both orders
  package.module:Name            your own judge (a class, factory or instance with
                                 name, version and judge(pairs)); options become kwargs
judge options (--judge-option KEY=VALUE, repeatable), e.g. for llm: template_file=PATH,
  max_tokens=8, max_model_len=4096; for reward-model: batch_size=32, device=cuda; for human:
  labels_per_pair=1, quota_fraction=1.0 or quota_pairs=N, deadline_hours=0 (none),
  lease_minutes=10"""


def _add_judge_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--judge", required=required, metavar="SPEC", help="who labels the pairs (see judge specs below)")
    parser.add_argument("--judge-option", action="append", default=[], metavar="KEY=VALUE",
                        help="keyword option for the judge; repeatable")


def _add_db_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", type=Path, default=DEFAULT_DEMO_DIR / "flywheel.duckdb",
                        help="database file (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    from flywheel.config import LOSS_TYPES, LR_SCHEDULES, REFERENCES
    from flywheel.pairing import STRATEGIES

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
    demo.add_argument("--pairing", choices=STRATEGIES, default="random",
                      help="how completions of a prompt become pairs (default: %(default)s)")
    demo.set_defaults(handler=command_demo)

    run = commands.add_parser(
        "run", help="run rounds on your own model, prompts and judge",
        description="Run flywheel rounds on a save_pretrained checkpoint. Pairs are labelled by "
        "--judge, or by a rule judge made from --score, a Python function "
        "score(prompt, completion) -> float, which also gives held-out accuracy. Or give every "
        "setting in a YAML file with --config FILE (see the README), and no other flag but --rounds.",
        epilog=JUDGE_SPECS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", type=Path, metavar="FILE",
                     help="YAML file with every setting (see the README); no other flag but --rounds with it")
    run.add_argument("--model", type=Path, help="reference (SFT) checkpoint directory (required without --config)")
    run.add_argument("--prompts", type=Path, help="train prompts: .jsonl, .csv or .parquet with a 'prompt' column")
    run.add_argument("--heldout", type=Path, help="held-out prompts, same format")
    run.add_argument("--score", help="verifier 'package.module:function' for held-out accuracy (and the judge if no --judge)")
    _add_judge_arguments(run, required=False)
    run.add_argument("--eval-judge", metavar="SPEC",
                     help="who judges candidate against incumbent (default: the judge; with "
                     "--judge human, a rule judge made from --score)")
    run.add_argument("--pairing", choices=STRATEGIES, default="random",
                     help="how completions of a prompt become pairs (default: %(default)s; "
                     "best_vs_worst needs a rule or reward-model judge)")
    run.add_argument("--max-pairs-per-round", type=positive_int,
                     help="a label budget: at most this many pairs a round are labelled, a seeded random "
                     "subset when more form (default: every pair)")
    run.add_argument("--workdir", type=Path, help="where the database and checkpoints go")
    run.add_argument("--rounds", type=positive_int,
                     help="rounds to run (default: the config file's rounds, else 1)")
    run.add_argument("--prompts-per-round", type=int, default=512, help="prompts sampled per round (default: %(default)s)")
    run.add_argument("--n", type=int, default=4, help="completions per prompt (default: %(default)s)")
    run.add_argument("--max-tokens", type=int, default=64, help="completion length limit (default: %(default)s)")
    run.add_argument("--beta", type=float, default=0.1, help="DPO beta (default: %(default)s)")
    run.add_argument("--lr", type=float, default=3e-5, help="DPO learning rate (default: %(default)s)")
    run.add_argument("--nll-weight", type=float, default=0.0,
                     help="weight of the chosen-answer NLL term added to DPO (default: %(default)s = pure DPO)")
    run.add_argument("--loss-type", choices=LOSS_TYPES, default="sigmoid",
                     help="preference loss: sigmoid (DPO), ipo, hinge or robust (default: %(default)s)")
    run.add_argument("--label-smoothing", type=float, default=0.0,
                     help="assumed share of flipped labels, for sigmoid (conservative DPO) or robust "
                     "(default: %(default)s)")
    run.add_argument("--length-normalised", action="store_true",
                     help="use per-token mean log-probs instead of sums")
    run.add_argument("--gradient-accumulation-steps", type=positive_int, default=1,
                     help="micro-batches per optimiser step of 32 pairs (default: %(default)s)")
    run.add_argument("--warmup-steps", type=int, default=0,
                     help="optimiser steps of linear learning-rate warm-up (default: %(default)s)")
    run.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                     help="learning rate after warm-up (default: %(default)s)")
    run.add_argument("--reference", choices=REFERENCES, default="initial",
                     help="DPO's frozen reference: the initial model, or the previous round's promoted "
                     "checkpoint (default: %(default)s)")
    run.add_argument("--replay-fraction", type=float, default=0.0,
                     help="share of each round's training pairs replayed from earlier rounds "
                     "(default: %(default)s: only the round's fresh pairs)")
    run.add_argument("--lora-rank", type=int, default=0,
                     help="train LoRA adapters of this rank on every linear layer, merged on save "
                     "(default: %(default)s: full fine-tuning)")
    run.add_argument("--num-processes", type=positive_int, default=1,
                     help="data-parallel training processes under `accelerate launch`, one per GPU "
                     "(default: %(default)s: train in this process)")
    run.add_argument("--bf16", action="store_true", help="bf16 autocast for the policy's forward pass")
    run.add_argument("--gradient-checkpointing", action="store_true",
                     help="recompute activations in the backward pass: less memory, more time")
    run.add_argument("--keep-reference-loaded", action="store_true",
                     help="keep the frozen reference model loaded between rounds: two loads a round "
                     "fewer, for its memory")
    run.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    run.set_defaults(handler=command_run)

    judge = commands.add_parser(
        "judge", help="(re)label a round's pairs with another judge, after the fact",
        description="Label the pairs of a round with a judge and store the labels under its name "
        "and version, beside the labels already there; pairs it judged before are skipped. "
        "Prints its agreement with the other labellers. Training data is unaffected: a round "
        "trains only on its own judge's labels.",
        epilog=JUDGE_SPECS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_judge_arguments(judge, required=True)
    _add_db_argument(judge)
    judge.add_argument("--round", type=positive_int, help="round to label (default: the latest with pairs)")
    judge.add_argument("--batch-size", type=positive_int, default=256,
                       help="pairs per judge call and per transaction (default: %(default)s)")
    judge.set_defaults(handler=command_judge)

    annotators = commands.add_parser(
        "annotators", help="people who label through the labelling page",
        description="Add an annotator (prints their token once) or list annotators.")
    annotator_commands = annotators.add_subparsers(dest="annotators_command", required=True, metavar="ACTION")
    add = annotator_commands.add_parser("add", help="add an annotator and print their token",
                                        description="Add an annotator and print a token for the labelling "
                                        "page and API. Only a hash of it is stored: keep it.")
    add.add_argument("name", help="annotator name: letters, digits, _.@- (e.g. alice)")
    _add_db_argument(add)
    add.set_defaults(handler=command_annotators_add)
    listing = annotator_commands.add_parser("list", help="list annotators and their label counts",
                                            description="List annotators and how many labels each gave.")
    _add_db_argument(listing)
    listing.set_defaults(handler=command_annotators_list)

    label = commands.add_parser(
        "label", help="the human labelling queue: serve the page, enqueue, export, import",
        description="People label queued pairs in a browser. A round whose judge is 'human' queues "
        "its pairs itself; `enqueue` queues an AI-judged round's pairs for comparison.")
    label_commands = label.add_subparsers(dest="label_command", required=True, metavar="ACTION")
    serve = label_commands.add_parser("serve", help="serve the labelling page and JSON API",
                                      description="Serve the labelling page and its JSON API. Annotators "
                                      "log in with the token from `flywheel annotators add`.")
    _add_db_argument(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: %(default)s; 0.0.0.0 for your whole network)")
    serve.add_argument("--port", type=port_number, default=8000, help="port (default: %(default)s)")
    serve.set_defaults(handler=command_label_serve)
    enqueue = label_commands.add_parser(
        "enqueue", help="queue a round's pairs for people (to compare with its judge)",
        description="Queue every pair of a round for people. For a round labelled by an AI judge, "
        "people's labels appear beside it in judge_agreement; training is unaffected.")
    _add_db_argument(enqueue)
    enqueue.add_argument("--round", type=positive_int, required=True, help="round whose pairs to queue")
    enqueue.add_argument("--labels-per-pair", type=positive_int, default=1,
                         help="labels each pair needs, from different people (default: %(default)s)")
    enqueue.add_argument("--lease-minutes", type=positive_float, default=10.0,
                         help="how long one annotator holds a pair (default: %(default)s)")
    enqueue.set_defaults(handler=command_label_enqueue)
    export = label_commands.add_parser(
        "export", help="write pending pairs (or people's labels) as JSONL",
        description="Write the queued pairs that still need labels as JSONL (pair_id, round_id, prompt, "
        "completion_a, completion_b, labels_needed), to label in another tool. With --labels, write "
        "people's labels instead, in the format `import` reads.")
    _add_db_argument(export)
    export.add_argument("--round", type=positive_int, help="only this round (default: all)")
    export.add_argument("--labels", action="store_true", help="export people's labels, not pending pairs")
    export.add_argument("--out", type=Path, help="output file (default: standard output)")
    export.set_defaults(handler=command_label_export)
    import_ = label_commands.add_parser(
        "import", help="read people's labels from JSONL",
        description='Add labels made in another tool: one JSON object per line with "pair_id", "winner" '
        '(a, b, tie or both_bad: a and b as in the export), "annotator" and optionally "rationale". '
        "A label a person already gave is skipped; any bad line refuses the whole file.")
    import_.add_argument("file", type=Path, help="JSONL file")
    _add_db_argument(import_)
    import_.add_argument("--annotator", help="annotator for lines that name none")
    import_.set_defaults(handler=command_label_import)

    scheduled = commands.add_parser(
        "serve", help="run rounds on a cron schedule (a Prefect deployment)",
        description="Serve the flywheel as a Prefect deployment that runs --rounds rounds of the config "
        "file on a cron schedule, until stopped. Schedules need a Prefect server: the one PREFECT_API_URL "
        "names, else one at --server-host:--server-port, else flywheel starts `prefect server start` there "
        "(and stops it on exit). A run that comes due while one is going is cancelled, so rounds never "
        "overlap. Stopping pauses the schedule unless --keep-schedule.")
    scheduled.add_argument("--config", type=Path, required=True, help="YAML config file (as for `flywheel run --config`)")
    scheduled.add_argument("--cron", required=True, help='when to run, e.g. "0 3 * * *" (every day at 03:00 UTC)')
    scheduled.add_argument("--rounds", type=positive_int, help="rounds per scheduled run (default: the file's, else 1)")
    scheduled.add_argument("--keep-schedule", action="store_true",
                           help="leave the schedule active after stopping (for a server that outlives this command)")
    scheduled.add_argument("--server-host", default="127.0.0.1", help="where to find or start a Prefect server "
                           "when PREFECT_API_URL is not set (default: %(default)s)")
    scheduled.add_argument("--server-port", type=port_number, default=4200, help="its port (default: %(default)s)")
    scheduled.set_defaults(handler=command_serve)

    promote = commands.add_parser(
        "promote", help="make a checkpoint the policy, overriding the gate",
        description="Make a checkpoint (for example a candidate the gate kept but did not promote) "
        "the current policy: the next round samples from it. Recorded in the promotions table "
        "with --by and --reason.")
    promote.add_argument("--checkpoint", type=positive_int, required=True, metavar="ID",
                         help="checkpoint id (see the checkpoints table)")
    _add_override_arguments(promote)
    promote.set_defaults(handler=command_promote)
    rollback = commands.add_parser(
        "rollback", help="retire the current policy; the one promoted before it takes over",
        description="Mark the current policy rejected, so the checkpoint promoted before it is the "
        "policy again. Recorded in the promotions table with --by and --reason.")
    _add_override_arguments(rollback)
    rollback.set_defaults(handler=command_rollback)

    sql = commands.add_parser(
        "sql", help="read-only SQL against a flywheel database",
        description="Run one read-only SQL statement (SELECT or EXPLAIN) and print a table. "
        "Views: preferences, round_summary, judge_agreement, labelling_progress. Tables: prompts, "
        "completions, pairs, labels, judge_failures, completion_scores, checkpoints, rounds, train_steps, "
        "evals, annotators, label_requests, label_queue, label_leases.",
    )
    sql.add_argument("query", help='e.g. "SELECT * FROM round_summary"')
    _add_db_argument(sql)
    sql.set_defaults(handler=command_sql)

    status = commands.add_parser(
        "status", help="where a flywheel stands: rounds, policy, unfinished round, run lease",
        description="Print the per-round table (the one printed after a run), then the current "
        "policy checkpoint, any unfinished round and its last finished step, who holds the run "
        "lease, and the last promotion decisions. Read-only: safe while rounds run. With --plot, "
        "also write a PNG of accuracy, win rate, KL to the reference and completion length "
        "across the evaluated rounds.",
    )
    _add_db_argument(status)
    status.add_argument("--plot", type=Path, metavar="PATH", help="also write the curves across rounds as a PNG here")
    status.set_defaults(handler=command_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries(args.verbose)
    from judges import JudgeError, JudgeSpecError
    from storage.store import StoreError

    try:
        args.handler(args)
    except (UserError, StoreError, JudgeError, JudgeSpecError) as error:
        print(f"flywheel: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except EngineDiedError as error:
        print(f"flywheel: error: {error}", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    except KeyboardInterrupt:
        print("flywheel: interrupted; rerun to resume the unfinished round", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
