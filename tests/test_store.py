"""The DuckDB store on real files: migrations, refusals, round-trips, views, locking."""

import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest

from storage.migrations import MIGRATIONS_TABLE
from storage.records import Completion, Label, Pair
from storage.store import (
    SCHEMA_VERSION,
    StoreError,
    NewerSchemaError,
    NotAFlywheelDatabase,
    ReadOnlyQueryError,
    Store,
    StoreLockedError,
)
from storage import tables


ROOT = Path(__file__).resolve().parents[1]


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
        (prompt_id,) = tables.add_prompts(tx, ["2+3="], "train")
        ck = tables.add_checkpoint(tx, "/models/sft", "reference", "promoted")
        ids = tables.add_completions(tx, [_completion(prompt_id, ck, 0, "5", [8, 2]), _completion(prompt_id, ck, 1, "6", [9, 2])])
    got = store.read(tables.completions, round_id=1)
    assert [c.completion_id for c in got] == ids
    assert got[0].token_ids == [8, 2] and got[0].prompt_token_ids == [1, 4, 5]
    assert got[1].checkpoint_id == ck and got[1].sampling_params == {"temperature": 1.0, "seed": 7}


def test_completions_sharing_a_prompt_list_and_params_store_each_row_its_own(store):
    # The sampler shares one prompt-token list and one params dict among a prompt's samples;
    # the store converts each distinct object once and must still give every row its own.
    shared_tokens, shared_params = [1, 4, 5], {"seed": 11, "temperature": 1.0, "n": 2}
    other_params = {"seed": 12, "temperature": 0.5, "n": 2}
    with store.transaction() as tx:
        first, second = tables.add_prompts(tx, ["2+3=", "10+20="], "train")
        ck = tables.add_checkpoint(tx, "/models/sft", "reference", "promoted")
        records = [
            Completion(first, ck, "train", 0, "5", shared_tokens, [8, 2], -0.5, "stop", shared_params, round_id=1),
            Completion(second, ck, "train", 0, "30", [1, 6, 7, 8, 9], [], None, "length", other_params, round_id=1),
            Completion(first, ck, "train", 1, "6", shared_tokens, [9, 2, 2], -0.7, "stop", shared_params, round_id=1),
            Completion(second, ck, "train", 1, "31", [1, 6, 7, 8, 9], [3], None, "stop",
                       {"temperature": 0.5, "seed": 12, "n": 2}, round_id=1),
        ]
        tables.add_completions(tx, records)
    got = store.read(tables.completions, round_id=1)
    assert [(c.prompt_token_ids, c.token_ids, c.sampling_params) for c in got] == [
        (c.prompt_token_ids, c.token_ids, c.sampling_params) for c in records]
    _, rows = store.query("SELECT sampling_params::VARCHAR, num_tokens FROM completions ORDER BY completion_id")
    # JSON with sorted keys, so equal params are equal strings in SQL
    assert rows == [('{"n":2,"seed":11,"temperature":1.0}', 2), ('{"n":2,"seed":12,"temperature":0.5}', 0),
                    ('{"n":2,"seed":11,"temperature":1.0}', 3), ('{"n":2,"seed":12,"temperature":0.5}', 1)]


def test_token_ids_as_c_int_arrays_lists_or_other_sequences_store_the_same(store):
    # The sampler gives array('i') (copied whole); users may pass lists, tuples, numpy arrays
    # or arrays of another width (each converted id by id). All must land as the same ids.
    import array

    import numpy as np

    shapes = [lambda ids: array.array("i", ids), list, tuple, lambda ids: np.array(ids, np.int64),
              lambda ids: array.array("q", ids)]
    expected = [([1, 4, 5 + k], [70000 + k, 2 ** 31 - 1, 0][: k % 3 + 1]) for k in range(10)]
    with store.transaction() as tx:
        (prompt_id,) = tables.add_prompts(tx, ["2+3="], "train")
        ck = tables.add_checkpoint(tx, "/models/sft", "reference", "promoted")
        tables.add_completions(tx, [
            Completion(prompt_id, ck, "train", k, str(k), shapes[k % 5](prompt), shapes[(k + 1) % 5](tokens),
                       None, "stop", {}, round_id=1)
            for k, (prompt, tokens) in enumerate(expected)])
    got = store.read(tables.completions, round_id=1)
    assert [(c.prompt_token_ids, c.token_ids) for c in got] == expected
    _, rows = store.query("SELECT num_tokens FROM completions ORDER BY completion_id")
    assert [n for (n,) in rows] == [len(tokens) for _, tokens in expected]


