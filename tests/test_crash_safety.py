"""SIGKILL a real `flywheel run --config` in the middle of sampling, of labelling and of
training; each rerun continues, and the finished round has every row exactly once. A
second process on the same database meanwhile is refused by the run lease."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from flywheel.lease import HOLDER_ENV
from flywheel.pairing import form_pairs
from storage.store import Store

pytestmark = pytest.mark.slow

PROMPTS_PER_ROUND, N, EPOCHS, TRAIN_BATCH = 128, 4, 60, 4
TOO_LONG = "1+" * 40 + "1="  # longer than the context of 64: skipped and recorded, not a crash


def write_config(tmp_path: Path, tiny_policy: Path, demo_prompts) -> Path:
    train, heldout = demo_prompts
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(train.read_text() + json.dumps({"prompt": ""}) + "\n" + json.dumps({"prompt": TOO_LONG}) + "\n")
    config = tmp_path / "flywheel.yaml"
    config.write_text(f"""
workdir: work
reference_model: {tiny_policy}
prompts: prompts.jsonl
heldout_prompts: {heldout}
judge:
  spec: rule:slow_score:slow_addition_score
  batch_size: 8
sample:
  prompts_per_round: {PROMPTS_PER_ROUND}
  batch_prompts: 2
  n: {N}
  max_tokens: 6
  dtype: float32
  enforce_eager: true
  gpu_memory_utilization: 0.1
train:
  batch_size: {TRAIN_BATCH}
  epochs: {EPOCHS}
  learning_rate: 1.0e-4
eval:
  samples_per_prompt: 2
  accuracy_score: flywheel.demo_task:addition_score
