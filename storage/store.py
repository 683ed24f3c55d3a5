"""The DuckDB store: one file per flywheel, short-lived connections.

DuckDB lets one process hold a file open for writing, so nothing here keeps a connection
across long work: every call opens the file, runs one transaction and closes it, or,
inside `Store.held()`, a short burst of transactions shares one open. A lock held by
another process is retried with back-off and then reported in one line.

"Opening" is an ATTACH of the file to one in-memory DuckDB kept for the whole process, and
closing is its DETACH, which checkpoints and releases the file lock as closing a
connection does. `duckdb.connect(path)` builds a whole database instance each time: 11.5
ms to connect and close on the demo's database, against 3.0 ms to attach and detach.

A store made with `linger_s` (the round runner's) closes the file that long after its last
call instead of at once, on a timer thread: a round's steps make bursts of calls a few ms
apart (one step's last write, the orchestrator, the next step's first reads), and one
open for the burst replaces a dozen. The file is still free during long work, a moment
after it starts; other processes wait for it with the same back-off as for a transaction.
Only calls within `LONGEST_LINGERING_HOLD_S` of the open start a linger; after a call past
that closes the file, its calls close it at once for as long again, so that a long loop of
quick calls leaves the file free between them at least half the time.
"""

from __future__ import annotations

import array
import atexit
import ctypes
import itertools
import json
import operator
import os
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import duckdb
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from storage.migrations import MIGRATIONS, MIGRATIONS_TABLE
from storage.records import (
    ROUND_STATES,
    WINNERS,
    Checkpoint,
    Completion,
    CompletionScore,
    Evaluation,
    JudgeFailure,
    Label,
    Pair,
    PreferenceTriple,
    Prompt,
    Round,
    StepMetrics,
    TrainStep,
)

SCHEMA_VERSION = len(MIGRATIONS)

# A round's training preferences: its pairs that the round's own judge gave a winner.
# Labels other judges added later, for comparison, are not training data; nor are people's
# labels given after the round stopped waiting for them (`label_requests.last_label_id`).
# `{rounds}` picks the rounds: `pf.round_id = ?` (one round) or `pf.round_id < ?` (replay).
_ROUND_PREFERENCES = (
    "SELECT pf.* FROM preferences pf JOIN rounds rd ON rd.round_id = pf.round_id "
    "LEFT JOIN label_requests rq ON rq.round_id = pf.round_id "
    "WHERE {rounds} AND pf.judge = rd.judge_name AND pf.judge_version = rd.judge_version "
    "AND (rq.last_label_id IS NULL OR pf.label_id <= rq.last_label_id)"
)


class StoreError(Exception):
    """A problem with the database that the user can act on; the CLI prints it in one line."""


class NotAFlywheelDatabase(StoreError):
    pass


class NewerSchemaError(StoreError):
    pass


class StoreLockedError(StoreError):
    pass


class ReadOnlyQueryError(StoreError):
    pass


# Rows per Arrow record batch handed to DuckDB (see StoreSession._insert_arrow).
_ARROW_BATCH_ROWS = 8192
# Records converted to Arrow and inserted per statement by `StoreSession._insert_in_chunks`.
_INSERT_CHUNK_ROWS = 2 * _ARROW_BATCH_ROWS

# A lingering attachment (`Store(linger_s=...)`) lingers only after calls that end within
# this long of its open. The call that ends later closes the file at once, and so do the
# file's calls for as long again: a loop of quick transactions (small sampling batches, a
# fast judge) then leaves the file free between them, as a store without linger does, at
# least half the time, instead of keeping it from other processes while the loop runs.
LONGEST_LINGERING_HOLD_S = 0.5

# One store call (or `Store.held()` block) at a time per process: it guards the in-memory
# DuckDB and its attachments below (the lease heartbeat uses the store from a thread, and
# the closer thread detaches lingering files), and the store's rule is short transactions
# anyway, so threads simply take turns.
_PROCESS_CONNECTION = threading.RLock()


@dataclass
class _Attached:
    alias: str
    read_only: bool
    users: int = 0
    # When a lingering attachment with no users is detached (None: when its last user ends).
    close_at: float | None = None
    attached_at: float = field(default_factory=time.monotonic)
    # Cursors that already USE this file, free for the next call: a new cursor and its USE
    # took about 1 ms inside a round (0.05 ms alone), and a round makes about 40 calls.
    idle_cursors: list[duckdb.DuckDBPyConnection] = field(default_factory=list)


# The process's in-memory DuckDB, and the files attached to it now, by resolved path.
_HUB: duckdb.DuckDBPyConnection | None = None
_ATTACHED: dict[str, _Attached] = {}
# Files whose calls close them at once until then (monotonic time): see LONGEST_LINGERING_HOLD_S.
_NO_LINGER_UNTIL: dict[str, float] = {}
# Set at exit: from then on every call closes its file at once.
_EXITING = False
_ALIASES = itertools.count(1)
# DuckDB threads of the in-memory DuckDB, from `set_threads` (None: DuckDB's default).
_HUB_THREADS: int | None = None


def set_threads(threads: int) -> None:
    """Run this process's store calls on `threads` DuckDB threads, from now on (one DuckDB
    serves every store of a process, so this is the process's setting). For a process whose
    calls are short and whose cores are busy with other work, where DuckDB's extra threads
    mostly wait for a core; DuckDB's default is one per core it may use."""
    global _HUB_THREADS
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    with _PROCESS_CONNECTION:
        _HUB_THREADS = threads
        if _HUB is not None:
            _HUB.execute(f"SET threads = {threads}")


