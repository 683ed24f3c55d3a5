"""The DuckDB store on real files: migrations, refusals, round-trips, views, locking."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pytest

import storage.store
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
        (prompt_id,) = tx.add_prompts(["2+3="], "train")
        ck = tx.add_checkpoint("/models/sft", "reference", "promoted")
        ids = tx.add_completions([_completion(prompt_id, ck, 0, "5", [8, 2]), _completion(prompt_id, ck, 1, "6", [9, 2])])
    got = store.completions(round_id=1)
    assert [c.completion_id for c in got] == ids
    assert got[0].token_ids == [8, 2] and got[0].prompt_token_ids == [1, 4, 5]
    assert got[1].checkpoint_id == ck and got[1].sampling_params == {"temperature": 1.0, "seed": 7}


def test_completions_sharing_a_prompt_list_and_params_store_each_row_its_own(store):
    # The sampler shares one prompt-token list and one params dict among a prompt's samples;
    # the store converts each distinct object once and must still give every row its own.
    shared_tokens, shared_params = [1, 4, 5], {"seed": 11, "temperature": 1.0, "n": 2}
    other_params = {"seed": 12, "temperature": 0.5, "n": 2}
    with store.transaction() as tx:
        first, second = tx.add_prompts(["2+3=", "10+20="], "train")
        ck = tx.add_checkpoint("/models/sft", "reference", "promoted")
        records = [
            Completion(first, ck, "train", 0, "5", shared_tokens, [8, 2], -0.5, "stop", shared_params, round_id=1),
            Completion(second, ck, "train", 0, "30", [1, 6, 7, 8, 9], [], None, "length", other_params, round_id=1),
            Completion(first, ck, "train", 1, "6", shared_tokens, [9, 2, 2], -0.7, "stop", shared_params, round_id=1),
            Completion(second, ck, "train", 1, "31", [1, 6, 7, 8, 9], [3], None, "stop",
                       {"temperature": 0.5, "seed": 12, "n": 2}, round_id=1),
        ]
        tx.add_completions(records)
    got = store.completions(round_id=1)
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
        (prompt_id,) = tx.add_prompts(["2+3="], "train")
        ck = tx.add_checkpoint("/models/sft", "reference", "promoted")
        tx.add_completions([
            Completion(prompt_id, ck, "train", k, str(k), shapes[k % 5](prompt), shapes[(k + 1) % 5](tokens),
                       None, "stop", {}, round_id=1)
            for k, (prompt, tokens) in enumerate(expected)])
    got = store.completions(round_id=1)
    assert [(c.prompt_token_ids, c.token_ids) for c in got] == expected
    _, rows = store.query("SELECT num_tokens FROM completions ORDER BY completion_id")
    assert [n for (n,) in rows] == [len(tokens) for _, tokens in expected]


def test_a_large_insert_goes_in_chunks_in_order_and_all_or_nothing(store, monkeypatch):
    import storage.store as store_module

    monkeypatch.setattr(store_module, "_INSERT_CHUNK_ROWS", 3)  # 10 rows: chunks of 3, 3, 3, 1
    inserted = []
    real_insert = store_module.StoreSession._insert_arrow
    monkeypatch.setattr(store_module.StoreSession, "_insert_arrow",
                        lambda session, table, columns: inserted.append(len(columns["completion_id"]))
                        or real_insert(session, table, columns))
    with store.transaction() as tx:
        (prompt_id,) = tx.add_prompts(["2+3="], "train")
        ck = tx.add_checkpoint("/models/sft", "reference", "promoted")
    records = [_completion(prompt_id, ck, i, str(i), [i, i + 1]) for i in range(10)]
    with store.transaction() as tx:
        ids = tx.add_completions(records)
    assert inserted == [3, 3, 3, 1]
    got = store.completions(round_id=1)
    assert [c.completion_id for c in got] == ids
    assert [(c.sample_index, c.text, c.token_ids) for c in got] == [(i, str(i), [i, i + 1]) for i in range(10)]
    # A record that cannot be converted, in the third chunk, after two chunks went in:
    broken = records + [_completion(prompt_id, ck, 10, "x", [1]), _completion(prompt_id, ck, 11, "y", ["not a token"])]
    with pytest.raises((ValueError, TypeError)):
        with store.transaction() as tx:
            tx.add_completions(broken[4:])
    assert store.count("completions") == 10


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


def test_held_keeps_one_connection_for_a_burst_and_lets_go_after(store, monkeypatch):
    opened = []
    real_attach = Store._attach
    monkeypatch.setattr(Store, "_attach", lambda *a: opened.append(a) or real_attach(*a))
    other_process = [sys.executable, "-c", textwrap.dedent(f"""
        from storage.store import Store, StoreLockedError
        try:
            Store({str(store.path)!r}, lock_timeout_s=0.3).count("prompts")
            print("opened")
        except StoreLockedError:
            print("locked")
    """)]
    with store.held():
        with store.transaction() as tx:
            tx.add_prompts(["kept"], "train")
        with pytest.raises(StoreError):
            with store.transaction() as tx:
                tx.add_prompts(["rolled back"], "train")
                raise StoreError("a failing step")
        with store.held():  # nested: the outer block's connection
            assert store.count("prompts") == 1  # each transaction is still its own
        assert store.query("SELECT text FROM prompts")[1] == [("kept",)]
        assert Store(store.path).count("prompts") == 1  # another Store object for the file shares it
        # query() stays read-only on the held read-write connection
        for sneaky in ("EXPLAIN ANALYZE DELETE FROM prompts", "SELECT nextval('completion_ids')"):
            with pytest.raises(ReadOnlyQueryError):
                store.query(sneaky)
        assert store.count("prompts") == 1
        during = subprocess.run(other_process, capture_output=True, text=True, cwd=ROOT).stdout.strip()
        with store.transaction() as tx:  # a store call inside an open transaction: its own connection
            tx.add_prompts(["inside"], "train")
            assert store.count("prompts") == 1  # it sees what is committed, as outside held()
    assert len(opened) == 1  # ten store calls, one open (the call nested in a transaction shares it too)
    assert store.count("prompts") == 2
    assert during == "locked"  # held means held: only around short work
    assert subprocess.run(other_process, capture_output=True, text=True, cwd=ROOT).stdout.strip() == "opened"


OTHER_PROCESS_OPENS = textwrap.dedent("""
    import sys
    from storage.store import Store, StoreLockedError
    try:
        Store(sys.argv[1], lock_timeout_s=0.3).count("prompts")
        print("opened")
    except StoreLockedError:
        print("locked")
