"""`flywheel serve` with a one-minute cron runs rounds without a person, on a Prefect
server it starts itself, and pauses its schedule when stopped."""

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def done_rounds(db: Path) -> int:
    try:
        with duckdb.connect(str(db), read_only=True) as conn:
            return conn.execute("SELECT count(*) FROM rounds WHERE state = 'done'").fetchone()[0]
    except duckdb.Error:  # not created yet, or the flywheel holds it this moment
        return -1


def test_serve_runs_two_rounds_on_a_cron_and_pauses_when_stopped(tmp_path, tiny_policy, demo_prompts):
    train, heldout = demo_prompts
    config = tmp_path / "nightly.yaml"
    config.write_text(f"""
workdir: work
reference_model: {tiny_policy}
prompts: {train}
heldout_prompts: {heldout}
judge: rule:flywheel.examples.addition:addition_score
sample: {{prompts_per_round: 32, n: 4, max_tokens: 6, dtype: float32, enforce_eager: true, gpu_memory_utilization: 0.1}}
train: {{batch_size: 16, learning_rate: 1.0e-4}}
eval: {{samples_per_prompt: 1, accuracy_score: flywheel.examples.addition:addition_score}}
""")
    prefect_home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_PROFILES_PATH=str(prefect_home / "profiles.toml"),
               # Schedule and poll every few seconds rather than every minute and ten seconds.
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5", PREFECT_RUNNER_POLL_FREQUENCY="2")
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        serve = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--config", str(config), "--cron", "* * * * *",
             "--server-port", str(free_port())],
            stdout=log, stderr=subprocess.STDOUT, env=env,
            # As a shell starts a background job: SIGINT ignored. Stopping it must still work.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    db = tmp_path / "work" / "flywheel.duckdb"
    try:
        deadline = time.monotonic() + 480
        while done_rounds(db) < 2:
            assert serve.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, f"two rounds did not finish:\n{log_path.read_text()[-4000:]}"
            time.sleep(2)
    finally:
        serve.send_signal(signal.SIGINT)
        serve.wait(timeout=120)
    output = log_path.read_text()
    assert "no Prefect server found: starting `prefect server start`" in output
    assert "serving flywheel-rounds/nightly" in output
    # No error of ours. (Prefect may log one of its own on shutdown when a run it stops has
    # just exited: "Failed to kill process ... No such process".)
    assert not re.search(r'File "[^"]*/(flywheel|flows|storage|judges)/', output), output[-4000:]

    with duckdb.connect(str(db), read_only=True) as conn:
        rounds = conn.execute("SELECT round_id, state FROM rounds ORDER BY round_id").fetchall()
        assert rounds[:2] == [(1, "done"), (2, "done")]
        # Two runs, each one round, each from the policy promoted before it.
        assert conn.execute("SELECT count(*) FROM evals").fetchone()[0] >= 2
    assert (tmp_path / "work" / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The server's own database: the deployment is limited to one run at a time
    # (cancel-new), its runs completed, and stopping `serve` paused it (Prefect pauses the
    # deployment, so its schedule creates no runs until it is resumed).
    with sqlite3.connect(prefect_home / "prefect.db") as server_db:
        name, paused, options = server_db.execute("SELECT name, paused, concurrency_options FROM deployment").fetchone()
        assert name == "nightly" and paused
        assert "CANCEL_NEW" in options
        states = [row[0] for row in server_db.execute("SELECT state_type FROM flow_run")]
        assert states.count("COMPLETED") >= 2, states
