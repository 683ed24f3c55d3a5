"""Running unattended: the run lease, promotion overrides, and the bad-input battery."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from datetime import timedelta

import duckdb
import pytest

from flywheel.config import FlywheelConfig, JudgeConfig, SampleConfig
from flywheel.errors import UserError
from flywheel.lease import LeaseHeldError, RoundLease
from flywheel.promotion import promote_checkpoint, roll_back
from flywheel.rounds import Flywheel
from storage.lease import RunLease, current_lease, take_lease
from storage.migrations import MIGRATIONS_TABLE
from storage.queue import utc_now
from storage.store import SCHEMA_VERSION, Store, StoreError
from test_cli import assert_one_line_error, flywheel
from storage import tables

SCORE = "flywheel.examples.addition:addition_score"


# -- the run lease ------------------------------------------------------------------------


HOLD_LEASE = textwrap.dedent("""
    import sys, time
    from flywheel.lease import RoundLease
    from storage.store import Store
    lease = RoundLease(Store.create(sys.argv[1]), log=print, ttl_seconds=60)
    lease.acquire()
    print("held", flush=True)
    time.sleep(600)
""")


@contextmanager
def lease_held_by_another_process(db):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LEASE, str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


EXIT_WITHOUT_CLOSING = textwrap.dedent("""
    import sys, time
    from flywheel.lease import RoundLease
    from storage.store import Store
    lease = RoundLease(Store.create(sys.argv[1]), log=print, ttl_seconds=0.04)  # a beat every 10 ms
    lease.acquire()
    time.sleep(0.3)