""")


def _other_process_opens(path) -> str:
    return subprocess.run([sys.executable, "-c", OTHER_PROCESS_OPENS, str(path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60).stdout.strip()


def test_a_lingering_store_opens_once_for_calls_close_together_then_lets_go(tmp_path, monkeypatch):
    opened = []  # this test's file's opens (other tests' stores may still be in use in this process)
    real_attach = Store._attach
    monkeypatch.setattr(Store, "_attach", lambda store, *a: (store.path == tmp_path / "fw.duckdb" and opened.append(a))
                        or real_attach(store, *a))
    store = Store.create(tmp_path / "fw.duckdb", linger_s=60)
    with store.transaction() as tx:
        tx.add_prompts(["kept"], "train")
    assert store.count("prompts") == 1 and store.query("SELECT count(*) FROM prompts")[1] == [(1,)]
    assert len(opened) == 1  # create, a write, two reads: one open
    assert _other_process_opens(store.path) == "locked"  # it lingers (for 60 s here)
    store.release()
    assert _other_process_opens(store.path) == "opened"
    assert store.count("prompts") == 1 and len(opened) == 2

    store.linger_s = 0.05
    assert store.count("prompts") == 1  # attached again, and detached 50 ms after by the closer thread
    assert _other_process_opens(store.path) == "opened"  # its start alone takes longer than 50 ms


def test_a_lingering_store_stops_lingering_after_its_longest_hold(tmp_path, monkeypatch):
    # Otherwise a loop of quick transactions would keep the file from others for as long as it runs.
    monkeypatch.setattr(storage.store, "LONGEST_LINGERING_HOLD_S", 1.0)
    store = Store.create(tmp_path / "fw.duckdb", linger_s=60)
    assert store.count("prompts") == 0
    assert _other_process_opens(store.path) == "locked"  # within the longest hold: it lingers
    time.sleep(max(0.0, 1.0 - (time.monotonic() - storage.store._ATTACHED[store._key].attached_at)))
    assert store.count("prompts") == 0  # the same attachment, now older than the longest hold
    assert store._key not in storage.store._ATTACHED  # so that call closed it
    assert store.count("prompts") == 0  # and, for as long again, the next ones close it at once
    assert store._key not in storage.store._ATTACHED
    time.sleep(1.0)
    assert store.count("prompts") == 0  # after that, it lingers again
    assert store._key in storage.store._ATTACHED
    store.release()


def test_a_lingering_store_reuses_cursors_but_not_one_whose_block_failed(tmp_path):
    store = Store.create(tmp_path / "fw.duckdb", linger_s=60)
    with store.transaction() as tx:
        tx.add_prompts(["kept"], "train")
        first = tx.conn
    with store.transaction() as tx:
        assert tx.conn is first  # reused, with its USE already done
    with pytest.raises(StoreError):
        with store.transaction() as tx:
            tx.add_prompts(["rolled back"], "train")
            raise StoreError("a failing step")
    assert first not in storage.store._ATTACHED[store._key].idle_cursors  # closed, not kept
    # query() on the lingering read-write attachment stays read-only, and nothing moved
    for sneaky in ("EXPLAIN ANALYZE DELETE FROM prompts", "SELECT nextval('completion_ids')"):
        with pytest.raises(ReadOnlyQueryError):
            store.query(sneaky)
    assert store.query("SELECT text FROM prompts")[1] == [("kept",)]
    with store.transaction() as tx:
        assert tx._next_ids("completion_ids", 1) == [1]
    store.release()
    assert store._key not in storage.store._ATTACHED


LINGERING_AT_EXIT_AND_FORK = textwrap.dedent("""
    import os, sys
    from storage.store import Store
    store = Store.create(sys.argv[1], linger_s=60)
    with store.transaction() as tx:
        tx.add_prompts(["written just before the fork and the exit"], "train")
    child = os.fork()
    if child == 0:  # the file was detached before the fork, not inherited
        os._exit(0 if store.count("prompts") == 1 else 1)
    _, status = os.waitpid(child, 0)
    with store.transaction() as tx:
        tx.add_prompts(["after the fork"], "train")
    print("child exit", os.waitstatus_to_exitcode(status), "parent", store.count("prompts"), flush=True)