""")
    return config


def start_run(config: Path, env: dict) -> subprocess.Popen:
    # Output to a file: a pipe nobody reads until the end could fill and stall the run.
    log = open(config.parent / "run.log", "a")
    process = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "run", "--config", str(config)],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    return process


def output(config: Path) -> str:
    return (config.parent / "run.log").read_text()[-3000:]


def query(db: Path, sql: str):
    """One value, read while the flywheel process may hold the file (then: None)."""
    try:
        with duckdb.connect(str(db), read_only=True) as conn:
            row = conn.execute(sql).fetchone()
    except duckdb.Error:
        return None
    return row[0] if row else None


def processes_left_by(pids: list[int]) -> list[int]:
    """Live processes that a killed flywheel process (one of `pids`) started."""
    prefixes = [f"{HOLDER_ENV}={socket.gethostname()}:{pid}:".encode() for pid in pids]
    left = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            zombie = "zombie" in (proc / "status").read_text()
        except (OSError, ValueError):
            continue
        if not zombie and any(v.startswith(p) for v in environ for p in prefixes):
            left.append(int(proc.name))
    return left


def kill_when(process: subprocess.Popen, moment, what: str, killed: list[int], then_wait_s: float = 0.0,
              timeout_s: float = 400) -> None:
    deadline = time.monotonic() + timeout_s
    while not moment():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (rc {process.returncode}) before {what}:\n{output(Path(process.args[-1]))}")
        assert time.monotonic() < deadline, f"never reached {what}"
        time.sleep(0.02)
    time.sleep(then_wait_s)
    assert process.poll() is None, f"the run ended before it was killed in {what}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed.append(process.pid)


def test_killed_runs_resume_without_loss_or_duplicates_and_a_second_process_is_refused(
        tmp_path, tiny_policy, demo_prompts, prefect_harness):
    from prefect.settings import get_current_settings

    config = write_config(tmp_path, tiny_policy, demo_prompts)
    db = tmp_path / "work" / "flywheel.duckdb"
    # The session's Prefect API, so that each process does not start its own (~15 s).
    env = {**os.environ, "PREFECT_API_URL": get_current_settings().api.url,
           "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def state():
        return query(db, "SELECT state FROM rounds WHERE round_id = 1")

    killed = []

    # 1. Mid-sampling: some batches stored, the round not sampled.
    run = start_run(config, env)
    kill_when(run, lambda: state() == "started" and (query(db, "SELECT count(*) FROM completions") or 0) > 0,
              "sampling", killed)
    assert processes_left_by(killed)  # its vLLM engine outlives it...
    partial = query(db, "SELECT count(*) FROM completions")
    assert state() == "started" and 0 < partial < PROMPTS_PER_ROUND * N

    # 2. Mid-labelling: the rerun samples only what is missing, pairs, and starts labelling.
    run = start_run(config, env)
    kill_when(run, lambda: state() == "paired" and (query(db, "SELECT count(*) FROM labels") or 0) > 0,
              "labelling", killed)
    pairs = query(db, "SELECT count(*) FROM pairs")
    assert state() == "paired" and 0 < query(db, "SELECT count(*) FROM labels") < pairs

    # 3. Mid-training: the reference log-probs are cached, and a second later the policy
    # is loaded and the steps are running (the whole training takes several seconds).
    run = start_run(config, env)
    kill_when(run, lambda: state() == "labelled" and (query(db, "SELECT count(*) FROM reference_logps") or 0) > 0,
              "training", killed, then_wait_s=1.0)
    assert state() == "labelled" and query(db, "SELECT count(*) FROM checkpoints WHERE role = 'candidate'") == 0

    # 4. The last rerun finishes; a second process meanwhile is refused with the lease message.
    run = start_run(config, env)
    deadline = time.monotonic() + 300
    # (The killed run's lease is still there until this run takes it over.)
    while query(db, "SELECT pid FROM run_lease") != run.pid:
        assert run.poll() is None and time.monotonic() < deadline, output(config)
        time.sleep(0.1)
    second = subprocess.run([sys.executable, "-m", "flywheel.cli", "run", "--config", str(config)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 2, second.stderr
    assert "is in use by another flywheel (pid " in second.stderr and "Traceback" not in second.stderr
    assert run.wait(timeout=600) == 0, output(config)
    # ...until the next run takes the lease over and stops it.
    assert processes_left_by(killed) == []
    # (The runs killed in sampling and in labelling had started an engine; the one killed in
    # training had not: it resumed after sampling.)
    assert (config.parent / "run.log").read_text().count("process(es) it left running") == 2

    # Pairs: exactly those the round's seeded pairing forms from its completions, once each.
    store = Store.open(db)
    expected = form_pairs(store.completions(round_id=1, purpose="train"), 1, "random",
                          seed=store.get_round(1).seed, scores={})

    with duckdb.connect(str(db), read_only=True) as conn:
        def one(sql):
            return conn.execute(sql).fetchone()

        assert one("SELECT count(*), min(state), max(state) FROM rounds") == (1, "done", "done")
        # Completions: every prompt of the round n times, none twice.
        assert one("SELECT count(*), count(DISTINCT (prompt_id, sample_index)), count(DISTINCT prompt_id) "
                   "FROM completions WHERE purpose = 'train'") == (PROMPTS_PER_ROUND * N,) * 2 + (PROMPTS_PER_ROUND,)
        stored_pairs = set(conn.execute("SELECT completion_a_id, completion_b_id FROM pairs").fetchall())
        pair_count = one("SELECT count(*) FROM pairs")[0]
        # (How many pairs random pairing forms depends on how varied the trained policy's
        # samples are: the equality with `expected` is what the code guarantees.)
        assert len(stored_pairs) == pair_count == len(expected) > 0
        assert stored_pairs == {(p.completion_a_id, p.completion_b_id) for p in expected}
        # Labels: exactly one per pair from the round's judge, none lost, none twice.
        assert one("SELECT count(*), count(DISTINCT pair_id) FROM labels") == (pair_count, pair_count)
        preferences = one("SELECT preferences FROM round_summary")[0]
        assert one("SELECT count(*) FROM checkpoints WHERE role = 'candidate'") == (1,)
        assert one("SELECT count(*), count(DISTINCT step) FROM train_steps") == (
            EPOCHS * math.ceil(preferences / TRAIN_BATCH),) * 2
        assert one("SELECT count(*) FROM evals") == (1,)
        # The two bad prompts were skipped and recorded, the rest of the file used.
        skipped = conn.execute("SELECT reason FROM skipped_prompts WHERE split = 'train' ORDER BY row_number").fetchall()
        assert [r[0].split(" (")[0] for r in skipped] == ["empty", "longer than the context"]
        assert one("SELECT count(*) FROM prompts WHERE split = 'train'") == (256,)
        assert one("SELECT count(*) FROM run_lease") == (0,)  # released at the end