def _hub() -> duckdb.DuckDBPyConnection:
    global _HUB
    if _HUB is None:
        # Spill files of large queries go to the system's temporary directory (an in-memory
        # database would put them in ./.tmp, wherever the process runs).
        spill = Path(tempfile.gettempdir()) / f"flywheel-duckdb-{os.getpid()}"
        config: dict[str, Any] = {"temp_directory": str(spill)}
        if _HUB_THREADS is not None:
            config["threads"] = _HUB_THREADS
        _HUB = duckdb.connect(":memory:", config=config)
    return _HUB


# A forked child must not free a DuckDB it inherited: freeing one hangs. So an idle hub is
# closed before a fork (the next store call makes a new one), and a child that still
# inherits one (another thread was inside a store call at the fork) keeps it for good and
# starts afresh: its own hub, no attachments, an unlocked lock. The files the inherited
# hub had attached stay registered to it, so the child cannot open those (it says why).
_INHERITED_BY_FORK: set[str] = set()


def _close_idle_hub_before_fork() -> None:
    global _HUB
    # A short wait: the closer thread may be in the middle of a DETACH.
    if _HUB is None or not _PROCESS_CONNECTION.acquire(timeout=1.0):
        return
    try:
        _detach_lingering()
        if not _ATTACHED:
            _HUB.close()
            _HUB = None
    finally:
        _PROCESS_CONNECTION.release()


def _start_afresh_in_forked_child() -> None:
    global _HUB, _PROCESS_CONNECTION, _CLOSER_WAKE
    if _HUB is not None:
        # Never freed, on purpose: the hub, and the cursors of it that attachments kept.
        for inherited in [_HUB, *(c for attached in _ATTACHED.values() for c in attached.idle_cursors)]:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(inherited))
        _HUB = None
    _INHERITED_BY_FORK.update(_ATTACHED)
    _ATTACHED.clear()
    _PROCESS_CONNECTION = threading.RLock()  # its holder, if any, did not come along
    _CLOSER_WAKE = threading.Event()  # nor did the closer thread


os.register_at_fork(before=_close_idle_hub_before_fork, after_in_child=_start_afresh_in_forked_child)


def _detach(key: str) -> None:
    """Detach a file (which checkpoints it and frees its lock). If DETACH fails, the entry
    stays, as the file does, and the next call for it reuses the attachment."""
    attached = _ATTACHED[key]
    while attached.idle_cursors:
        attached.idle_cursors.pop().close()
    _hub().execute(f"DETACH {attached.alias}")
    del _ATTACHED[key]


def _release(key: str, attached: _Attached, linger_s: float) -> None:
    """The last user of `attached` is done: detach it now, or in `linger_s` (see
    LONGEST_LINGERING_HOLD_S for when it does not linger) unless a call uses it first."""
    now = time.monotonic()
    if linger_s > 0 and not _EXITING and now >= _NO_LINGER_UNTIL.get(key, 0.0):
        if now - attached.attached_at < LONGEST_LINGERING_HOLD_S:
            attached.close_at = now + linger_s
            if _wake_closer(attached.close_at):
                return
        else:
            _NO_LINGER_UNTIL[key] = now + LONGEST_LINGERING_HOLD_S
    _detach(key)


def _wake_closer(close_at: float) -> bool:
    """Make sure the closer thread detaches at `close_at`; False if it cannot run."""
    global _CLOSER
    if _CLOSER is None or not _CLOSER.is_alive():  # the first, or a forked child's
        # A daemon: exit detaches what still lingers (`_detach_lingering_at_exit`).
        closer = threading.Thread(target=_detach_when_due, name="flywheel-store-closer", daemon=True)
        try:
            closer.start()
        except RuntimeError:  # the interpreter is shutting down
            return False
        _CLOSER = closer
    # Only when it would otherwise sleep past `close_at`: a burst of calls wakes it once.
    if _CLOSER_SLEEPS_UNTIL is None or close_at < _CLOSER_SLEEPS_UNTIL:
        _CLOSER_WAKE.set()
    return True


def _detach_when_due() -> None:
    """The closer thread: detach each lingering attachment when its time comes."""
    global _CLOSER_SLEEPS_UNTIL
    while True:
        with _PROCESS_CONNECTION:
            now = time.monotonic()
            for key, attached in list(_ATTACHED.items()):
                if attached.users or attached.close_at is None or attached.close_at > now:
                    continue
                try:
                    _detach(key)
                except duckdb.Error:  # it stays attached (its writes are committed): try again
                    attached.close_at = now + 1.0
            due = [a.close_at for a in _ATTACHED.values() if not a.users and a.close_at is not None]
            _CLOSER_SLEEPS_UNTIL = min(due) if due else None
            _CLOSER_WAKE.clear()  # under the lock, so a release after this wakes the wait below
        _CLOSER_WAKE.wait(None if _CLOSER_SLEEPS_UNTIL is None else _CLOSER_SLEEPS_UNTIL - time.monotonic())


_CLOSER: threading.Thread | None = None
_CLOSER_WAKE = threading.Event()
_CLOSER_SLEEPS_UNTIL: float | None = None  # None: until woken


