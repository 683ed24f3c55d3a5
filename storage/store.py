"""The DuckDB store: one file per flywheel, opened for one transaction at a time.

DuckDB lets one process hold a file open for writing, so nothing here keeps the file open
across long work: every call opens it, runs one transaction and closes it. A lock held by
another process is retried with back-off and then reported in one line. The reads and
writes themselves are free functions in `storage.tables` (and `storage.queue`,
`storage.lease`) that take the open transaction.
"""

from __future__ import annotations

import os
import random
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import duckdb

from storage.migrations import MIGRATIONS, MIGRATIONS_TABLE

SCHEMA_VERSION = len(MIGRATIONS)

# What the functions of `storage.tables` take: a DuckDB connection inside one transaction.
Transaction = duckdb.DuckDBPyConnection
T = TypeVar("T")

# DuckDB shares one database instance between the connections of a process to one file;
# threads of a process (the run lease's heartbeat beside a round) take turns on it, so that
# two of our transactions never conflict with each other.
_ONE_CALL_AT_A_TIME = threading.RLock()


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


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


@contextmanager
def one_transaction(conn: duckdb.DuckDBPyConnection) -> Iterator[Transaction]:
    """One transaction on an open connection: committed when the block ends, rolled back
    if it raises."""
    conn.execute("BEGIN")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class Store:
    """The flywheel's database. Open with `Store.create` (new or existing) or `Store.open`."""

    def __init__(self, path: str | os.PathLike, *, lock_timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s

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
    def _connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The file, open while the block runs; closing it checkpoints it and frees the lock."""
        with _ONE_CALL_AT_A_TIME:
            conn = self.connect()
            try:
                yield conn
            finally:
                conn.close()

    def connect(self) -> duckdb.DuckDBPyConnection:
        """The file, opened (a lock held by another process is retried with back-off); the
        caller closes it. For a caller that takes turns on it itself (the labelling app);
        everything else uses `transaction`, `read` or `query`."""
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.02
        while True:
            try:
                return duckdb.connect(str(self.path))
            except duckdb.Error as error:
                if "Cannot open file" in str(error):  # a read-only or full disk, no permission
                    raise StoreError(f"cannot open {self.path}: {_first_line(error)}") from error
                if "different configuration" in str(error):  # e.g. duckdb.connect(path, read_only=True)
                    raise StoreError(f"{self.path} is open in another DuckDB connection of this process: "
                                     "close that connection first (or read through the store)") from error
                if "Could not set lock" not in str(error):  # DuckDB's words when another process holds it
                    raise NotAFlywheelDatabase(
                        f"{self.path} is not a readable DuckDB database: {_first_line(error)}"
                    ) from error
                if time.monotonic() >= deadline:
                    raise StoreLockedError(
                        f"{self.path} is locked by another process for more than "
                        f"{self.lock_timeout_s:.0f} s: {_first_line(error)}"
                    ) from error
                self._say_waiting()
                # Jitter, so that several waiting processes do not retry in lock-step.
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.25)

    @property
    def waiting_marker(self) -> Path:
        """A file beside the database whose time says when a process last found the
        database locked. The labelling app, which keeps the file open while people's
        requests follow each other, closes it as soon as this is newer than its opening."""
        return self.path.with_name(self.path.name + ".waiting")

    def _say_waiting(self) -> None:
        try:
            self.waiting_marker.touch()
        except OSError:  # a read-only directory: the app still closes the file once idle
            pass

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
        return self.read(lambda tx: tx.execute(f"SELECT max(id) FROM {MIGRATIONS_TABLE}").fetchone()[0])

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One transaction on the file: all of it lands, or none of it."""
        with self._connection() as conn, one_transaction(conn) as tx:
            yield tx

    def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(tx, *args, **kwargs)` in a transaction of its own, e.g.
        `store.read(tables.current_policy)`."""
        with self.transaction() as tx:
            return fn(tx, *args, **kwargs)

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
            raise ReadOnlyQueryError(f"flywheel sql is read-only: {kind.name} statements are refused")
        # A read-only transaction is the guarantee; the check above gives the clear message.
        # It also refuses `EXPLAIN ANALYZE DELETE ...` and `SELECT nextval(...)`.
        with self._connection() as conn:
            conn.execute("BEGIN TRANSACTION READ ONLY")
            try:
                cursor = conn.execute(sql, params or [])
                return [d[0] for d in cursor.description], cursor.fetchall()
            except duckdb.Error as error:
                raise ReadOnlyQueryError(_first_line(error)) from error
            finally:
                conn.execute("ROLLBACK")
