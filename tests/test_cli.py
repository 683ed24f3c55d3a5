"""The command line as a user runs it: help everywhere, one-line errors with exit code 2."""

import json
import subprocess
import sys

import duckdb
import pytest

from storage.store import Store


def flywheel(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("command", [[], ["demo"], ["run"], ["judge"], ["sql"], ["status"]])
def test_every_command_has_help(command):
    result = flywheel(*command, "--help")
    assert result.returncode == 0 and "usage: flywheel" in result.stdout


def test_rounds_must_be_positive():
    result = flywheel("demo", "--rounds", "0")
    assert result.returncode == 2
    assert "must be at least 1, got 0" in result.stderr and "Traceback" not in result.stderr


def test_missing_model_path(tmp_path):
    result = flywheel("run", "--model", str(tmp_path / "nope"), "--prompts", "p.jsonl", "--heldout", "h.jsonl",
                      "--score", "flywheel.examples.addition:addition_score", "--workdir", str(tmp_path / "w"))
    assert_one_line_error(result, "does not exist")


@pytest.mark.parametrize("prompts_text, fragment", [(None, "does not exist"), ('{"question": "1+1="}\n', "no 'prompt' column")])
def test_bad_prompts_file(tiny_policy, tmp_path, prompts_text, fragment):
    prompts = tmp_path / "prompts.jsonl"
    if prompts_text is not None:
        prompts.write_text(prompts_text)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"prompt": "1+1="}) + "\n")
    result = flywheel("run", "--model", str(tiny_policy), "--prompts", str(prompts), "--heldout", str(heldout),
                      "--score", "flywheel.examples.addition:addition_score", "--workdir", str(tmp_path / "w"))
    assert_one_line_error(result, fragment)


@pytest.mark.parametrize("judge_args, fragment", [
    (["--score", "nosuchpackage.judges:score"], "score function 'nosuchpackage.judges:score' does not import"),
    (["--judge", "nosuchpackage.judges:MyJudge"], "judge 'nosuchpackage.judges:MyJudge' does not import"),
    (["--judge", "flywheel.config:FlywheelConfig"], "cannot be built with options []"),
    (["--judge", "flywheel.examples.addition:ALPHABET"], "does not fit the Judge interface"),
    (["--judge", "reward-model:/no/such/model"], "has no config.json"),
    (["--judge", "rule:flywheel.examples.addition:addition_score", "--judge-option", "batch"], "takes KEY=VALUE"),
    ([], "give --judge SPEC, or --score"),
])
def test_judges_that_cannot_be_built(tiny_policy, tmp_path, judge_args, fragment):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+1="}) + "\n")
    result = flywheel("run", "--model", str(tiny_policy), "--prompts", str(prompts), "--heldout", str(prompts),
                      *judge_args, "--workdir", str(tmp_path / "w"))
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "w").exists()  # refused before anything was created


def test_a_label_budget_below_one_is_refused(tmp_path):
    result = flywheel("run", "--config", str(tmp_path / "unused.yaml"), "--max-pairs-per-round", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == "flywheel run: error: argument --max-pairs-per-round: must be at least 1, got 0"
    from cli.main import _run_config_from_flags, build_parser

    args = build_parser().parse_args(["run", "--model", "m", "--prompts", "p.jsonl", "--heldout", "h.jsonl",
                                      "--workdir", "w", "--score", "m:f", "--max-pairs-per-round", "5"])
    config, _ = _run_config_from_flags(args)
    assert config.pair.max_pairs_per_round == 5


def test_sql_reads_and_refuses_writes(tmp_path):
    db = tmp_path / "fw.duckdb"
    with Store.create(db).transaction() as tx:
        tx.add_prompts(["1+1="], "train")
    result = flywheel("sql", "--db", str(db), "SELECT text, split FROM prompts")
    assert result.returncode == 0 and "1+1=" in result.stdout and "train" in result.stdout
    result = flywheel("sql", "--db", str(db), "DELETE FROM prompts")
    assert_one_line_error(result, "read-only")
    assert Store.open(db).count("prompts") == 1


def test_sql_on_files_that_are_not_flywheel_databases(tmp_path):
    other = tmp_path / "other.duckdb"
    with duckdb.connect(str(other)) as conn:
        conn.execute("CREATE TABLE t (x INT)")
    assert_one_line_error(flywheel("sql", "--db", str(other), "SELECT 1"), "not a flywheel database")
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 1000)
    assert_one_line_error(flywheel("sql", "--db", str(text), "SELECT 1"), "not a readable DuckDB database")
    assert_one_line_error(flywheel("sql", "--db", str(tmp_path / "none.duckdb"), "SELECT 1"), "no flywheel database")