def _detach_lingering() -> None:
    """Detach every attachment that only lingers (has no users); one whose DETACH fails
    stays attached, as in `_detach`. The caller holds the lock."""
    for key in [key for key, attached in _ATTACHED.items() if not attached.users]:
        try:
            _detach(key)
        except duckdb.Error:
            pass


@atexit.register
def _detach_lingering_at_exit() -> None:
    # A daemon thread stuck inside a store call must not hang the exit: give up after 5 s
    # (what lingers then is committed anyway; DuckDB replays its log at the next open).
    global _EXITING
    _EXITING = True
    if _PROCESS_CONNECTION.acquire(timeout=5):
        try:
            _detach_lingering()
        finally:
            _PROCESS_CONNECTION.release()


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _is_lock_conflict(error: duckdb.Error) -> bool:
    # DuckDB's words when another process holds the file.
    return "Could not set lock" in str(error)


def _int32_lists(values: Sequence[Sequence[int]]) -> pa.Array:
    """A list<int32> column from sequences of token ids: all values into one flat C int
    buffer plus offsets. The sampler's `array('i')` records are copied whole (a memcpy);
    a Python list is read a list at a time by `array.fromlist` (about 12 ns an id, the
    fastest way from Python ints we found: `np.fromiter` over the chained lists and
    `pa.array` were slower)."""
    lengths = np.fromiter(map(len, values), np.int32, len(values))
    offsets = np.zeros(len(values) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = array.array("i")  # a C int (np.intc): 32 bits on every platform DuckDB and torch run on
    for token_ids in values:
        if isinstance(token_ids, array.array) and token_ids.typecode == "i":
            flat.extend(token_ids)
        else:
            flat.fromlist(token_ids if isinstance(token_ids, list) else np.asarray(token_ids).tolist())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.frombuffer(flat, np.intc)))


def _per_distinct_object(values: Sequence[Any], convert) -> pa.Array:
    """`convert(distinct)` once per distinct object in `values` (by identity), taken back
    out to one row per value. The sampler gives a prompt's n completions one shared
    prompt-token array and one sampling-params dict, so each is converted once, not n times.
    (Identity is safe here: `values` holds every object alive while this runs.)"""
    identities = np.fromiter(map(id, values), np.uint64, len(values))
    _, first_rows, rows = np.unique(identities, return_index=True, return_inverse=True)
    return convert([values[i] for i in first_rows.tolist()]).take(pa.array(rows.astype(np.int32)))


def _json_sorted(values: Sequence[Any]) -> pa.Array:
    """Each value as JSON with sorted keys, as a string column. orjson: about 7x faster
    than the standard library's encoder, which was a fifth of `add_completions`' time."""
    # Compact (no spaces after separators); non-string keys become strings, as json.dumps does.
    encoded = [orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS) for value in values]
    return pa.array(encoded, pa.binary()).cast(pa.string())


def completion_columns(completions: Sequence[Completion], ids: Sequence[int]) -> dict[str, pa.Array]:
    """The Arrow columns `StoreSession.add_completions` inserts (its benchmark's floor too)."""
    token_ids = _int32_lists([c.token_ids for c in completions])
    return {
        "completion_id": pa.array(ids, pa.int64()),
        **_field_columns(completions, {
            "round_id": pa.int64(), "prompt_id": pa.int64(), "checkpoint_id": pa.int64(), "purpose": pa.string(),
            "sample_index": pa.int32(), "text": pa.string(), "cumulative_logprob": pa.float64(),
            "finish_reason": pa.string(),
        }),
        "prompt_token_ids": _per_distinct_object([c.prompt_token_ids for c in completions], _int32_lists),
        "token_ids": token_ids,
        "num_tokens": pc.list_value_length(token_ids),
        "sampling_params": _per_distinct_object([c.sampling_params for c in completions], _json_sorted),
    }


def _field_columns(records: Sequence[Any], types: dict[str, pa.DataType]) -> dict[str, pa.Array]:
    """One Arrow column of type `types[name]` per field `name` of the records, as it is."""
    return {name: pa.array(list(map(operator.attrgetter(name), records)), kind) for name, kind in types.items()}


def _record_columns(records: Sequence[Any], types: dict[str, pa.DataType]) -> dict[str, pa.Array]:
    """Arrow columns of dataclass records whose fields are the table's columns (strings
    unless `types` names another type). `records` is not empty."""
    fields = type(records[0]).__dataclass_fields__
    return _field_columns(records, {name: types.get(name, pa.string()) for name in fields})


def label_columns(labels: Sequence[Label], ids: Sequence[int]) -> dict[str, pa.Array]:
    """The Arrow columns `StoreSession.add_labels` inserts (its benchmark's floor too)."""
    return {"label_id": pa.array(ids, pa.int64()),
            **_record_columns(labels, {"pair_id": pa.int64(), "confidence": pa.float64()})}


def _rows_through_arrow(cursor: duckdb.DuckDBPyConnection) -> Iterator[tuple]:
    """A result's rows as tuples of Python values, built a column at a time from Arrow: a
    list column (token ids) comes out in about a third of `fetchall`'s time. The same values
    as `fetchall` for integers, floats, text, JSON (as text), lists of those and NULL; not for
    every type (timestamps with time zone, HUGEINT, UUID, INTERVAL and MAP differ)."""
    result = cursor.arrow()  # a RecordBatchReader since duckdb 1.5, a Table before
    table = result.read_all() if isinstance(result, pa.RecordBatchReader) else result
    return zip(*(column.to_pylist() for column in table.columns))


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