def test_an_insert_with_a_record_that_cannot_be_stored_stores_nothing(store):
    with store.transaction() as tx:
        (prompt_id,) = tables.add_prompts(tx, ["2+3="], "train")
        ck = tables.add_checkpoint(tx, "/models/sft", "reference", "promoted")
    records = [_completion(prompt_id, ck, i, str(i), [i, i + 1]) for i in range(10)]
    with store.transaction() as tx:
        ids = tables.add_completions(tx, records)
    got = store.read(tables.completions, round_id=1)
    assert [c.completion_id for c in got] == ids
    assert [(c.sample_index, c.text, c.token_ids) for c in got] == [(i, str(i), [i, i + 1]) for i in range(10)]
    broken = [_completion(prompt_id, ck, 10, "x", [1]), _completion(prompt_id, ck, 11, "y", ["not a token"])]
    with pytest.raises((ValueError, TypeError)):
        with store.transaction() as tx:
            tables.add_completions(tx, broken)
    assert store.read(tables.count, "completions") == 10


def test_add_prompts_is_idempotent_and_keeps_order(store):
    with store.transaction() as tx:
        first = tables.add_prompts(tx, ["a", "b"], "train")
        again = tables.add_prompts(tx, ["b", "a", "c"], "train")
    assert again[:2] == [first[1], first[0]]
    assert store.read(tables.count, "prompts") == 3


def test_prompts_are_numbered_in_the_order_given_whatever_the_threads(store):
    # A seeded draw of prompts picks them by id: ids must follow the file's order, not
    # the order DuckDB's threads happen to finish in (the demo read 4,352 prompts).
    texts = [f"{a}+{b}=" for a in range(100) for b in range(60)]
    with store.transaction() as tx:
        tx.execute("SET threads = 4")
        ids = tables.add_prompts(tx, texts + texts[:10], "train")
    assert ids == list(range(1, len(texts) + 1)) + list(range(1, 11))
    assert [p.text for p in store.read(tables.prompts, "train")] == texts


def test_preferences_view_resolves_chosen_and_rejected(store):
    with store.transaction() as tx:
        (prompt_id,) = tables.add_prompts(tx, ["2+3="], "train")
        ck = tables.add_checkpoint(tx, "/m", "reference", "promoted")
        round_id = tables.start_round(tx, ck, ck, seed=1, config={})
        a, b, c, d = tables.add_completions(tx, [_completion(prompt_id, ck, i, t, [i, 2], round_id)
                                         for i, t in enumerate(["5", "6", "7", "8"])])
        p1, p2, p3 = tables.add_pairs(tx, [Pair(round_id, prompt_id, a, b, "random"), Pair(round_id, prompt_id, c, d, "random"),
                                   Pair(round_id, prompt_id, a, c, "random")])
        assert tables.claim_round_judge(tx, round_id, "rule", "1") == ("rule", "1")
        assert tables.claim_round_judge(tx, round_id, "other", "9") == ("rule", "1")  # the first claim holds
        tables.add_labels(tx, [Label(p1, "a", "rule", "1"), Label(p2, "b", "rule", "1"), Label(p3, "tie", "rule", "1")])
    _, rows = store.query("SELECT pair_id, prompt, chosen, rejected, judge FROM preferences ORDER BY pair_id")
    assert rows == [(p1, "2+3=", "5", "6", "rule"), (p2, "2+3=", "8", "7", "rule")]
    triples = store.read(tables.preference_triples, round_id)
    assert [(t.chosen_token_ids, t.rejected_token_ids) for t in triples] == [([0, 2], [1, 2]), ([3, 2], [2, 2])]
    _, summary = store.query("SELECT round_id, pairs, labels, preferences, promoted FROM round_summary")
    assert summary == [(round_id, 3, 3, 2, False)]


def test_bad_winner_is_refused_and_nothing_is_written(store):
    from storage.store import StoreError

    with pytest.raises(StoreError, match="winner"):
        with store.transaction() as tx:
            tables.add_labels(tx, [Label(1, "a", "j", "1"), Label(2, "left", "j", "1")])
    assert store.read(tables.count, "labels") == 0