""")


def test_a_lingering_file_is_closed_before_a_fork_and_at_exit(tmp_path):
    path = tmp_path / "fw.duckdb"
    result = subprocess.run([sys.executable, "-c", LINGERING_AT_EXIT_AND_FORK, str(path)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.stdout.strip() == "child exit 0 parent 2", result.stderr
    assert not Path(f"{path}.wal").exists()  # exit detached it, which checkpoints the log into the file
    assert Store.open(path).count("prompts") == 2


def test_two_flywheel_files_open_at_once_in_one_thread_stay_apart(tmp_path):
    # Both files are attached to the process's one in-memory DuckDB at the same time.
    first = Store.create(tmp_path / "a.duckdb")
    with first.held():
        with first.transaction() as tx:
            tx.add_prompts(["in a"], "train")
        second = Store.create(tmp_path / "b.duckdb")  # its migrations do not see a's tables
        with second.transaction() as tx:
            tx.add_prompts(["in b", "also in b"], "train")
        assert first.count("prompts") == 1
    assert second.query("SELECT text FROM prompts ORDER BY prompt_id")[1] == [("in b",), ("also in b",)]
    assert first.query("SELECT text FROM prompts")[1] == [("in a",)]


def test_query_inside_a_transaction_stays_read_only(store):
    # The file is attached read-write for the transaction; the nested query shares it.
    with store.transaction() as tx:
        tx.add_prompts(["kept"], "train")
        for sneaky in ("EXPLAIN ANALYZE DELETE FROM prompts", "SELECT nextval('completion_ids')"):
            with pytest.raises(ReadOnlyQueryError):
                store.query(sneaky)
    assert store.count("prompts") == 1
    with store.transaction() as tx:
        assert tx._next_ids("completion_ids", 1) == [1]  # the sequence did not move


def test_a_direct_duckdb_connection_in_the_same_process_is_named_as_the_problem(store):
    with duckdb.connect(str(store.path), read_only=True):
        with pytest.raises(StoreError, match="open in another DuckDB connection of this process"):
            store.count("prompts")
    assert store.count("prompts") == 0  # closed: the store opens it again


FORK_AFTER_USING_THE_STORE = textwrap.dedent("""
    import os, sys
    from storage.store import Store
    store = Store.create(sys.argv[1])
    store.count("prompts")  # the parent has used the store
    child = os.fork()
    if child == 0:
        os._exit(0 if store.count("prompts") == 0 else 1)
    _, status = os.waitpid(child, 0)
    print("child exit", os.waitstatus_to_exitcode(status), "parent", store.count("prompts"))
