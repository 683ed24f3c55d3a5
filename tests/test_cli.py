"""The command line as a user runs it: help everywhere, one-line errors with exit code 2."""

import argparse
import csv
import io
import json
import subprocess
import sys
from datetime import datetime

import duckdb
import pytest

from cli.main import build_parser
from flywheel.table_formats import format_rows
from storage import tables
from storage.store import Store

SCORE = "flywheel.examples.addition:addition_score"
RULE = f"rule:{SCORE}"


def flywheel(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("command", [[], ["demo"], ["run"], ["judge"], ["sql"], ["export"], ["status"]])
def test_every_command_has_help(command):
    result = flywheel(*command, "--help")
    assert result.returncode == 0 and "usage: flywheel" in result.stdout


def _subparsers(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*path, name))


def test_every_command_and_flag_has_help_text():
    commands = list(_subparsers(build_parser()))
    assert len(commands) >= 15  # flywheel, its commands, and the label and annotators actions
    for path, parser in commands:
        assert parser.description, f"flywheel {' '.join(path)} has no description"
        for action in parser._actions:
            assert action.help, f"flywheel {' '.join(path)} {action.option_strings or action.dest} has no help"


def test_rounds_must_be_positive():
    result = flywheel("demo", "--rounds", "0")
    assert result.returncode == 2
    assert "must be at least 1, got 0" in result.stderr and "Traceback" not in result.stderr


def test_missing_model_path(tmp_path):
    result = flywheel("run", "--model", str(tmp_path / "nope"), "--prompts", "p.jsonl", "--heldout", "h.jsonl",
                      "--judge", RULE, "--score", SCORE, "--workdir", str(tmp_path / "w"))
    assert_one_line_error(result, "does not exist")


@pytest.mark.parametrize("prompts_text, fragment", [(None, "does not exist"), ('{"question": "1+1="}\n', "no 'prompt' column")])
def test_bad_prompts_file(tiny_policy, tmp_path, prompts_text, fragment):
    prompts = tmp_path / "prompts.jsonl"
    if prompts_text is not None:
        prompts.write_text(prompts_text)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"prompt": "1+1="}) + "\n")
    result = flywheel("run", "--model", str(tiny_policy), "--prompts", str(prompts), "--heldout", str(heldout),
                      "--judge", RULE, "--score", SCORE, "--workdir", str(tmp_path / "w"))
    assert_one_line_error(result, fragment)


@pytest.mark.parametrize("judge_args, fragment", [
    (["--judge", RULE, "--score", "nosuchpackage.judges:score"],
     "score function 'nosuchpackage.judges:score' does not import"),
    (["--judge", "nosuchpackage.judges:MyJudge"], "judge 'nosuchpackage.judges:MyJudge' does not import"),
    (["--judge", "flywheel.config:FlywheelConfig"], "cannot be built with options []"),
    (["--judge", "flywheel.examples.addition:ALPHABET"], "does not fit the Judge interface"),
    (["--judge", "reward-model:/no/such/model"], "has no config.json"),
    (["--judge", RULE, "--judge-option", "batch"], "takes KEY=VALUE"),
    ([], "missing required key 'judge'"),
])
def test_judges_that_cannot_be_built(tiny_policy, tmp_path, judge_args, fragment):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+1="}) + "\n")
    result = flywheel("run", "--model", str(tiny_policy), "--prompts", str(prompts), "--heldout", str(prompts),
                      *judge_args, "--workdir", str(tmp_path / "w"))
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "w").exists()  # refused before anything was created


def test_a_label_budget_below_one_is_refused(tmp_path):
    # The former --max-pairs-per-round flag is the key pair.max_pairs_per_round.
    result = flywheel("run", "--model", "m", "--prompts", "p.jsonl", "--heldout", "h.jsonl", "--workdir", "w",
                      "--judge", RULE, "pair.max_pairs_per_round=0", cwd=tmp_path)
    assert_one_line_error(result, "override pair.max_pairs_per_round=0: pair.max_pairs_per_round must be >= 1")
    from flywheel.config import load_run_config

    run_file = load_run_config(None, [("reference_model", "m"), ("prompts", "p.jsonl"), ("heldout_prompts", "h.jsonl"),
                                      ("workdir", "w"), ("judge.spec", RULE)], ["pair.max_pairs_per_round=5"])
    assert run_file.config.pair.max_pairs_per_round == 5


@pytest.mark.parametrize("flag, key", [("--beta", "train.beta"), ("--max-tokens", "sample.max_tokens"),
                                       ("--loss-type", "train.loss_type"),
                                       ("--gradient-checkpointing", "train.gradient_checkpointing")])
def test_removed_training_flags_name_their_key(tmp_path, flag, key):
    result = flywheel("run", "--config", str(tmp_path / "unused.yaml"), flag, "1")
    assert_one_line_error(result, f"unrecognized arguments: {flag} (set {key}=VALUE instead")


# -- engine settings: refused in one line before vLLM or Prefect start ---------------------


