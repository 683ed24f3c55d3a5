"""The SQL of the run lease: the one row that says which flywheel process runs rounds.

Times are naive UTC (`storage.queue.utc_now`), like the queue's. The policy (when a lease
is stale, the heartbeat) lives in `flywheel.lease`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from storage.store import Transaction

LEASE_KEY = "rounds"


@dataclass(frozen=True)
class RunLease:
    holder: str
    host: str
    pid: int
    ttl_seconds: float
    acquired_at: datetime
    heartbeat_at: datetime
    # (pid, start time) of each process the holder started, as last recorded.
    processes: tuple[tuple[int, int], ...] = ()


def current_lease(tx: Transaction) -> RunLease | None:
    row = tx.execute(
        "SELECT holder, host, pid, ttl_seconds, acquired_at, heartbeat_at, processes FROM run_lease "
        "WHERE lease_key = ?",
        [LEASE_KEY],
    ).fetchone()
    if row is None:
        return None
    return RunLease(*row[:-1], processes=tuple((pid, start) for pid, start in json.loads(row[-1] or "[]")))


def take_lease(tx: Transaction, lease: RunLease) -> None:
    """Hold the lease, replacing whoever held it (the caller decided they may be replaced)."""
    tx.execute("DELETE FROM run_lease WHERE lease_key = ?", [LEASE_KEY])
    tx.execute(
        "INSERT INTO run_lease (lease_key, holder, host, pid, ttl_seconds, acquired_at, heartbeat_at, processes) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [LEASE_KEY, lease.holder, lease.host, lease.pid, lease.ttl_seconds, lease.acquired_at, lease.heartbeat_at,
         json.dumps(lease.processes)],
    )


def refresh_lease(tx: Transaction, holder: str, now: datetime, processes: tuple[tuple[int, int], ...]) -> bool:
    """Move the heartbeat on and record the holder's processes; False if `holder` no
    longer holds the lease."""
    row = tx.execute(
        "UPDATE run_lease SET heartbeat_at = ?, processes = ? WHERE lease_key = ? AND holder = ? RETURNING holder",
        [now, json.dumps(processes), LEASE_KEY, holder],
    ).fetchone()
    return row is not None


def release_lease(tx: Transaction, holder: str) -> None:
    tx.execute("DELETE FROM run_lease WHERE lease_key = ? AND holder = ?", [LEASE_KEY, holder])
