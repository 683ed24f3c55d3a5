"""What a round records about how it ran: each phase's seconds and peak GPU memory, and
what the sampler's engine did between them (start, reload, sleep, wake), in the order it
happened (table `round_phases`). The order is the evidence that the engine slept through
training and reloaded the new checkpoint on waking; the memory says where a GPU went.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator

import torch

from storage import tables
from storage.records import RoundPhase
from storage.store import Store


class GpuPeak:
    """The peak GPU memory of a stretch of work on the current device, in bytes.

    The peak of this process's allocator (`torch.cuda.max_memory_reserved`) plus what
    other processes hold (the vLLM engine's process above all), read from the device at
    the start and at the end. vLLM holds its memory from waking until it sleeps, and a
    phase that samples wakes and sleeps it inside the phase, so `PhaseLog` also takes the
    reading the sampler makes just before each sleep. Training processes started by
    `accelerate launch` (`train.num_processes > 1`) are not seen. None without CUDA."""

    def __init__(self) -> None:
        self.enabled = torch.cuda.is_available()
        self._others_at_start = 0
        if self.enabled:
            torch.cuda.reset_peak_memory_stats()
            self._others_at_start = self._held_by_others()

    @staticmethod
    def _held_by_others() -> int:
        free, total = torch.cuda.mem_get_info()
        return max(total - free - torch.cuda.memory_reserved(), 0)

    def peak_bytes(self) -> int | None:
        if not self.enabled:
            return None
        others = max(self._others_at_start, self._held_by_others())
        return others + torch.cuda.max_memory_reserved()


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)  # the store's naive UTC


class PhaseLog:
    """Records a flywheel's phases, and the sampler's engine events inside each, into
    `round_phases`. `sampler` is anything with `take_events() -> list[EngineEvent]`."""

    def __init__(self, store: Store, sampler) -> None:
        self.store = store
        self.sampler = sampler

    @contextmanager
    def phase(self, round_id: int, name: str) -> Iterator[None]:
        """Time the block and its peak GPU memory; record it, with the engine events it saw,
        when it ends without an error (a failed phase runs again on resume)."""
        self.sampler.take_events()  # any from outside a phase belong to no round's phase
        started_at, started = _now(), time.perf_counter()
        peak = GpuPeak()
        yield
        events = self.sampler.take_events()
        readings = [b for b in (peak.peak_bytes(), *(e.device_bytes for e in events)) if b is not None]
        rows = [RoundPhase(round_id, "phase", name, None, started_at, time.perf_counter() - started,
                           max(readings) if readings else None)]
        rows += [RoundPhase(round_id, "sampler", e.name, e.detail, e.at, e.seconds, e.device_bytes) for e in events]
        with self.store.transaction() as tx:
            tables.add_round_phases(tx, rows)
