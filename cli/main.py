"""The `flywheel` command. User mistakes print one line and exit 2, never a traceback.

Commands parse their arguments, call the library, and print: the rules live in `flywheel`
(`flywheel.config`, `flywheel.preflight`, `flywheel.label_admin`, ...), where tests and
notebooks reach them without a command line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Sequence

from flywheel.errors import EngineDiedError, UserError

# Rounds in the table that `flywheel status`, `run` and `demo` print: a file of 1,000
# rounds took 0.9 s to print them all, nearly all of it drawing the table's 1,000 rows.
ROUNDS_SHOWN = 20

DEFAULT_DEMO_DIR = Path("flywheel-demo")
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1

# Flags that are short for a config key (`dest`, key). They have no defaults of their own:
# a flag not given leaves the key to the config file, else to the config's default.
RUN_FLAGS = (("model", "reference_model"), ("prompts", "prompts"), ("heldout", "heldout_prompts"),
             ("workdir", "workdir"), ("judge", "judge.spec"), ("score", "eval.accuracy_score"),
             ("eval_judge", "eval.judge.spec"), ("pairing", "pair.strategy"), ("rounds", "rounds"))
DEMO_FLAGS = (("rounds", "rounds"), ("pairing", "pair.strategy"), ("beta", "train.beta"),
              ("lr", "train.learning_rate"), ("nll_weight", "train.nll_weight"))


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


def _flag_settings(args: argparse.Namespace, flags: Sequence[tuple[str, str]]) -> list[tuple[str, object]]:
    """The config keys the given flags set, in the order of `flags`."""
    settings = [(key, getattr(args, dest)) for dest, key in flags if getattr(args, dest, None) is not None]
    settings += [(f"judge.options.{key}", value) for key, value in _judge_options(getattr(args, "judge_option", []))]
    return settings


def _judge_options(items: Sequence[str]) -> list[tuple[str, str]]:
    """KEY=VALUE strings -> (key, value); the judge loader gives each value the type of the
    judge's parameter (`max_tokens=8` -> 8)."""
    options = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--judge-option takes KEY=VALUE, got {item!r}")
        options.append((key, value))
    return options


# -- commands -----------------------------------------------------------------------------


def _run_flywheel(config, rounds: int, judge=None, eval_judge=None) -> None:
    from flows.rounds import flywheel_rounds
    from judges import close_judge

    try:
        flywheel_rounds(config, rounds, judge=judge, eval_judge=eval_judge, log=_log)
    finally:  # the judges were built (and checked) here, so they are closed here
        for built in (judge, eval_judge):
            if built is not None:
                close_judge(built)


def command_demo(args: argparse.Namespace) -> None:
    from flywheel.config import check_override_keys
    from flywheel.examples.addition import DemoPolicyConfig, prepare_demo
    from flywheel.preflight import check_run_inputs

    started = time.monotonic()
    settings = _flag_settings(args, DEMO_FLAGS)
    check_override_keys(settings, args.overrides)  # before the policy is built
    workdir = args.dir.resolve()
    cache = Path(os.environ.get("FLYWHEEL_CACHE", Path.home() / ".cache" / "flywheel"))
    _log(f"demo policy: noisy-SFT tiny Llama on two-number addition (cache {cache})")
    policy = DemoPolicyConfig() if args.seed is None else DemoPolicyConfig(seed=args.seed)
    run_file = prepare_demo(workdir, policy, cache, _log, settings, args.overrides)
    judge, eval_judge = check_run_inputs(run_file.config)
    _log(f"running {run_file.rounds} rounds in {workdir} (config: {workdir / 'flywheel.yaml'})")
    _run_flywheel(run_file.config, run_file.rounds, judge, eval_judge)
    _print_round_table(run_file.config.database)
    _log(f"done in {time.monotonic() - started:.0f} s. Query it: flywheel sql --db {run_file.config.database} "
         "\"SELECT * FROM round_summary\"")


def command_run(args: argparse.Namespace) -> None:
    from flywheel.config import load_run_config
    from flywheel.preflight import check_run_inputs

    run_file = load_run_config(args.config, _flag_settings(args, RUN_FLAGS), args.overrides)
    judge, eval_judge = check_run_inputs(run_file.config)
    _run_flywheel(run_file.config, run_file.rounds, judge, eval_judge)
    _print_round_table(run_file.config.database)


