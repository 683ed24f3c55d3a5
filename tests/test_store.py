"""The DuckDB store on real files: migrations, refusals, round-trips, views, locking."""

import subprocess
import sys
import textwrap

import duckdb
import pytest

from storage.migrations import MIGRATIONS_TABLE
from storage.records import Completion, Label, Pair
from storage.store import (
    SCHEMA_VERSION,
    NewerSchemaError,
    NotAFlywheelDatabase,
    ReadOnlyQueryError,
    Store,
    StoreLockedError,
)


def _completion(prompt_id, checkpoint_id, index, text, tokens, round_id=1):
    return Completion(prompt_id, checkpoint_id, "train", index, text, [1, 4, 5], tokens,
                      -1.5, "stop", {"temperature": 1.0, "seed": 7}, round_id=round_id)


@pytest.fixture
def store(tmp_path):
    return Store.create(tmp_path / "fw.duckdb")


def test_migrations_are_numbered_and_recorded(store):
    rows = duckdb.connect(str(store.path)).execute(f"SELECT id, name FROM {MIGRATIONS_TABLE} ORDER BY id").fetchall()
    assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
    assert rows[0][1] == "m001_core_tables"
    assert store.schema_version() == SCHEMA_VERSION
    Store.open(store.path)  # reopening applies nothing twice
    assert len(duckdb.connect(str(store.path)).execute(f"SELECT * FROM {MIGRATIONS_TABLE}").fetchall()) == SCHEMA_VERSION


def test_newer_schema_is_refused(store):
    with duckdb.connect(str(store.path)) as conn:
        conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} (id, name) VALUES (?, 'm999_future')", [SCHEMA_VERSION + 1])
    with pytest.raises(NewerSchemaError, match="newer than this flywheel"):
        Store.open(store.path)


def test_other_duckdb_files_and_garbage_are_refused(tmp_path):
    other = tmp_path / "other.duckdb"
    with duckdb.connect(str(other)) as conn:
        conn.execute("CREATE TABLE sales (x INTEGER)")
    with pytest.raises(NotAFlywheelDatabase, match="not a flywheel database"):
        Store.open(other)
    garbage = tmp_path / "notes.duckdb"
    garbage.write_text("this is not a database\n" * 100)
    with pytest.raises(NotAFlywheelDatabase):
        Store.open(garbage)
    with pytest.raises(NotAFlywheelDatabase, match="no flywheel database"):
        Store.open(tmp_path / "missing.duckdb")
    assert not (tmp_path / "missing.duckdb").exists()


def test_completions_round_trip_with_token_ids_and_lineage(store):
    with store.transaction() as tx:
        (prompt_id,) = tx.add_prompts(["2+3="], "train")
        ck = tx.add_checkpoint("/models/sft", "reference", "promoted")
        ids = tx.add_completions([_completion(prompt_id, ck, 0, "5", [8, 2]), _completion(prompt_id, ck, 1, "6", [9, 2])])
    got = store.completions(round_id=1)
    assert [c.completion_id for c in got] == ids
    assert got[0].token_ids == [8, 2] and got[0].prompt_token_ids == [1, 4, 5]
    assert got[1].checkpoint_id == ck and got[1].sampling_params == {"temperature": 1.0, "seed": 7}


def test_add_prompts_is_idempotent_and_keeps_order(store):
    with store.transaction() as tx:
        first = tx.add_prompts(["a", "b"], "train")
        again = tx.add_prompts(["b", "a", "c"], "train")
    assert again[:2] == [first[1], first[0]]
    assert store.count("prompts") == 3


def test_preferences_view_resolves_chosen_and_rejected(store):
    with store.transaction() as tx:
        (prompt_id,) = tx.add_prompts(["2+3="], "train")
        ck = tx.add_checkpoint("/m", "reference", "promoted")
        round_id = tx.start_round(ck, ck, seed=1, config={})
        a, b, c, d = tx.add_completions([_completion(prompt_id, ck, i, t, [i, 2], round_id)
                                         for i, t in enumerate(["5", "6", "7", "8"])])
        p1, p2, p3 = tx.add_pairs([Pair(round_id, prompt_id, a, b, "random"), Pair(round_id, prompt_id, c, d, "random"),
                                   Pair(round_id, prompt_id, a, c, "random")])
        assert tx.claim_round_judge(round_id, "rule", "1") == ("rule", "1")
        assert tx.claim_round_judge(round_id, "other", "9") == ("rule", "1")  # the first claim holds
        tx.add_labels([Label(p1, "a", "rule", "1"), Label(p2, "b", "rule", "1"), Label(p3, "tie", "rule", "1")])
    _, rows = store.query("SELECT pair_id, prompt, chosen, rejected, judge FROM preferences ORDER BY pair_id")
    assert rows == [(p1, "2+3=", "5", "6", "rule"), (p2, "2+3=", "8", "7", "rule")]
    triples = store.preference_triples(round_id)
    assert [(t.chosen_token_ids, t.rejected_token_ids) for t in triples] == [([0, 2], [1, 2]), ([3, 2], [2, 2])]
    _, summary = store.query("SELECT round_id, pairs, labels, preferences, promoted FROM round_summary")
    assert summary == [(round_id, 3, 3, 2, False)]


def test_bad_winner_is_refused_and_nothing_is_written(store):
    from storage.store import StoreError

    with pytest.raises(StoreError, match="winner"):
        with store.transaction() as tx:
            tx.add_labels([Label(1, "a", "j", "1"), Label(2, "left", "j", "1")])
    assert store.count("labels") == 0


@pytest.mark.parametrize("sql", [
    "DELETE FROM prompts",
    "DROP TABLE labels",
    "CREATE TABLE x (i INT)",
    "SELECT 1; DELETE FROM prompts",
    "COPY prompts TO '/tmp/x.csv'",
])
def test_query_refuses_writes(store, sql):
    with store.transaction() as tx:
        tx.add_prompts(["keep me"], "train")
    with pytest.raises(ReadOnlyQueryError):
        store.query(sql)
    assert store.count("prompts") == 1


def test_lock_held_by_another_process_is_retried_then_reported(store):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import duckdb, sys, time
            conn = duckdb.connect({str(store.path)!r})
            print("locked", flush=True)
            time.sleep(float(sys.stdin.readline()))
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        impatient = Store(store.path, lock_timeout_s=0.5)
        with pytest.raises(StoreLockedError, match="locked by another process"):
            with impatient.transaction():
                pass
        # The holder lets go after 1 s; a patient store waits for it instead of failing.
        holder.stdin.write("1\n")
        holder.stdin.flush()
        patient = Store(store.path, lock_timeout_s=30)
        with patient.transaction() as tx:
            tx.add_prompts(["after the lock"], "train")
        assert patient.count("prompts") == 1
    finally:
        holder.kill()