""")


def test_a_process_forked_after_using_the_store_can_use_it(tmp_path):
    # A child that inherited the parent's in-memory DuckDB hung when it made its own.
    result = subprocess.run([sys.executable, "-c", FORK_AFTER_USING_THE_STORE, str(tmp_path / "fw.duckdb")],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.stdout.strip() == "child exit 0 parent 0", result.stderr


THREADS_OF_THE_PROCESS = textwrap.dedent("""
    import os, sys
    from storage.store import Store, set_threads
    threads = "SELECT current_setting('threads')"
    store = Store.create(sys.argv[1])
    default = store.query(threads)[1][0][0]
    print(default)
    wanted = 3 if default != 3 else 2
    set_threads(wanted)  # the process's DuckDB, made already, and any it makes later
    print(store.query(threads)[1][0][0])
    child = os.fork()  # closes the parent's idle DuckDB; both sides make new ones
    if child == 0:
        os._exit(store.query(threads)[1][0][0])
    _, status = os.waitpid(child, 0)
    print(os.waitstatus_to_exitcode(status), store.query(threads)[1][0][0])
""")


def test_set_threads_sets_them_for_the_process_and_its_forked_children(tmp_path):
    result = subprocess.run([sys.executable, "-c", THREADS_OF_THE_PROCESS, str(tmp_path / "fw.duckdb")],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    default, now, child, parent_after_fork = map(int, result.stdout.split())
    wanted = 3 if default != 3 else 2
    assert (now, child, parent_after_fork) == (wanted, wanted, wanted)
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="threads must be an int >= 1"):
            storage.store.set_threads(bad)


FORK_WHILE_ANOTHER_THREAD_IS_IN_A_TRANSACTION = textwrap.dedent("""
    import os, sys, threading, time
    from storage.store import Store, StoreError
    store = Store.create(sys.argv[1])
    inside = threading.Event()
    def slow_transaction():
        with store.transaction() as tx:
            tx.add_prompts(["from the parent's thread"], "train")
            inside.set()
            time.sleep(1)
    writer = threading.Thread(target=slow_transaction)
    writer.start()
    inside.wait()
    child = os.fork()
    if child == 0:  # the lock and the attachment stayed with the parent's thread
        try:
            store.count("prompts")
        except StoreError as error:
            print(error, flush=True)
        other = Store.create(sys.argv[1] + ".other")  # the lock was not inherited locked
        sys.exit(other.count("prompts"))  # a normal exit: finalisation must not hang either
    _, status = os.waitpid(child, 0)
    writer.join()
    print("child exit", os.waitstatus_to_exitcode(status))
""")


def test_a_process_forked_while_another_thread_is_in_a_transaction_says_so_and_exits(tmp_path):
    result = subprocess.run([sys.executable, "-c", FORK_WHILE_ANOTHER_THREAD_IS_IN_A_TRANSACTION,
                             str(tmp_path / "fw.duckdb")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "child exit 0", result.stderr
    assert "was open in another thread when this process was forked" in lines[0] and "'spawn'" in lines[0]


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