def command_judge(args: argparse.Namespace) -> None:
    from flywheel.label_admin import relabel_round
    from storage.store import Store

    done = relabel_round(Store.open(args.db), args.judge, dict(_judge_options(args.judge_option)), args.round,
                         args.batch_size)
    _log(f"round {done.round_id}: {done.labeller} labelled {done.result.labelled} pairs"
         f" ({done.result.failed} undecided, {done.result.already_done} judged before)")
    _print_table(*done.agreement, title="agreement with other labellers (all rounds)")


def command_annotators_add(args: argparse.Namespace) -> None:
    from judges.human import new_annotator
    from storage.store import Store

    print(new_annotator(Store.open(args.db), args.name))
    _log(f"annotator {args.name} added; the line above is their token, shown only this once. "
         f"They log in with it at `flywheel label serve --db {args.db}`.")


def command_annotators_list(args: argparse.Namespace) -> None:
    from storage import queue
    from storage.store import Store

    _print_table(["annotator", "status", "labels"], Store.open(args.db).read(queue.annotators))


def command_annotators_revoke(args: argparse.Namespace) -> None:
    from storage import queue
    from storage.store import Store

    store = Store.open(args.db)
    try:
        with store.transaction() as tx:
            queue.revoke_annotator(tx, args.name, queue.utc_now())
    except queue.QueueError as error:
        raise UserError(str(error)) from None
    _log(f"annotator {args.name} revoked: their token stops working at once, also on a running "
         "`flywheel label serve`; their labels stay")


def command_label_serve(args: argparse.Namespace) -> None:
    import socket

    import uvicorn

    from judges.labelling_app import create_app

    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        raise UserError("give --ssl-keyfile and --ssl-certfile together")
    for path in (args.ssl_keyfile, args.ssl_certfile):
        if path is not None and not path.is_file():
            raise UserError(f"{path} does not exist or is not a file")
    app = create_app(args.db)
    try:  # uvicorn would log a bind failure and exit 3; say it in one line instead
        socket.create_server((args.host, args.port)).close()
    except OSError as error:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}") from error
    scheme = "https" if args.ssl_certfile else "http"
    _log(f"labelling page: {scheme}://{args.host}:{args.port}/  (database {args.db}; Ctrl-C stops)")
    if scheme == "http" and args.host not in ("127.0.0.1", "localhost", "::1"):
        _log("WARNING: tokens travel in clear over plain HTTP: give --ssl-keyfile/--ssl-certfile, or serve "
             "behind an HTTPS proxy")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                    ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile)
    except OSError as error:  # a key or certificate that does not load (ssl.SSLError is an OSError)
        raise UserError(f"cannot serve HTTPS with {args.ssl_certfile} and {args.ssl_keyfile}: {error}") from error


def command_label_enqueue(args: argparse.Namespace) -> None:
    from flywheel.label_admin import enqueue_for_people
    from storage.store import Store

    done = enqueue_for_people(Store.open(args.db), args.round, args.labels_per_pair, args.lease_minutes)
    _log(f"round {args.round}: {done.pairs} pairs queued for people, {args.labels_per_pair} label(s) each "
         f"({done.labels} given so far). People's labels of it are compared, not trained on.")


def command_label_export(args: argparse.Namespace) -> None:
    import json

    from flywheel.label_admin import export_rows
    from flywheel.table_formats import jsonable
    from storage.store import Store

    rows = export_rows(Store.open(args.db), args.round, labels=args.labels)
    try:
        out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    except OSError as error:
        raise UserError(f"cannot write {args.out}: {error.strerror or error}") from error
    try:
        for row in rows:
            out.write(json.dumps(jsonable(row), ensure_ascii=False) + "\n")
    finally:
        if args.out:
            out.close()
    _log(f"exported {len(rows)} {'labels' if args.labels else 'pending pairs'}"
         + (f" to {args.out}" if args.out else ""))


def command_label_import(args: argparse.Namespace) -> None:
    from flywheel.label_admin import import_labels_file
    from storage.store import Store

    added, present = import_labels_file(Store.open(args.db), args.file, args.annotator, args.add_annotators)
    _log(f"imported {added} labels from {args.file} ({present} were already there)")


