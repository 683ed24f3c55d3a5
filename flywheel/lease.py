"""One flywheel process runs rounds on a database at a time.

The process that starts a round takes the lease (a row in `run_lease`) and refreshes its
heartbeat from a background thread until it closes. Another process that finds a live
lease refuses to start with a one-line error. A lease is stale, and is taken over, when
its process is gone (same host) or its heartbeat is older than its ttl (any host, e.g. a
machine that died), so a SIGKILLed run never blocks the next one.

A SIGKILLed run also leaves its vLLM engine processes behind (vLLM's engine process does
not watch its parent), holding memory and, on a GPU host, the GPU. So the heartbeat
thread also records, within a second of their start, the processes this one started (its
descendants, by pid and start time), and whoever takes over a dead holder's lease on the
same host stops those still running. (Not by a tag in their environment: vLLM renames its
processes with setproctitle, which overwrites that memory.)
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import threading
import time
import uuid
import weakref
from datetime import datetime
from pathlib import Path
from typing import Callable

from flywheel.errors import UserError
from storage.lease import RunLease, current_lease, refresh_lease, release_lease, take_lease
from storage.queue import utc_now
from storage.store import Store, StoreError

DEFAULT_TTL_SECONDS = 60.0
# How often the heartbeat thread looks for new child processes to record.
PROCESS_CHECK_SECONDS = 1.0


class LeaseHeldError(UserError):
    """Another live flywheel process runs rounds on this database."""


def process_is_alive(pid: int) -> bool:
    """Whether `pid` runs on this host (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return "zombie" not in line
    except OSError:
        pass
    return True


def proc_stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the process name (which may hold spaces): state is [0],
    the parent's pid [1], the start time [19]."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def started_processes(root: int) -> tuple[tuple[int, int], ...]:
    """(pid, start time) of every live descendant of `root`, on this host."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        fields = proc_stat_fields(int(proc.name))
        if fields is None or fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(proc.name))
        starts[int(proc.name)] = int(fields[19])
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append((pid, starts[pid]))
        todo += children.get(pid, [])
    return tuple(sorted(found))


def still_running(pid: int, start: int) -> bool:
    """Whether the process recorded as (pid, start time) still runs: not gone, not a
    zombie, and its pid not taken by a newer process."""
    fields = proc_stat_fields(pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == start


def stop_processes(recorded: tuple[tuple[int, int], ...], wait_s: float = 10.0) -> list[int]:
    """SIGKILL the recorded processes that still run (same pid and start time), and what
    they started since; returns their pids once they are gone (or `wait_s` has passed), so
    that the memory they held (an engine's KV cache) is free for what starts next."""
    victims = set()
    for pid, start in recorded:
        if still_running(pid, start):
            victims |= {(pid, start), *started_processes(pid)}
    killed = set()
    for pid, start in victims:
        try:
            os.kill(pid, signal.SIGKILL)
            killed.add((pid, start))
        except OSError:  # gone meanwhile, or not ours
            continue
    deadline = time.monotonic() + wait_s
    while any(still_running(pid, start) for pid, start in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    return sorted(pid for pid, _ in killed)


def stale_because(lease: RunLease, now: datetime, host: str) -> str | None:
    """Why `lease` may be taken over, or None while its holder looks alive."""
    if lease.host == host and lease.pid == os.getpid():
        return "it was this process's"
    if lease.host == host and not process_is_alive(lease.pid):
        return f"process {lease.pid} is gone"
    silent = (now - lease.heartbeat_at).total_seconds()
    if silent > lease.ttl_seconds:
        return f"its heartbeat stopped {silent:.0f} s ago"
    return None


# Heartbeat threads still beating when the interpreter exits (a flywheel that was never
# closed): stopped before Python finalizes, because a daemon thread killed inside DuckDB's
# native code (opening the file) aborts the whole process ("terminate called without an
# active exception", exit status 134) after everything else has finished.
_BEATING: weakref.WeakSet[RoundLease] = weakref.WeakSet()


@atexit.register
def _stop_heartbeats_at_exit() -> None:
    for lease in list(_BEATING):
        lease.stop_heartbeat()


class RoundLease:
    """This process's claim on a database's rounds: `acquire` (idempotent), `release`."""

    def __init__(self, store: Store, log: Callable[[str], None], ttl_seconds: float = DEFAULT_TTL_SECONDS) -> None:
        self.store = store
        self.log = log
        self.ttl_seconds = ttl_seconds
        self.host = socket.gethostname()
        self.holder = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._heartbeat is not None

    def acquire(self) -> None:
        if self.held:
            return
        now = utc_now()
        with self.store.transaction() as tx:
            lease = current_lease(tx)
            if lease is not None and lease.holder != self.holder:
                because = stale_because(lease, now, self.host)
                if because is None:
                    raise LeaseHeldError(
                        f"{self.store.path} is in use by another flywheel (pid {lease.pid} on {lease.host}, "
                        f"running since {lease.acquired_at:%Y-%m-%d %H:%M:%S} UTC, last heartbeat "
                        f"{(now - lease.heartbeat_at).total_seconds():.0f} s ago); wait for it to finish or "
                        "stop it, then run again"
                    )
                self.log(f"taking over the run lease of {lease.holder}: {because}")
                if lease.host == self.host and lease.pid != os.getpid():
                    left = stop_processes(lease.processes)
                    if left:
                        self.log(f"stopped {len(left)} process(es) it left running (pids {', '.join(map(str, left))})")
            take_lease(tx, RunLease(self.holder, self.host, os.getpid(), self.ttl_seconds, now, now,
                                    started_processes(os.getpid())))
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="flywheel-lease-heartbeat", daemon=True)
        self._heartbeat.start()
        _BEATING.add(self)

    def _beat(self) -> None:
        # Four beats per ttl: a few slow or locked beats in a row do not make the lease
        # stale. Between beats, a new child process (an engine starting) is recorded at once.
        beat_every = self.ttl_seconds / 4
        recorded, last_beat = None, time.monotonic()
        while not self._stop.wait(min(beat_every, PROCESS_CHECK_SECONDS)):
            processes = started_processes(os.getpid())
            if processes == recorded and time.monotonic() - last_beat < beat_every:
                continue
            try:
                with self.store.transaction() as tx:
                    still_ours = refresh_lease(tx, self.holder, utc_now(), processes)
            except StoreError as error:
                self.log(f"run lease heartbeat failed, will retry: {error}")
                continue
            recorded, last_beat = processes, time.monotonic()
            if not still_ours:
                self.log("warning: another process took over this database's run lease")
                return

    def stop_heartbeat(self) -> None:
        """Stop refreshing the lease (it goes stale after its ttl); `release` also deletes it."""
        if self._heartbeat is None:
            return
        self._stop.set()
        self._heartbeat.join()
        self._heartbeat = None
        _BEATING.discard(self)

    def release(self) -> None:
        if not self.held:
            return
        self.stop_heartbeat()
        with self.store.transaction() as tx:
            release_lease(tx, self.holder)