def _engine_run(tmp_path, tiny_policy, *args):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+1="}) + "\n")
    return flywheel("run", "--model", str(tiny_policy), "--prompts", str(prompts), "--heldout", str(prompts),
                    "--workdir", str(tmp_path / "w"), "--judge", RULE, *args)


@pytest.mark.parametrize("args, fragment", [
    (["sample.max_model_len=1024"],
     "sample.max_model_len (1024) is longer than the context of {model} (max_position_embeddings = 64 in its "
     "config.json): set sample.max_model_len to at most 64"),
    (["sample.max_tokens=64"], "sample.max_tokens (64) must be less than sample.max_model_len (64)"),
    (["sample.gpu_memory_utilization=0"], "sample.gpu_memory_utilization must be in (0, 1], got 0"),
    (["sample.gpu_memory_utilization=1.5"], "sample.gpu_memory_utilization must be in (0, 1], got 1.5"),
    (["sample.dtype=float64"], "sample.dtype must be one of ('auto', 'half', 'float16', 'bfloat16'"),
    (["--judge", "llm:{model}", "--judge-option", "max_model_len=1024"],
     "judge.options.max_model_len (1024) is longer than the context of {model}"),
    (["--judge", "llm:{model}", "--judge-option", "dtype=int8"], "judge.options.dtype must be one of"),
    (["--judge", "llm:{model}", "--judge-option", "max_model_len=8", "--judge-option", "max_tokens=8"],
     "judge.options.max_tokens (8) must be less than judge.options.max_model_len (8)"),
    (["--judge", "llm:{model}", "--judge-option", "gpu_memory_utilization=0.9"],
     "sample.gpu_memory_utilization (0.3) and judge.options.gpu_memory_utilization (0.9) add up to more than 1"),
    (["eval.judge.spec=llm:{model}", "eval.judge.options.max_model_len=100"],
     "eval.judge.options.max_model_len (100) is longer than the context"),
])
def test_engine_settings_are_checked_before_anything_starts(tiny_policy, tmp_path, args, fragment):
    result = _engine_run(tmp_path, tiny_policy, *(arg.format(model=tiny_policy) for arg in args))
    assert_one_line_error(result, fragment.format(model=tiny_policy))
    assert not (tmp_path / "w").exists()  # refused before anything was created


# -- flywheel sql ---------------------------------------------------------------------------


def test_sql_reads_and_refuses_writes(tmp_path):
    db = tmp_path / "fw.duckdb"
    with Store.create(db).transaction() as tx:
        tables.add_prompts(tx, ["1+1="], "train")
    result = flywheel("sql", "--db", str(db), "SELECT text, split FROM prompts")
    assert result.returncode == 0 and "1+1=" in result.stdout and "train" in result.stdout
    result = flywheel("sql", "--db", str(db), "DELETE FROM prompts")
    assert_one_line_error(result, "read-only")
    assert Store.open(db).read(tables.count, "prompts") == 1


def test_sql_on_files_that_are_not_flywheel_databases(tmp_path):
    other = tmp_path / "other.duckdb"
    with duckdb.connect(str(other)) as conn:
        conn.execute("CREATE TABLE t (x INT)")
    assert_one_line_error(flywheel("sql", "--db", str(other), "SELECT 1"), "not a flywheel database")
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 1000)
    assert_one_line_error(flywheel("sql", "--db", str(text), "SELECT 1"), "not a readable DuckDB database")
    assert_one_line_error(flywheel("sql", "--db", str(tmp_path / "none.duckdb"), "SELECT 1"), "no flywheel database")


# A value far wider than its column's name, as `rule:mypkg.judges:sc…` was cut before.
LONG = "rule:mypkg.judges:score_" + "very_long_name_" * 12 + "end"
QUERY = ("SELECT ? AS judge, 3 AS n, 0.25 AS rate, TIMESTAMP '2026-01-02 03:04:05' AS at, [1, 2] AS ids, "
         "NULL AS missing, 'a|b\nc, \"d\"' AS awkward")


@pytest.fixture(scope="module")
def sql_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("sql") / "fw.duckdb"
    with Store.create(db).transaction() as tx:
        tables.add_prompts(tx, [LONG], "train")
    return db


def sql(db, fmt=None):
    result = flywheel("sql", "--db", str(db), *(["--format", fmt] if fmt else []),
                      QUERY.replace("?", "(SELECT text FROM prompts)"))
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_sql_table_keeps_long_values_whole(sql_db):
    out = sql(sql_db, "table")
    assert LONG in out and "…" not in out and "2026-01-02T03:04:05" in out
    assert sql(sql_db) == out  # the default format
    # In a narrow terminal the table folds a long value onto more lines, and loses none of it.
    narrow = format_rows(["judge"], [(LONG,)], "table", width=40)
    assert max(len(line) for line in narrow.splitlines()) <= 40
    folded = "".join(line.strip("│┃ ") for line in narrow.splitlines()[3:-1])
    assert folded == LONG