def command_serve(args: argparse.Namespace) -> None:
    from flows.rounds import deployment_name, serve_rounds
    from flows.server import check_cron, find_or_start_server
    from flywheel.config import load_config_file
    from flywheel.preflight import check_run_inputs
    from judges import close_judge

    # A script that starts this in the background (`nohup flywheel serve ... &`) hands it
    # SIGINT ignored, and Python then leaves it ignored: Ctrl-C and `kill -INT` must still stop it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    check_cron(args.cron)
    run_file = load_config_file(args.config)
    rounds = args.rounds or run_file.rounds
    # Each scheduled run builds its own judges; these were built only to check them now.
    for judge in check_run_inputs(run_file.config):
        if judge is not None:
            close_judge(judge)

    api_url, server = find_or_start_server(args.server_host, args.server_port,
                                           run_file.config.workdir / "prefect-server.log", _log)
    name = f"flywheel-rounds/{deployment_name(args.config)}"
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


def command_sql(args: argparse.Namespace) -> None:
    from flywheel.table_formats import format_rows
    from storage.store import Store

    columns, rows = Store.open(args.db).query(args.query)
    sys.stdout.write(format_rows(columns, rows, args.format, width=_terminal_width()))


def command_export(args: argparse.Namespace) -> None:
    import datasets

    from flywheel.export import parse_round_ids, write_preferences

    datasets.disable_progress_bars()  # the summary line below is the output
    rounds = parse_round_ids(args.rounds) if args.rounds is not None else None
    done = write_preferences(args.db, args.out, args.format, rounds=rounds, judge=args.judge,
                             people_only=args.people_only, include_all=args.all)
    _log(f"wrote {done.rows} preference rows ({done.format}, "
         f"{'conversational' if done.conversational else 'standard'} format) to {done.path}")


def command_status(args: argparse.Namespace) -> None:
    from flywheel.report import display_rows, plot_rounds, recent_promotions, status_lines
    from storage.store import Store

    _print_round_table(args.db, latest=None if args.all_rounds else ROUNDS_SHOWN)
    store = Store.open(args.db)
    for line in status_lines(store):
        print(line)
    columns, rows = recent_promotions(store)
    if rows:
        _print_table(columns, display_rows(rows), title="last promotion decisions (newest first)")
    if args.plot is not None:
        _log(f"plot: {plot_rounds(store, args.plot)}")


def _print_round_table(database: Path, latest: int | None = ROUNDS_SHOWN) -> None:
    """The per-round table of a database (`flywheel.report.round_table`), its `latest`
    rounds (all with None), and a line saying how many earlier rounds it leaves out."""
    from flywheel.report import ROUND_TABLE_TITLE, display_rows, round_table
    from storage import tables
    from storage.store import Store

    store = Store.open(database)
    columns, rows = round_table(store, latest)
    _print_table(columns, display_rows(rows), title=ROUND_TABLE_TITLE)
    left_out = store.read(tables.count, "rounds") - len(rows)
    if left_out > 0:
        print(f"({left_out} earlier round{'s' if left_out > 1 else ''} not shown: flywheel status --db {database} "
              f"--all-rounds, or flywheel sql --db {database} \"SELECT * FROM round_summary\")")


def _print_table(columns: Sequence[str], rows: Sequence[Sequence], title: str | None = None) -> None:
    from flywheel.table_formats import text_table

    sys.stdout.write(text_table(columns, rows, title, width=_terminal_width()))


def _terminal_width() -> int | None:
    """A terminal's width, to fold long values in; None (as wide as the values) elsewhere."""
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


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

OVERRIDES = """overrides:
  KEY=VALUE arguments set any config key, dotted: train.beta=0.2 sample.n=8
  train.loss_type=ipo judge.options.name=x. Values are read as YAML (true, 3e-4, null,
  [a, b]); paths are relative to the current directory. They apply after the config
  file and the flags, in order. Every key and its default: docs/configuration.md."""


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", default=[],
                        help="set a config key, e.g. train.beta=0.2 (see overrides below)")