class Store:
    """The flywheel's database. Open with `Store.create` (new or existing) or `Store.open`."""

    def __init__(self, path: str | os.PathLike, *, lock_timeout_s: float = 60.0, linger_s: float = 0.0) -> None:
        """`linger_s`: keep the file open this long after a call ends, for the next call
        (see the module docstring); 0 closes it at once. Only for a process that makes
        bursts of calls and needs the file to itself meanwhile: a server answering other
        processes' requests would keep the file from them."""
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s
        self.linger_s = linger_s
        # Resolved once: it keys this file's attachment in every call.
        self._key = str(self.path.resolve())

    # -- opening -----------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, **kwargs: Any) -> "Store":
        """Open the database at `path`, creating it and applying migrations as needed."""
        store = cls(path, **kwargs)
        try:
            store.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot create {store.path.parent}: {error.strerror or error}") from error
        with store._connection() as conn:
            store._migrate(conn)
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, **kwargs: Any) -> "Store":
        """Open an existing flywheel database; refuse anything else."""
        store = cls(path, **kwargs)
        if not store.path.is_file():
            raise NotAFlywheelDatabase(f"no flywheel database at {store.path}")
        with store._connection() as conn:
            store._migrate(conn)
        return store

    @contextmanager
    def held(self) -> Iterator[None]:
        """Keep the file open for a burst of short reads and writes in this thread, each
        still its own transaction on its own connection, instead of opening it for each:
        an open and a close cost DuckDB about 3 ms (reading the catalog) plus a checkpoint
        after writes, more than most small reads. Only around short work: other processes
        cannot open the file until the block ends (and a lingering store's linger after
        it), so never around sampling, judging or training, and never wait inside it for
        another thread of this process (the lease heartbeat waits for the block to end)."""
        with _PROCESS_CONNECTION, self._attached(read_only=False):
            yield

    @contextmanager
    def _connection(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection of its own (a cursor of the process's in-memory DuckDB) whose default
        database is this file: a new one, or one an earlier call on this attachment left
        with no transaction open. One whose block raised is closed, not kept."""
        with _PROCESS_CONNECTION, self._attached(read_only) as attached:
            if attached.idle_cursors:
                conn = attached.idle_cursors.pop()
            else:
                conn = _hub().cursor()
                conn.execute(f"USE {attached.alias}")
            try:
                yield conn
            except BaseException:
                conn.close()
                raise
            attached.idle_cursors.append(conn)

    @contextmanager
    def _attached(self, read_only: bool) -> Iterator[_Attached]:
        """This file, attached while the block runs: attached now, or already (by a `held()`
        block, a call this one is nested in, or an earlier call it lingers after), then
        shared until its last user is done, which closes it or leaves it to linger."""
        key = self._key
        attached = _ATTACHED.get(key)
        if attached is not None and attached.read_only and not read_only:
            if attached.users:
                raise StoreError(f"{self.path} is open read-only in this process; cannot write to it inside a query")
            _detach(key)  # lingering after a query, or left attached by a DETACH that failed
            attached = None
        if attached is None:
            attached = self._attach(key, read_only)
        attached.users += 1
        attached.close_at = None
        try:
            yield attached
        finally:
            attached.users -= 1
            if attached.users == 0:
                _release(key, attached, self.linger_s)

    def release(self) -> None:
        """Close the file now if it only lingers after this process's last call (`linger_s`)."""
        with _PROCESS_CONNECTION:
            attached = _ATTACHED.get(self._key)
            if attached is not None and not attached.users:
                try:
                    _detach(self._key)
                except duckdb.Error as error:
                    raise StoreError(f"cannot close {self.path}: {_first_line(error)}") from error

    def _attach(self, key: str, read_only: bool) -> _Attached:
        alias = f"flywheel_{next(_ALIASES)}"
        # The resolved path (the key): a relative one would follow the working directory.
        statement = f"ATTACH {_sql_string(key)} AS {alias}" + (" (READ_ONLY)" if read_only else "")
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.02
        while True:
            try:
                _hub().execute(statement)
                break
            except duckdb.Error as error:
                if "Cannot open file" in str(error):  # a read-only or full disk, no permission
                    raise StoreError(f"cannot open {self.path}: {_first_line(error)}") from error
                if "Unique file handle conflict" in str(error) and key in _INHERITED_BY_FORK:
                    raise StoreError(f"{self.path} was open in another thread when this process was forked, "
                                     "and a forked process cannot open it again: start it with "
                                     "multiprocessing's 'spawn' method instead") from error
                if "Unique file handle conflict" in str(error):  # duckdb.connect(path) in this process
                    raise StoreError(f"{self.path} is open in another DuckDB connection of this process: "
                                     "close that connection first (or read through the store)") from error
                if not _is_lock_conflict(error):
                    raise NotAFlywheelDatabase(
                        f"{self.path} is not a readable DuckDB database: {_first_line(error)}"
                    ) from error
                if time.monotonic() >= deadline:
                    raise StoreLockedError(
                        f"{self.path} is locked by another process for more than "
                        f"{self.lock_timeout_s:.0f} s: {_first_line(error)}"
                    ) from error
                # Jitter so that several waiting processes do not retry in lock-step.
                # The cap is short because a busy writer (the labelling app under load)
                # frees the file only for moments between its transactions.
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.25)
        attached = _ATTACHED[key] = _Attached(alias, read_only)
        return attached

    def _migrate(self, conn: duckdb.DuckDBPyConnection) -> None:
        tables = {row[0] for row in conn.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()").fetchall()}
        if MIGRATIONS_TABLE not in tables:
            if tables:
                raise NotAFlywheelDatabase(
                    f"{self.path} is a DuckDB file but not a flywheel database "
                    f"(it has tables {sorted(tables)[:5]} and no {MIGRATIONS_TABLE})"
                )
            conn.execute(
                f"CREATE TABLE {MIGRATIONS_TABLE} (id INTEGER PRIMARY KEY, name VARCHAR NOT NULL,"
                " applied_at TIMESTAMP NOT NULL DEFAULT current_timestamp)"
            )
        applied = {row[0] for row in conn.execute(f"SELECT id FROM {MIGRATIONS_TABLE}").fetchall()}
        newest = max(applied, default=0)
        if newest > SCHEMA_VERSION:
            raise NewerSchemaError(
                f"{self.path} has schema version {newest}, newer than this flywheel's "
                f"{SCHEMA_VERSION}: upgrade flywheel to open it"
            )
        for number, fn in enumerate(MIGRATIONS, start=1):
            if number in applied:
                continue
            conn.execute("BEGIN")
            try:
                fn(conn)
                conn.execute(
                    f"INSERT INTO {MIGRATIONS_TABLE} (id, name) VALUES (?, ?)", [number, fn.__name__]
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def schema_version(self) -> int:
        with self._connection(read_only=True) as conn:
            return conn.execute(f"SELECT max(id) FROM {MIGRATIONS_TABLE}").fetchone()[0]

    # -- transactions --------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator["StoreSession"]:
        """One transaction on a connection of its own: all of it lands, or none of it."""
        with self._connection() as conn:
            conn.execute("BEGIN")
            try:
                yield StoreSession(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def query(self, sql: str, params: Sequence[Any] | None = None) -> tuple[list[str], list[tuple]]:
        """Run a read-only statement for a user: columns and rows. Writes are refused."""
        try:
            statements = duckdb.extract_statements(sql)
        except duckdb.Error as error:
            raise ReadOnlyQueryError(f"SQL does not parse: {_first_line(error)}") from error
        if len(statements) != 1:
            raise ReadOnlyQueryError(f"give exactly one SQL statement, got {len(statements)}")
        kind = statements[0].type
        if kind not in (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN):
            raise ReadOnlyQueryError(
                f"flywheel sql is read-only: {kind.name} statements are refused"
            )
        # A read-only attachment is the guarantee (where the file is attached read-write
        # already, by held() or a transaction this call is nested in, a read-only
        # transaction); the check above gives the clear message. Both refuse
        # `EXPLAIN ANALYZE DELETE ...` and `SELECT nextval(...)`, which the check lets by.
        with self._connection(read_only=True) as conn:
            shared = not _ATTACHED[self._key].read_only
            if shared:
                conn.execute("BEGIN TRANSACTION READ ONLY")
            try:
                cursor = conn.execute(sql, params or [])
                columns = [d[0] for d in cursor.description]
                return columns, cursor.fetchall()
            except duckdb.Error as error:
                raise ReadOnlyQueryError(_first_line(error)) from error
            finally:
                if shared:
                    conn.execute("ROLLBACK")

    # -- convenience reads (each one short transaction) -----------------------------------

    def __getattr__(self, name: str) -> Any:
        # `store.current_policy()` is shorthand for one read transaction calling the
        # session method of the same name; only readers are exposed this way.
        if name in StoreSession.READERS:
            def read(*args: Any, **kwargs: Any) -> Any:
                with self.transaction() as session:
                    return getattr(session, name)(*args, **kwargs)

            return read
        raise AttributeError(name)


class StoreSession:
    """Reads and writes inside one open transaction. Get one from `Store.transaction()`."""

    READERS = frozenset(
        {
            "prompts",
            "checkpoint",
            "current_policy",
            "reference_checkpoint",
            "get_round",
            "unfinished_round",
            "completions",
            "pairs_to_judge",
            "count_preferences",
            "preference_triples",
            "reference_logps",
            "evaluation",
            "count",
            "sampled_prompt_ids",
        }
    )

    def __init__(self, conn: duckdb.DuckDBPyConnection) -> None:
        self.conn = conn

    def _next_ids(self, sequence: str, n: int) -> list[int]:
        if n == 0:
            return []
        ids = self.conn.execute(f"SELECT nextval('{sequence}') AS id FROM range(?)", [n]).fetchnumpy()["id"]
        return sorted(ids.tolist())  # one column at once: 100k ids in a third of fetchall's time

    def _insert_arrow(self, table: str, columns: dict[str, pa.Array]) -> None:
        arrow_table = pa.table(columns)
        # DuckDB reads one Arrow record batch on one thread: cut big inserts into batches so
        # that all its threads take part (row order is kept). 100k completions: the INSERT
        # takes about 40% less time.
        batches = arrow_table.to_batches(max_chunksize=_ARROW_BATCH_ROWS)
        arrow_table = pa.Table.from_batches(batches, arrow_table.schema)
        self.conn.register("_flywheel_rows", arrow_table)
        try:
            names = ", ".join(columns)
            self.conn.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM _flywheel_rows")
        finally:
            self.conn.unregister("_flywheel_rows")

    def _insert_in_chunks(self, table: str, records: Sequence[Any], ids: Sequence[int],
                          columns_of: Callable[[Sequence[Any], Sequence[int]], dict[str, pa.Array]]) -> None:
        """Insert records, `columns_of(records, ids)` at a time, in chunks: while DuckDB
        inserts one chunk (without the GIL, on a worker thread), this thread turns the next
        into Arrow columns. Converting records costs a fifth of a large insert's CPU time
        (a third when token ids come as Python lists), so it mostly hides behind the insert."""
        starts = range(0, len(records), _INSERT_CHUNK_ROWS)
        if len(starts) <= 1:
            self._insert_arrow(table, columns_of(records, ids))
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="flywheel-insert") as inserter:
            inserting = None
            for start in starts:
                end = start + _INSERT_CHUNK_ROWS
                columns = columns_of(records[start:end], ids[start:end])
                if inserting is not None:
                    inserting.result()
                inserting = inserter.submit(self._insert_arrow, table, columns)
            inserting.result()

    def count(self, table: str, where: str = "true", params: Sequence[Any] = ()) -> int:
        return self.conn.execute(f"SELECT count(*) FROM {table} WHERE {where}", list(params)).fetchone()[0]

    # -- prompts -------------------------------------------------------------------------

    def add_prompts(self, texts: Sequence[str], split: str, source: str | None = None) -> list[int]:
        """Insert prompts not already present for `split`; return ids of all `texts`, in order."""
        self.conn.execute(
            "INSERT INTO prompts (text, split, source) "
            "SELECT DISTINCT t, ?, ? FROM unnest(?::VARCHAR[]) AS u(t) "
            "WHERE t NOT IN (SELECT text FROM prompts WHERE split = ?)",
            [split, source, list(texts), split],
        )
        ids = dict(
            self.conn.execute(
                "SELECT text, prompt_id FROM prompts WHERE split = ? AND text IN (SELECT unnest(?::VARCHAR[]))",
                [split, list(texts)],
            ).fetchall()
        )
        return [ids[t] for t in texts]

    def add_skipped_prompts(self, source: str, split: str, skipped: Sequence[tuple[int, str, int | None]]) -> None:
        """Record (row number, reason, token count) of prompts read but not used; a row
        recorded before is left as it was."""
        for row_number, reason, token_count in skipped:
            self.conn.execute(
                "INSERT INTO skipped_prompts (source, split, row_number, reason, token_count) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [source, split, row_number, reason, token_count],
            )

    def prompts(self, split: str) -> list[Prompt]:
        rows = self.conn.execute(
            "SELECT prompt_id, text, split FROM prompts WHERE split = ? ORDER BY prompt_id", [split]
        ).fetchall()
        return [Prompt(*row) for row in rows]

    # -- checkpoints ---------------------------------------------------------------------

    def add_checkpoint(
        self,
        path: str,
        role: str,
        status: str,
        parent_checkpoint_id: int | None = None,
        round_id: int | None = None,
    ) -> int:
        return self.conn.execute(
            "INSERT INTO checkpoints (path, role, status, parent_checkpoint_id, round_id, promoted_at) "
            "VALUES (?, ?, ?, ?, ?, CASE WHEN ? = 'promoted' THEN current_timestamp END) "
            "RETURNING checkpoint_id",
            [str(path), role, status, parent_checkpoint_id, round_id, status],
        ).fetchone()[0]

    def checkpoint(self, checkpoint_id: int) -> Checkpoint:
        row = self.conn.execute(
            "SELECT checkpoint_id, path, role, status, parent_checkpoint_id, round_id "
            "FROM checkpoints WHERE checkpoint_id = ?",
            [checkpoint_id],
        ).fetchone()
        if row is None:
            raise StoreError(f"no checkpoint with id {checkpoint_id}")
        return Checkpoint(*row)

    def current_policy(self) -> Checkpoint | None:
        """The incumbent: the most recently promoted checkpoint."""
        row = self.conn.execute(
            "SELECT checkpoint_id FROM checkpoints WHERE status = 'promoted' "
            "ORDER BY promoted_at DESC, checkpoint_id DESC LIMIT 1"
        ).fetchone()
        return self.checkpoint(row[0]) if row else None

    def reference_checkpoint(self) -> Checkpoint | None:
        row = self.conn.execute(
            "SELECT checkpoint_id FROM checkpoints WHERE role = 'reference' ORDER BY checkpoint_id LIMIT 1"
        ).fetchone()
        return self.checkpoint(row[0]) if row else None

    def set_checkpoint_status(self, checkpoint_id: int, status: str) -> None:
        self.conn.execute(
            "UPDATE checkpoints SET status = ?, "
            "promoted_at = CASE WHEN ? = 'promoted' THEN current_timestamp ELSE promoted_at END "
            "WHERE checkpoint_id = ?",
            [status, status, checkpoint_id],
        )

    def record_promotion(
        self, checkpoint_id: int, action: str, decided_by: str, reason: str | None, round_id: int | None,
        policy_before: int | None,
    ) -> None:
        """Log a promotion decision; call it in the transaction that applied it, after it."""
        policy_after = self.current_policy()
        self.conn.execute(
            "INSERT INTO promotions (checkpoint_id, action, decided_by, reason, round_id, policy_before, "
            "policy_after) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [checkpoint_id, action, decided_by, reason, round_id, policy_before,
             policy_after.checkpoint_id if policy_after else None],
        )

    # -- rounds --------------------------------------------------------------------------

    def start_round(
        self, policy_checkpoint_id: int, reference_checkpoint_id: int, seed: int, config: dict[str, Any]
    ) -> int:
        return self.conn.execute(
            "INSERT INTO rounds (state, policy_checkpoint_id, reference_checkpoint_id, seed, config) "
            "VALUES ('started', ?, ?, ?, ?) RETURNING round_id",
            [policy_checkpoint_id, reference_checkpoint_id, seed, json.dumps(config)],
        ).fetchone()[0]

    def get_round(self, round_id: int) -> Round:
        row = self.conn.execute(
            "SELECT round_id, state, policy_checkpoint_id, reference_checkpoint_id, "
            "candidate_checkpoint_id, seed, config, judge_name, judge_version FROM rounds WHERE round_id = ?",
            [round_id],
        ).fetchone()
        if row is None:
            raise StoreError(f"no round with id {round_id}")
        *head, config, judge_name, judge_version = row
        return Round(*head, config=json.loads(config) if config else {},
                     judge_name=judge_name, judge_version=judge_version)

    def claim_round_judge(self, round_id: int, judge_name: str, judge_version: str) -> tuple[str, str]:
        """Make this judge the round's training labeller unless one already is; return the
        round's judge (name, version), which the caller compares with its own."""
        self.conn.execute(
            "UPDATE rounds SET judge_name = ?, judge_version = ? "
            "WHERE round_id = ? AND judge_name IS NULL",
            [judge_name, judge_version, round_id],
        )
        round_ = self.get_round(round_id)
        return round_.judge_name, round_.judge_version

    def unfinished_round(self) -> Round | None:
        row = self.conn.execute(
            "SELECT round_id FROM rounds WHERE state <> 'done' ORDER BY round_id LIMIT 1"
        ).fetchone()
        return self.get_round(row[0]) if row else None

    def finish_step(self, round_id: int, state: str, candidate_checkpoint_id: int | None = None) -> None:
        """Record that a round finished `state`; call it in the transaction that wrote the rows."""
        if state not in ROUND_STATES:
            raise ValueError(f"unknown round state {state!r}")
        self.conn.execute(
            "UPDATE rounds SET state = ?, updated_at = current_timestamp, "
            "candidate_checkpoint_id = coalesce(?, candidate_checkpoint_id), "
            "finished_at = CASE WHEN ? = 'done' THEN current_timestamp END "
            "WHERE round_id = ?",
            [state, candidate_checkpoint_id, state, round_id],
        )

    # -- completions ---------------------------------------------------------------------

    def add_completions(self, completions: Sequence[Completion]) -> list[int]:
        ids = self._next_ids("completion_ids", len(completions))
        if not ids:
            return []
        self._insert_in_chunks("completions", completions, ids, completion_columns)
        return ids

    def sampled_prompt_ids(self, round_id: int) -> set[int]:
        """Prompts whose training completions this round has stored (a batch is all or nothing)."""
        rows = self.conn.execute(
            "SELECT DISTINCT prompt_id FROM completions WHERE round_id = ? AND purpose = 'train'", [round_id]
        ).fetchall()
        return {row[0] for row in rows}

    def completions(
        self,
        *,
        round_id: int | None = None,
        checkpoint_id: int | None = None,
        purpose: str | None = None,
    ) -> list[Completion]:
        clauses, params = [], []
        for column, value in (("round_id", round_id), ("checkpoint_id", checkpoint_id), ("purpose", purpose)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = " AND ".join(clauses) or "true"
        rows = _rows_through_arrow(self.conn.execute(
            "SELECT prompt_id, checkpoint_id, purpose, sample_index, text, prompt_token_ids, "
            "token_ids, cumulative_logprob, finish_reason, sampling_params, round_id, completion_id "
            f"FROM completions WHERE {where} ORDER BY completion_id",
            params,
        ))
        return [
            Completion(*row[:9], sampling_params=orjson.loads(row[9]), round_id=row[10], completion_id=row[11])
            for row in rows
        ]

    # -- pairs and labels ----------------------------------------------------------------

    def add_pairs(self, pairs: Sequence[Pair]) -> list[int]:
        ids = self._next_ids("pair_ids", len(pairs))
        if not ids:
            return []
        self._insert_arrow("pairs", {"pair_id": pa.array(ids, pa.int64()), **_field_columns(pairs, {
            "round_id": pa.int64(), "prompt_id": pa.int64(), "completion_a_id": pa.int64(),
            "completion_b_id": pa.int64(), "strategy": pa.string(),
        })})
        return ids

    def pairs_to_judge(self, round_id: int, judge_name: str, judge_version: str) -> list[tuple[int, str, str, str]]:
        """(pair_id, prompt, completion a, completion b) of the round's pairs this judge
        has neither labelled nor failed on yet."""
        return self.conn.execute(
            "SELECT p.pair_id, p.prompt, p.completion_a, p.completion_b FROM pair_texts p "
            "WHERE p.round_id = ? "
            "AND p.pair_id NOT IN (SELECT pair_id FROM labels WHERE judge_name = ? AND judge_version = ?) "
            "AND p.pair_id NOT IN (SELECT pair_id FROM judge_failures WHERE judge_name = ? AND judge_version = ?) "
            "ORDER BY p.pair_id",
            [round_id, judge_name, judge_version, judge_name, judge_version],
        ).fetchall()

    def _insert_records(self, table: str, records: Sequence[Any], types: dict[str, pa.DataType]) -> None:
        """Insert dataclass records whose fields are the table's columns (`_record_columns`)."""
        if records:
            self._insert_arrow(table, _record_columns(records, types))

    def add_judge_failures(self, failures: Sequence[JudgeFailure]) -> None:
        self._insert_records("judge_failures", failures, {"pair_id": pa.int64()})

    def add_completion_scores(self, scores: Sequence[CompletionScore]) -> None:
        self._insert_records("completion_scores", scores, {"completion_id": pa.int64(), "score": pa.float64()})

    def add_labels(self, labels: Sequence[Label]) -> list[int]:
        bad = sorted({l.winner for l in labels} - set(WINNERS))
        if bad:
            raise StoreError(f"label winner must be one of {WINNERS}, got {bad}")
        ids = self._next_ids("label_ids", len(labels))
        if not ids:
            return []
        self._insert_arrow("labels", label_columns(labels, ids))
        return ids

    def count_preferences(self, round_id: int) -> int:
        """How many of the round's pairs its own judge gave a winner."""
        return self.conn.execute(
            f"SELECT count(*) FROM ({_ROUND_PREFERENCES.format(rounds='pf.round_id = ?')})", [round_id]
        ).fetchone()[0]

    def preference_triples(self, round_id: int, earlier_rounds: bool = False) -> list[PreferenceTriple]:
        """The round's preferences (`_ROUND_PREFERENCES`) as token ids, what vLLM produced;
        with `earlier_rounds`, those of every round before it instead (for replay)."""
        rounds = "pf.round_id < ?" if earlier_rounds else "pf.round_id = ?"
        rows = _rows_through_arrow(self.conn.execute(
            "SELECT pf.pair_id, c.prompt_token_ids, c.token_ids, r.token_ids, c.completion_id, r.completion_id "
            f"FROM ({_ROUND_PREFERENCES.format(rounds=rounds)}) pf "
            "JOIN completions c ON c.completion_id = pf.chosen_completion_id "
            "JOIN completions r ON r.completion_id = pf.rejected_completion_id "
            "ORDER BY pf.label_id",
            [round_id],
        ))
        return [PreferenceTriple(*row) for row in rows]

    def reference_logps(self, checkpoint_id: int, completion_ids: Sequence[int]) -> dict[int, float]:
        """Cached reference log-probs (sums over completion tokens) of these completions."""
        return dict(self.conn.execute(
            "SELECT completion_id, logp FROM reference_logps WHERE checkpoint_id = ? "
            "AND completion_id IN (SELECT unnest(?::BIGINT[]))",
            [checkpoint_id, list(completion_ids)],
        ).fetchall())

    def add_reference_logps(self, checkpoint_id: int, logps: dict[int, float]) -> None:
        self._insert_arrow("reference_logps", {
            "completion_id": pa.array(list(logps), pa.int64()),
            "checkpoint_id": pa.array([checkpoint_id] * len(logps), pa.int64()),
            "logp": pa.array(list(logps.values()), pa.float64()),
        })

    # -- training and evaluation ---------------------------------------------------------

    def add_train_steps(self, steps: Sequence[TrainStep]) -> None:
        if not steps:
            return
        columns = {
            "round_id": pa.array([s.round_id for s in steps], pa.int64()),
            "checkpoint_id": pa.array([s.checkpoint_id for s in steps], pa.int64()),
        }
        for name in StepMetrics.__dataclass_fields__:
            if name != "pair_ids":
                columns[name] = pa.array([getattr(s.metrics, name) for s in steps])
        self._insert_arrow("train_steps", columns)
        # Lineage: which pairs each step trained on.
        lineage = [(s.checkpoint_id, s.metrics.step, pair_id) for s in steps for pair_id in s.metrics.pair_ids]
        if lineage:
            checkpoints, step_numbers, pair_ids = zip(*lineage)
            self._insert_arrow("train_pairs", {
                "checkpoint_id": pa.array(checkpoints, pa.int64()),
                "step": pa.array(step_numbers, pa.int32()),
                "pair_id": pa.array(pair_ids, pa.int64()),
            })

    def add_evaluation(self, evaluation: Evaluation) -> int:
        fields = list(Evaluation.__dataclass_fields__)
        return self.conn.execute(
            f"INSERT INTO evals ({', '.join(fields)}) VALUES ({', '.join('?' for _ in fields)}) "
            "RETURNING eval_id",
            [getattr(evaluation, f) for f in fields],
        ).fetchone()[0]

    def evaluation(self, round_id: int, checkpoint_id: int) -> Evaluation:
        fields = list(Evaluation.__dataclass_fields__)
        row = self.conn.execute(
            f"SELECT {', '.join(fields)} FROM evals WHERE round_id = ? AND checkpoint_id = ? "
            "ORDER BY eval_id DESC LIMIT 1",
            [round_id, checkpoint_id],
        ).fetchone()
        if row is None:
            raise StoreError(f"round {round_id} has no evaluation of checkpoint {checkpoint_id}")
        return Evaluation(*row)