def test_sql_csv_has_a_header_and_whole_values(sql_db):
    rows = list(csv.reader(io.StringIO(sql(sql_db, "csv"))))
    assert rows == [["judge", "n", "rate", "at", "ids", "missing", "awkward"],
                    [LONG, "3", "0.25", "2026-01-02T03:04:05", "[1, 2]", "", 'a|b\nc, "d"']]


def test_sql_json_is_an_array_of_objects(sql_db):
    assert json.loads(sql(sql_db, "json")) == [
        {"judge": LONG, "n": 3, "rate": 0.25, "at": "2026-01-02T03:04:05", "ids": [1, 2], "missing": None,
         "awkward": 'a|b\nc, "d"'}]


def test_sql_markdown_is_a_pipe_table(sql_db):
    lines = sql(sql_db, "markdown").splitlines()
    assert lines[0] == "| judge | n | rate | at | ids | missing | awkward |"
    assert lines[1] == "| --- | --- | --- | --- | --- | --- | --- |"
    assert lines[2] == f"| {LONG} | 3 | 0.25 | 2026-01-02T03:04:05 | [1, 2] |  | a\\|b<br>c, \"d\" |"
    assert len(lines) == 3


def test_formats_of_values_duckdb_returns():
    row = (datetime(2026, 1, 2), {"k": [1.5, float("nan")]}, b"\x00\x01")
    assert json.loads(format_rows(["t", "s", "b"], [row], "json")) == [
        {"t": "2026-01-02T00:00:00", "s": {"k": [1.5, None]}, "b": "AAE="}]
    assert format_rows(["x"], [], "json") == "[]\n"
    assert format_rows(["x"], [], "csv") == "x\n"
    with pytest.raises(ValueError, match="format must be one of"):
        format_rows(["x"], [], "yaml")


# -- the commands' rules, reached without the command line -----------------------------------


def test_relabel_and_enqueue_rules(tmp_path):
    from flywheel.errors import UserError
    from flywheel.label_admin import enqueue_for_people, relabel_round
    from queue_data import round_with_pairs

    store = Store.create(tmp_path / "fw.duckdb")
    with pytest.raises(UserError, match="has no pairs to judge yet"):
        relabel_round(store, RULE, {})
    round_id = round_with_pairs(store, 5)
    with pytest.raises(UserError, match="round 9 has no pairs"):
        relabel_round(store, RULE, {}, round_id=9)
    with pytest.raises(UserError, match="people label through the queue"):
        relabel_round(store, "human", {})
    with pytest.raises(UserError, match="has no judge yet"):
        enqueue_for_people(store, round_id)
    done = relabel_round(store, RULE, {"name": "sums", "version": "1"})  # the latest round with pairs
    assert (done.round_id, done.labeller, done.result.labelled, done.result.already_done) == (round_id, "sums@1", 5, 0)
    assert relabel_round(store, RULE, {"name": "sums", "version": "1"}).result.already_done == 5
    with store.transaction() as tx:
        tables.claim_round_judge(tx, round_id, "sums", "1")
    with pytest.raises(UserError, match="at most 10080 minutes"):
        enqueue_for_people(store, round_id, lease_minutes=1e9)
    progress = enqueue_for_people(store, round_id, labels_per_pair=2)
    assert (progress.pairs, progress.labels_needed) == (5, 10)


def test_label_files(tmp_path):
    from flywheel.errors import UserError
    from flywheel.label_admin import agreement_with, export_rows, import_labels_file, read_label_lines
    from queue_data import round_with_pairs

    store = Store.create(tmp_path / "fw.duckdb")
    round_id = round_with_pairs(store, 2)
    _, rows = store.query("SELECT pair_id FROM pairs ORDER BY pair_id")
    lines = tmp_path / "labels.jsonl"
    lines.write_text(json.dumps({"pair_id": rows[0][0], "winner": "a", "prompt": "ignored"}) + "\n\n"
                     + json.dumps({"pair_id": rows[1][0], "winner": "b", "annotator": "bob"}) + "\n")
    with pytest.raises(UserError, match=r"labels.jsonl: 1 bad line, nothing imported: line 1: needs a pair_id"):
        read_label_lines(lines)
    assert [(n, label.annotator) for n, label in read_label_lines(lines, "alice")] == [(1, "alice"), (3, "bob")]
    with pytest.raises(UserError, match=r"line 1: 'alice' is not an annotator"):
        import_labels_file(store, lines, "alice")
    assert import_labels_file(store, lines, "alice", add_annotators=True) == (2, 0)
    assert import_labels_file(store, lines, "alice") == (0, 2)
    assert [(row["winner"], row["annotator"]) for row in export_rows(store, round_id, labels=True)] == [
        ("a", "alice"), ("b", "bob")]
    columns, _ = agreement_with(store, "human@1 (alice)")
    assert columns[:2] == ["judge_a", "judge_b"]
    lines.write_text('{"pair_id": 999999, "winner": "a", "annotator": "x"}\n')
    with pytest.raises(UserError, match="line 1: no pair with id 999999"):
        import_labels_file(store, lines)
    lines.write_text("[1]\n")
    with pytest.raises(UserError, match="nothing imported: line 1: each line must be a JSON object"):
        import_labels_file(store, lines)