def _add_judge_arguments(parser: argparse.ArgumentParser, required: bool, key: str = "") -> None:
    parser.add_argument("--judge", required=required, metavar="SPEC",
                        help=f"who labels the pairs (see judge specs below){key}")
    parser.add_argument("--judge-option", action="append", default=[], metavar="KEY=VALUE",
                        help=f"keyword option for the judge; repeatable{key and ' (sets judge.options.KEY)'}")


def _add_db_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", type=Path, default=DEFAULT_DEMO_DIR / "flywheel.duckdb",
                        help="database file (default: %(default)s)")


def _add_override_arguments(parser: argparse.ArgumentParser) -> None:
    _add_db_argument(parser)
    parser.add_argument("--by", default=os.environ.get("USER") or "unknown",
                        help="who decided, recorded in the promotions table (default: $USER, %(default)s)")
    parser.add_argument("--reason", help="why, recorded in the promotions table")


class _Formatter(argparse.HelpFormatter):
    """Wraps descriptions; keeps the lines of a text that has its own (the epilogs)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    from flywheel.export import EXPORT_FORMATS
    from flywheel.pairing import STRATEGIES
    from flywheel.table_formats import FORMATS

    parser = argparse.ArgumentParser(
        prog="flywheel",
        description="An online-DPO data flywheel: sample, pair, label, train, evaluate, promote.",
    )
    parser.add_argument("--verbose", action="store_true", help="show vLLM and Prefect logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     help="what to do (flywheel COMMAND --help for its options)")
    raw = _Formatter

    demo = commands.add_parser(
        "demo", help="run the demo flywheel on two-number addition",
        description="Build (or reuse) a noisy tiny policy for two-number addition and run flywheel rounds "
        "on it; prints a per-round table. The directory gets `policy` (a link to the policy checkpoint), "
        "`prompts/train.jsonl`, `prompts/heldout.jsonl`, and `flywheel.yaml`, the config the demo ran "
        "(`flywheel run --config DIR/flywheel.yaml` runs more rounds of it): every setting the demo used is there. "
        "Flags below set the config key they name.",
        epilog=OVERRIDES, formatter_class=raw,
    )
    demo.add_argument("--dir", type=Path, default=DEFAULT_DEMO_DIR, help="working directory (default: %(default)s)")
    demo.add_argument("--rounds", type=positive_int, help="rounds to run (key rounds)")
    demo.add_argument("--seed", type=int, help="seed of the demo policy and of the flywheel (default: the demo policy's, 0)")
    demo.add_argument("--pairing", choices=STRATEGIES,
                      help="how completions of a prompt become pairs (key pair.strategy)")
    demo.add_argument("--beta", type=float, help="DPO beta (key train.beta)")
    demo.add_argument("--lr", type=float, help="DPO learning rate (key train.learning_rate)")
    demo.add_argument("--nll-weight", type=float,
                      help="weight of the chosen-answer NLL term added to DPO (key train.nll_weight; 0 is pure DPO)")
    _add_overrides(demo)
    demo.set_defaults(handler=command_demo)

    run = commands.add_parser(
        "run", help="run rounds on your own model, prompts and judge",
        description="Run flywheel rounds as a config file says (--config FILE; see the README), with "
        "KEY=VALUE overrides of its keys. Each flag below is short for the config key it names and has "
        "no default of its own; without --config, the flags and overrides give every required key "
        "(workdir, reference_model, prompts, heldout_prompts, judge). Bad input is one line and exit "
        "code 2, before any engine starts.",
        epilog=f"{OVERRIDES}\n\n{JUDGE_SPECS}", formatter_class=raw,
    )
    run.add_argument("--config", type=Path, metavar="FILE",
                     help="YAML file with the flywheel's settings; relative paths in it are from its directory")
    run.add_argument("--rounds", type=positive_int, help="rounds to run (key rounds; default: the file's, else 1)")
    run.add_argument("--model", type=Path, help="reference (SFT) save_pretrained directory (key reference_model)")
    run.add_argument("--prompts", type=Path,
                     help="train prompts: .jsonl, .csv or .parquet with a 'prompt' column (key prompts)")
    run.add_argument("--heldout", type=Path, help="held-out prompts, same format (key heldout_prompts)")
    run.add_argument("--workdir", type=Path, help="where the database and checkpoints go (key workdir)")
    _add_judge_arguments(run, required=False, key=" (key judge.spec)")
    run.add_argument("--score", metavar="MODULE:FUNCTION",
                     help="verifier score(prompt, completion) -> float for held-out accuracy "
                     "(key eval.accuracy_score)")
    run.add_argument("--eval-judge", metavar="SPEC",
                     help="who judges candidate against incumbent (key eval.judge.spec; default: the judge)")
    run.add_argument("--pairing", choices=STRATEGIES,
                     help="how completions of a prompt become pairs (key pair.strategy)")
    _add_overrides(run)
    run.set_defaults(handler=command_run)

    judge = commands.add_parser(
        "judge", help="(re)label a round's pairs with another judge, after the fact",
        description="Label the pairs of a round with a judge and store the labels under its name "
        "and version, beside the labels already there; pairs it judged before are skipped. "
        "Prints its agreement with the other labellers. Training data is unaffected: a round "
        "trains only on its own judge's labels.",
        epilog=JUDGE_SPECS, formatter_class=raw,
    )
    _add_judge_arguments(judge, required=True)
    _add_db_argument(judge)
    judge.add_argument("--round", type=positive_int, help="round to label (default: the latest with pairs)")
    judge.add_argument("--batch-size", type=positive_int, default=256,
                       help="pairs per judge call and per transaction (default: %(default)s)")
    judge.set_defaults(handler=command_judge)

    annotators = commands.add_parser(
        "annotators", help="people who label through the labelling page",
        description="Add an annotator (prints their token once), list annotators, or revoke one.")
    annotator_commands = annotators.add_subparsers(dest="annotators_command", required=True, metavar="ACTION",
                                                   help="add, list or revoke")
    add = annotator_commands.add_parser("add", help="add an annotator and print their token",
                                        description="Add an annotator and print a token for the labelling "
                                        "page and API. Only a hash of it is stored: keep it.")
    add.add_argument("name", help="annotator name: letters, digits, _.@- (e.g. alice)")
    _add_db_argument(add)
    add.set_defaults(handler=command_annotators_add)
    listing = annotator_commands.add_parser("list", help="list annotators, active or revoked, and their labels",
                                            description="List annotators, whether each is active or "
                                            "revoked, and how many labels each gave.")
    _add_db_argument(listing)
    listing.set_defaults(handler=command_annotators_list)
    revoke = annotator_commands.add_parser(
        "revoke", help="stop an annotator's token at once (their labels stay)",
        description="Revoke an annotator: their token stops working at once, also on a labelling server "
        "that is running; their live leases end and their labels stay.")
    revoke.add_argument("name", help="the annotator's name")
    _add_db_argument(revoke)
    revoke.set_defaults(handler=command_annotators_revoke)

    label = commands.add_parser(
        "label", help="the human labelling queue: serve the page, enqueue, export, import",
        description="People label queued pairs in a browser. A round whose judge is 'human' queues "
        "its pairs itself; `enqueue` queues an AI-judged round's pairs for comparison.")
    label_commands = label.add_subparsers(dest="label_command", required=True, metavar="ACTION",
                                           help="serve, enqueue, export or import")
    serve = label_commands.add_parser("serve", help="serve the labelling page and JSON API",
                                      description="Serve the labelling page and its JSON API. Annotators "
                                      "log in with the token from `flywheel annotators add`.")
    _add_db_argument(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: %(default)s; 0.0.0.0 for your whole network)")
    serve.add_argument("--port", type=port_number, default=8000, help="port (default: %(default)s)")
    serve.add_argument("--ssl-keyfile", type=Path, help="TLS private key: serve HTTPS (with --ssl-certfile)")
    serve.add_argument("--ssl-certfile", type=Path, help="TLS certificate chain: serve HTTPS (with --ssl-keyfile)")
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
        "A label a person already gave is skipped. Any bad line (bad JSON, an unknown pair id, someone who "
        "is not an annotator) refuses the whole file, and every bad line is named.")
    import_.add_argument("file", type=Path, help="JSONL file")
    _add_db_argument(import_)
    import_.add_argument("--annotator", help="annotator for lines that name none")
    import_.add_argument("--add-annotators", action="store_true",
                         help="add people the file names who are not annotators yet (else the file is refused)")
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
        description="Run one read-only SQL statement (SELECT or EXPLAIN) and print its result. "
        "Views: preferences, round_summary, judge_agreement, labelling_progress. Tables: prompts, "
        "completions, pairs, labels, judge_failures, completion_scores, checkpoints, rounds, train_steps, "
        "evals, annotators, label_requests, label_queue, label_leases.",
    )
    sql.add_argument("query", help='e.g. "SELECT * FROM round_summary"')
    _add_db_argument(sql)
    sql.add_argument("--format", choices=FORMATS, default="table",
                     help="table (default: long values fold in a terminal, never cut), csv (with a header "
                     "row), json (an array of objects) or markdown (a pipe table); csv and json carry "
                     "every value whole")
    sql.set_defaults(handler=command_sql)

    export = commands.add_parser(
        "export", help="write preference pairs for TRL's DPOTrainer (Parquet or JSONL)",
        description="Write one row per label: prompt, chosen, rejected, round_id, pair_id, judge "
        "(name@version), annotator and confidence, in TRL's preference format. Plain-text prompts give "
        "strings; prompts given as messages give TRL's conversational format (a message list, and one "
        "assistant message as chosen and as rejected), and a mix of both is all conversational. By "
        "default the labels each round trained on; ties and both_bad are left out unless --all. "
        "Load it with datasets.load_dataset (see docs/export.md).")
    _add_db_argument(export)
    export.add_argument("--out", type=Path, required=True, metavar="PATH",
                        help="file to write (replaced whole, never half-written); its suffix .parquet or "
                        ".jsonl names the format unless --format does")
    export.add_argument("--format", metavar="FORMAT",
                        help=f"{' or '.join(EXPORT_FORMATS)} (default: from --out's suffix)")
    export.add_argument("--rounds", metavar="IDS", help="only these rounds, e.g. 1,2,5-7 (default: all)")
    labellers = export.add_mutually_exclusive_group()
    labellers.add_argument("--judge", metavar="NAME",
                           help="the labels of the judge with this name, any version, instead of the "
                           "rounds' own judges'")
    labellers.add_argument("--people-only", action="store_true",
                           help="people's labels only (the human judge), one row per person's label")
    export.add_argument("--all", action="store_true",
                        help="keep ties and both_bad too (completion a as chosen) and add a winner column")
    export.set_defaults(handler=command_export)

    status = commands.add_parser(
        "status", help="where a flywheel stands: rounds, policy, unfinished round, run lease",
        description=f"Print the per-round table of the latest {ROUNDS_SHOWN} rounds (the one printed after a run), "
        "then the current "
        "policy checkpoint, any unfinished round and its last finished step, who holds the run "
        "lease, and the last promotion decisions. Read-only: safe while rounds run. With --plot, "
        "also write a PNG of accuracy, win rate, KL to the reference and completion length "
        "across the evaluated rounds.",
    )
    _add_db_argument(status)
    status.add_argument("--plot", type=Path, metavar="PATH", help="also write the curves across rounds as a PNG here")
    status.add_argument("--all-rounds", action="store_true",
                        help=f"print every round in the table (default: the latest {ROUNDS_SHOWN})")
    status.set_defaults(handler=command_status)
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments; KEY=VALUE overrides may come anywhere after the command. A flag the
    command lacks (`run --beta`) is one line that names the key it may mean."""
    from flywheel.config import dotted_keys

    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras and hasattr(args, "overrides"):
        flags = [extra for extra in extras if extra.startswith("-")]
        if flags:
            name = flags[0].lstrip("-").partition("=")[0].replace("-", "_")
            keys = [key for key in dotted_keys() if key.rpartition(".")[2] == name]
            hint = f"set {keys[0]}=VALUE instead" if keys else "settings are KEY=VALUE arguments (train.beta=0.2)"
            raise UserError(f"unrecognized arguments: {' '.join(flags)} ({hint}; see flywheel {args.command} --help)")
        args.overrides = [*args.overrides, *extras]
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parse(argv)
    except UserError as error:
        print(f"flywheel: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
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