""")


def test_a_process_that_never_releases_its_lease_still_exits_cleanly(tmp_path):
    # Its heartbeat thread must not be inside DuckDB when Python finalizes: that aborted the
    # process with status 134 after all its work (most exits, at this heartbeat rate).
    for attempt in range(5):
        result = subprocess.run([sys.executable, "-c", EXIT_WITHOUT_CLOSING, str(tmp_path / f"fw{attempt}.duckdb")],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "terminate called" not in result.stderr, result.stderr


def test_a_live_lease_refuses_a_second_process_and_a_dead_one_is_taken_over(tmp_path):
    db = tmp_path / "fw.duckdb"
    store = Store.create(db)
    messages = []
    with lease_held_by_another_process(db) as holder:
        lease = RoundLease(store, log=messages.append)
        with pytest.raises(LeaseHeldError, match=f"in use by another flywheel \\(pid {holder.pid} on"):
            lease.acquire()
        assert not lease.held
        holder.kill()
        holder.wait()
        lease.acquire()  # the holder is gone: its lease is stale at once, not after the ttl
    assert lease.held and len(messages) == 1
    assert messages[0].startswith("taking over the run lease of ") and messages[0].endswith(f": process {holder.pid} is gone")
    with store.transaction() as tx:
        assert current_lease(tx).pid == os.getpid()
    lease.release()
    with store.transaction() as tx:
        assert current_lease(tx) is None


def test_a_lease_from_another_host_waits_for_its_heartbeat_to_stop(tmp_path):
    store = Store.create(tmp_path / "fw.duckdb")
    now = utc_now()
    with store.transaction() as tx:
        take_lease(tx, RunLease("gpu-7:4242:ab", "gpu-7", 4242, 60.0, now, now - timedelta(seconds=30)))
    with pytest.raises(LeaseHeldError, match="pid 4242 on gpu-7"):
        RoundLease(store, log=print).acquire()
    with store.transaction() as tx:
        take_lease(tx, RunLease("gpu-7:4242:ab", "gpu-7", 4242, 60.0, now, now - timedelta(seconds=90)))
    messages = []
    lease = RoundLease(store, log=messages.append)
    lease.acquire()
    assert "heartbeat stopped 90 s ago" in messages[0]
    lease.release()


def test_the_heartbeat_keeps_a_lease_fresh(tmp_path):
    store = Store.create(tmp_path / "fw.duckdb")
    lease = RoundLease(store, log=print, ttl_seconds=0.4)
    lease.acquire()
    with store.transaction() as tx:
        first = current_lease(tx).heartbeat_at
    time.sleep(0.6)
    with store.transaction() as tx:
        assert current_lease(tx).heartbeat_at > first
    lease.release()


# -- promotion overrides ------------------------------------------------------------------


@pytest.fixture
def store_with_candidates(tmp_path):
    """The reference, candidate 2 (promoted by the gate) and candidate 3 (rejected)."""
    store = Store.create(tmp_path / "fw.duckdb")
    with store.transaction() as tx:
        tables.add_checkpoint(tx, "/ref", role="reference", status="promoted")
        tables.add_checkpoint(tx, "/c2", role="candidate", status="promoted", parent_checkpoint_id=1, round_id=1)
        tables.add_checkpoint(tx, "/c3", role="candidate", status="rejected", parent_checkpoint_id=2, round_id=2)
    return store


def test_promote_and_roll_back_are_recorded_with_who_and_why(store_with_candidates):
    store = store_with_candidates
    assert store.read(tables.current_policy).checkpoint_id == 2
    promote_checkpoint(store, 3, "alice", "the gate's held-out set is too small")
    assert store.read(tables.current_policy).checkpoint_id == 3
    assert roll_back(store, "bob", "regressed on our red-team prompts") == 2
    assert store.read(tables.current_policy).checkpoint_id == 2
    assert roll_back(store, "bob", None) == 1
    with pytest.raises(UserError, match="nothing to roll back"):
        roll_back(store, "bob", None)
    with pytest.raises(UserError, match="no checkpoint with id 9"):
        promote_checkpoint(store, 9, "alice", None)
    with pytest.raises(UserError, match="already the current policy"):
        promote_checkpoint(store, 1, "alice", None)
    _, rows = store.query("SELECT checkpoint_id, action, decided_by, reason, policy_before, policy_after "
                          "FROM promotions ORDER BY promotion_id")
    assert rows == [
        (3, "promote", "alice", "the gate's held-out set is too small", 2, 3),
        (3, "rollback", "bob", "regressed on our red-team prompts", 3, 2),
        (2, "rollback", "bob", None, 2, 1),
    ]


def test_promote_and_rollback_commands(store_with_candidates):
    db = str(store_with_candidates.path)
    result = flywheel("promote", "--db", db, "--checkpoint", "3", "--by", "alice", "--reason", "looks better")
    assert result.returncode == 0, result.stderr
    assert "checkpoint 3 is now the policy" in result.stderr
    result = flywheel("rollback", "--db", db, "--by", "bob")
    assert result.returncode == 0 and "checkpoint 2 is the policy again" in result.stderr
    assert_one_line_error(flywheel("promote", "--db", db, "--checkpoint", "42"), "no checkpoint with id 42")
    _, rows = Store.open(db).query("SELECT action, decided_by, reason FROM promotions ORDER BY promotion_id")
    assert rows == [("promote", "alice", "looks better"), ("rollback", "bob", None)]


# -- bad input ----------------------------------------------------------------------------


def write_prompts(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def make_flywheel(tiny_policy, tmp_path, prompts, **sample):
    config = FlywheelConfig(
        workdir=tmp_path / "w", reference_model=tiny_policy,
        prompts=write_prompts(tmp_path / "train.jsonl", prompts),
        heldout_prompts=write_prompts(tmp_path / "heldout.jsonl", ["1+2=", "3+4="]),
        judge=JudgeConfig(f"rule:{SCORE}"), sample=SampleConfig(**sample),
    )
    return Flywheel(config, log=print)


def test_empty_and_too_long_prompts_are_skipped_and_recorded(tiny_policy, tmp_path):
    too_long = "1+" * 40 + "1="  # 82 characters, one token each, against a context of 64
    flywheel_ = make_flywheel(tiny_policy, tmp_path, ["1+1=", "", "   ", too_long, "2+2="], max_model_len=64)
    try:
        flywheel_.initialise()
        flywheel_.initialise()  # every run does: nothing twice
        store = flywheel_.store
        assert sorted(p.text for p in store.read(tables.prompts, "train")) == ["1+1=", "2+2="]
        _, rows = store.query("SELECT split, row_number, reason, token_count FROM skipped_prompts ORDER BY row_number")
    finally:
        flywheel_.close()
    # close() let go of the file at once (the round runner's store keeps it 50 ms after a
    # call): this process can open it directly, which DuckDB refuses while it is attached.
    with duckdb.connect(str(flywheel_.config.database), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM skipped_prompts").fetchone()[0] == len(rows)
    assert rows[:2] == [("train", 2, "empty", None), ("train", 3, "empty", None)]
    assert rows[2][:2] == ("train", 4) and rows[2][2].startswith("longer than the context (83 > 63 tokens)")


def test_a_prompts_file_with_no_prompt_that_fits_is_an_error(tiny_policy, tmp_path):
    flywheel_ = make_flywheel(tiny_policy, tmp_path, ["9" * 100], max_model_len=64)
    try:
        with pytest.raises(UserError, match="every prompt in .*train.jsonl is longer than the context"):
            flywheel_.initialise()
    finally:
        flywheel_.close()


def run_args(model, prompts, workdir):
    return ["run", "--model", str(model), "--prompts", str(prompts), "--heldout", str(prompts),
            "--judge", f"rule:{SCORE}", "--score", SCORE, "--workdir", str(workdir)]


def test_empty_prompts_file(tiny_policy, tmp_path):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    assert_one_line_error(flywheel(*run_args(tiny_policy, empty, tmp_path / "w")), "is empty")
    write_prompts(empty, ["", " "])
    assert_one_line_error(flywheel(*run_args(tiny_policy, empty, tmp_path / "w")), "has no non-empty prompts")


def test_checkpoint_with_missing_weights(tiny_policy, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_policy, broken)
    (broken / "model.safetensors").unlink()
    prompts = write_prompts(tmp_path / "p.jsonl", ["1+1="])
    assert_one_line_error(flywheel(*run_args(broken, prompts, tmp_path / "w")), "has no weights")


def test_database_from_a_newer_flywheel(tmp_path):
    db = tmp_path / "fw.duckdb"
    Store.create(db)
    with duckdb.connect(str(db)) as conn:
        conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} (id, name) VALUES (?, 'm999_future')", [SCHEMA_VERSION + 1])
    for command in (["sql", "SELECT 1"], ["status"], ["rollback"]):
        assert_one_line_error(flywheel(*command, "--db", str(db)), f"newer than this flywheel's {SCHEMA_VERSION}")
    with duckdb.connect(str(db), read_only=True) as conn:  # untouched, still readable
        assert conn.execute(f"SELECT max(id) FROM {MIGRATIONS_TABLE}").fetchone()[0] == SCHEMA_VERSION + 1


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nothing can be written in: a read-only tmpfs as root (root ignores
    permissions), else a directory without write permission."""
    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_full_disk_simulated_by_a_read_only_directory(tiny_policy, tmp_path, read_only_dir):
    prompts = write_prompts(tmp_path / "p.jsonl", ["1+1="])
    result = flywheel(*run_args(tiny_policy, prompts, read_only_dir / "w"))
    assert_one_line_error(result, f"cannot create {read_only_dir / 'w'}")
    with pytest.raises(StoreError, match="cannot open .*Read-only file system|cannot open .*Permission denied"):
        Store.create(read_only_dir / "fw.duckdb")
    # A database that was fine stays readable after a write into the read-only place fails.
    db = tmp_path / "fw.duckdb"
    with Store.create(db).transaction() as tx:
        tables.add_prompts(tx, ["1+1="], "train")
    result = flywheel("label", "export", "--db", str(db), "--out", str(read_only_dir / "out.jsonl"))
    assert_one_line_error(result, "cannot write")
    assert Store.open(db).read(tables.count, "prompts") == 1
