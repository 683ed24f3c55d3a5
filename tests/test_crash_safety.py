"""SIGKILL a real `flywheel run --config` in the middle of sampling, of labelling and of
training; each rerun continues, and the finished round has every row exactly once. A
second process on the same database meanwhile is refused by the run lease."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from flywheel.lease import started_processes, still_running, stop_processes
from flywheel.pairing import form_pairs
from storage.records import Prompt
from storage.store import Store
from storage import tables

pytestmark = pytest.mark.slow

PROMPTS_PER_ROUND, N, EPOCHS, TRAIN_BATCH = 128, 4, 60, 4
TOO_LONG = "1+" * 40 + "1="  # longer than the context of 64: skipped and recorded, not a crash


def write_config(tmp_path: Path, tiny_policy: Path, demo_prompts, judge: str = "rule:slow_score:slow_addition_score") -> Path:
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
  spec: {judge}
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
  accuracy_score: flywheel.examples.addition:addition_score
""")
    return config


def start_run(config: Path, env: dict) -> subprocess.Popen:
    # Output to a file: a pipe nobody reads until the end could fill and stall the run.
    log = open(config.parent / "run.log", "a")
    process = subprocess.Popen([sys.executable, "-m", "cli", "run", "--config", str(config)],
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


def left_running(processes: dict[int, int]) -> list[int]:
    """Those of `processes` (pid: start time) that still run."""
    return [pid for pid, start in processes.items() if still_running(pid, start)]


def run_environment() -> dict:
    """The environment of a `flywheel run` subprocess: the session's Prefect API (so that
    each run does not start its own, ~15 s), the tests' modules importable, and the size
    of a login shell's (several KB), where vLLM's renamed processes no longer keep the end
    of their environment readable in /proc."""
    from prefect.settings import get_current_settings

    env = {**os.environ, "PREFECT_API_URL": get_current_settings().api.url,
           "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    padding = 8192 - sum(len(k) + len(v) + 2 for k, v in env.items())
    return {**env, "FLYWHEEL_TEST_PADDING": "x" * max(padding, 0)}


def kill_when(process: subprocess.Popen, moment, what: str, killed: dict[int, int], then_wait_s: float = 0.0,
              timeout_s: float = 400) -> None:
    """SIGKILL `process` alone (not its process group), as a user or the OOM killer would,
    once `moment()`; adds the processes it had started to `killed` (pid: start time)."""
    deadline = time.monotonic() + timeout_s
    while not moment():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (rc {process.returncode}) before {what}:\n{output(Path(process.args[-1]))}")
        assert time.monotonic() < deadline, f"never reached {what}"
        time.sleep(0.02)
    time.sleep(then_wait_s)
    assert process.poll() is None, f"the run ended before it was killed in {what}"
    killed.update(started_processes(process.pid))
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_killed_runs_resume_without_loss_or_duplicates_and_a_second_process_is_refused(
        tmp_path, tiny_policy, demo_prompts, prefect_harness, policy_sampler):
    config = write_config(tmp_path, tiny_policy, demo_prompts)
    db = tmp_path / "work" / "flywheel.duckdb"
    env = run_environment()

    def state():
        return query(db, "SELECT state FROM rounds WHERE round_id = 1")

    killed = {}

    # 1. Mid-sampling: some batches stored, the round not sampled.
    run = start_run(config, env)
    kill_when(run, lambda: state() == "started" and (query(db, "SELECT count(*) FROM completions") or 0) > 0,
              "sampling", killed)
    assert left_running(killed)  # its vLLM engine outlives it...
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
    second = subprocess.run([sys.executable, "-m", "cli", "run", "--config", str(config)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 2, second.stderr
    assert "is in use by another flywheel (pid " in second.stderr and "Traceback" not in second.stderr
    assert run.wait(timeout=600) == 0, output(config)
    # ...until the next run takes the lease over and stops it.
    assert left_running(killed) == []
    # (The runs killed in sampling and in labelling had started an engine; the one killed in
    # training had not: it resumed after sampling.)
    assert (config.parent / "run.log").read_text().count("process(es) it left running") == 2

    # Sampling resumed after the kill drew exactly what one uninterrupted engine draws:
    # each prompt has its own seed, and an engine's samples do not depend on the batch.
    store = Store.open(db)
    stored = store.read(tables.completions, round_id=1, purpose="train")
    texts = dict(store.query("SELECT prompt_id, text FROM prompts")[1])
    prompts = [Prompt(prompt_id, texts[prompt_id], "train") for prompt_id in sorted({c.prompt_id for c in stored})]
    uninterrupted = policy_sampler.sample(tiny_policy, 1, prompts, n=N, temperature=1.0, seed=store.read(tables.get_round, 1).seed,
                                          purpose="train", round_id=1, progress=False)
    assert sorted((c.prompt_id, c.sample_index, c.text) for c in stored) == sorted(
        (c.prompt_id, c.sample_index, c.text) for c in uninterrupted)

    # Pairs: exactly those the round's seeded pairing forms from its completions (those cut
    # at max_tokens left out: pair.truncated is drop), once each.
    finished = [c for c in store.read(tables.completions, round_id=1, purpose="train") if c.finish_reason != "length"]
    expected = form_pairs(finished, 1, "random", seed=store.read(tables.get_round, 1).seed, scores={})

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


def titles(pids) -> dict[int, str]:
    """Process titles (vLLM renames its processes `VLLM::EngineCore`, `VLLM::Worker...`)."""
    found = {}
    for pid in pids:
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return found


def test_an_engine_that_dies_mid_sampling_ends_the_run_in_one_line_and_the_round_resumes(
        tmp_path, tiny_policy, demo_prompts, prefect_harness):
    config = write_config(tmp_path, tiny_policy, demo_prompts)
    db = tmp_path / "work" / "flywheel.duckdb"
    env = run_environment()
    run = start_run(config, env)
    deadline = time.monotonic() + 400
    while (query(db, "SELECT count(*) FROM completions") or 0) == 0:
        assert run.poll() is None and time.monotonic() < deadline, output(config)
        time.sleep(0.02)
    children = titles(pid for pid, _ in started_processes(run.pid))
    engines = [pid for pid, title in children.items() if "EngineCore" in title]
    assert len(engines) == 1, children
    try:
        # Killed in the middle of an engine call, or between two: both end the run.
        os.kill(engines[0], signal.SIGKILL)
        assert run.wait(timeout=120) == 1, output(config)
    finally:
        stop_processes(started_processes(run.pid))
        run.kill()
        run.wait()
    log = output(config)
    assert [line for line in log.splitlines() if line.startswith("flywheel: error:")] == [
        "flywheel: error: the vLLM engine stopped while sampling: its process was killed by SIGKILL (often the "
        "kernel's out-of-memory killer); the batch it was sampling was not stored: rerun to resume the round"]
    assert "Traceback" not in log
    # The batches stored before it died are kept, and the round waits to be resumed.
    stored = query(db, "SELECT count(*) FROM completions")
    assert query(db, "SELECT state FROM rounds WHERE round_id = 1") == "started"
    assert 0 < stored < PROMPTS_PER_ROUND * N


def test_a_run_killed_in_training_leaves_no_engine_once_the_next_run_takes_over(
        tmp_path, tiny_policy, demo_prompts, prefect_harness):
    config = write_config(tmp_path, tiny_policy, demo_prompts, judge="rule:flywheel.examples.addition:addition_score")
    db = tmp_path / "work" / "flywheel.duckdb"
    env = run_environment()
    killed = {}
    # This run sampled, so its engine is alive (asleep) while it trains.
    run = start_run(config, env)
    kill_when(run, lambda: query(db, "SELECT state FROM rounds WHERE round_id = 1") == "labelled"
              and (query(db, "SELECT count(*) FROM reference_logps") or 0) > 0, "training", killed, then_wait_s=1.0)
    assert any("EngineCore" in title for title in titles(killed).values()), titles(killed)
    assert left_running(killed)
    rerun = start_run(config, env)
    try:
        deadline = time.monotonic() + 300
        while query(db, "SELECT pid FROM run_lease") != rerun.pid:
            assert rerun.poll() is None and time.monotonic() < deadline, output(config)
            time.sleep(0.1)
        assert left_running(killed) == []
        assert "process(es) it left running" in output(config)
    finally:
        stop_processes(started_processes(rerun.pid))
        rerun.kill()
        rerun.wait()