@pytest.mark.parametrize("sql", [
    "DELETE FROM prompts",
    "DROP TABLE labels",
    "CREATE TABLE x (i INT)",
    "SELECT 1; DELETE FROM prompts",
    "COPY prompts TO '/tmp/x.csv'",
])
def test_query_refuses_writes(store, sql):
    with store.transaction() as tx:
        tables.add_prompts(tx, ["keep me"], "train")
    with pytest.raises(ReadOnlyQueryError):
        store.query(sql)
    assert store.read(tables.count, "prompts") == 1


def test_each_call_opens_the_file_and_closes_it_after(store):
    with store.transaction() as tx:
        tables.add_prompts(tx, ["kept"], "train")
    with pytest.raises(StoreError):
        with store.transaction() as tx:
            tables.add_prompts(tx, ["rolled back"], "train")
            raise StoreError("a failing step")
    assert store.query("SELECT text FROM prompts")[1] == [("kept",)]
    assert _other_process_opens(store.path) == "opened"  # nothing here holds it between calls
    with store.transaction() as tx:
        tables.add_prompts(tx, ["inside"], "train")
        assert _other_process_opens(store.path) == "locked"  # a transaction holds it while it runs
    assert store.read(tables.count, "prompts") == 2


OTHER_PROCESS_OPENS = textwrap.dedent("""
    import sys
    from storage.store import Store, StoreLockedError
    try:
        Store(sys.argv[1], lock_timeout_s=0.3).read(lambda tx: None)
        print("opened")
    except StoreLockedError:
        print("locked")
""")


def _other_process_opens(path) -> str:
    return subprocess.run([sys.executable, "-c", OTHER_PROCESS_OPENS, str(path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60).stdout.strip()


def test_two_flywheel_files_open_at_once_in_one_thread_stay_apart(tmp_path):
    first = Store.create(tmp_path / "a.duckdb")
    with first.transaction() as tx:
        tables.add_prompts(tx, ["in a"], "train")
        second = Store.create(tmp_path / "b.duckdb")  # its migrations do not see a's tables
        with second.transaction() as other:
            tables.add_prompts(other, ["in b", "also in b"], "train")
        assert tables.count(tx, "prompts") == 1
    assert second.query("SELECT text FROM prompts ORDER BY prompt_id")[1] == [("in b",), ("also in b",)]
    assert first.query("SELECT text FROM prompts")[1] == [("in a",)]


def test_query_inside_a_transaction_stays_read_only(store):
    # The query's connection shares the database with the open transaction's.
    with store.transaction() as tx:
        tables.add_prompts(tx, ["kept"], "train")
        for sneaky in ("EXPLAIN ANALYZE DELETE FROM prompts", "SELECT nextval('completion_ids')"):
            with pytest.raises(ReadOnlyQueryError):
                store.query(sneaky)
    assert store.read(tables.count, "prompts") == 1
    with store.transaction() as tx:
        assert tables.next_ids(tx, "completion_ids", 1) == [1]  # the sequence did not move


def test_a_direct_duckdb_connection_in_the_same_process_is_named_as_the_problem(store):
    with duckdb.connect(str(store.path), read_only=True):
        with pytest.raises(StoreError, match="open in another DuckDB connection of this process"):
            store.read(tables.count, "prompts")
    assert store.read(tables.count, "prompts") == 0  # closed: the store opens it again


FORK_AFTER_USING_THE_STORE = textwrap.dedent("""
    import os, sys
    from storage import tables
    from storage.store import Store
    store = Store.create(sys.argv[1])
    store.read(tables.count, "prompts")  # the parent has used the store
    child = os.fork()
    if child == 0:
        os._exit(0 if store.read(tables.count, "prompts") == 0 else 1)
    _, status = os.waitpid(child, 0)
    print("child exit", os.waitstatus_to_exitcode(status), "parent", store.read(tables.count, "prompts"))
""")


def test_a_process_forked_after_using_the_store_can_use_it(tmp_path):
    result = subprocess.run([sys.executable, "-c", FORK_AFTER_USING_THE_STORE, str(tmp_path / "fw.duckdb")],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.stdout.strip() == "child exit 0 parent 0", result.stderr


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
            tables.add_prompts(tx, ["after the lock"], "train")
        assert patient.read(tables.count, "prompts") == 1
    finally:
        holder.kill()
