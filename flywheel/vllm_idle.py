"""A vLLM general plugin: a shorter busy-wait for vLLM workers that have gone idle.

vLLM's engine sends each step to its worker processes through a shared-memory queue. A
worker that has read a message spins on that queue (`os.sched_yield` in a loop) for one
second before it falls back to waiting on a socket. After every `generate` call, each
worker therefore burns a whole core for a second. On a GPU host that is one core of many;
on a small CPU host (two cores here) it is half the machine, taken from the store writes,
pairing and training that follow sampling in a round.

vLLM loads the `vllm.general_plugins` entry points in each of its processes (pyproject
registers `shorten_idle_spin`). In a worker process (vLLM names them `VllmWorker-N`) where
`FLYWHEEL_VLLM_IDLE_SPIN_S` is set, it caps the spin at that many seconds. The sampler
sets it before it starts its engine, so engines this process starts after that (an LLM
judge's too) get the cap, and other programs' vLLM does not. The engine's scheduler
process is left alone: it blocks on its input queue when idle and does not spin.

A worker past its spin waits on vLLM's own notify socket, which the writer pings on every
message: that is how every `generate` after a second's pause already starts, and how a
worker waits for the next step after a step longer than the cap. With a 20 ms cap, the
sampling benchmark's 6-layer model (94 ms steps, each such a wait) made 2,733 tokens/s
against 2,820 with vLLM's second, within that benchmark's noise. With no spin at all (0)
vLLM stalled for seconds at a time, so values of 0 or less are refused (with a warning),
as is anything that is not a number. If vLLM changes this internal class, the plugin
warns and does nothing: it must never stop an engine from starting.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os

IDLE_SPIN_ENV = "FLYWHEEL_VLLM_IDLE_SPIN_S"
# A tenth of vLLM's second: the gaps between decode steps stay spun through, and an idle
# worker burns at most a tenth of a core-second after each call.
DEFAULT_IDLE_SPIN_S = 0.1

_log = logging.getLogger(__name__)


def _in_vllm_worker() -> bool:
    return multiprocessing.current_process().name.startswith("VllmWorker")


def shorten_idle_spin() -> None:
    value = os.environ.get(IDLE_SPIN_ENV)
    if value is None or not _in_vllm_worker():
        return
    try:
        _cap_reader_spin(float(value))
    except Exception as error:  # vLLM runs plugins unguarded: an error here would stop the engine
        _log.warning("flywheel: %s=%r not applied: %s", IDLE_SPIN_ENV, value, error)


def _cap_reader_spin(limit: float) -> None:
    if not limit > 0:
        raise ValueError("must be a number of seconds above 0")
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    if getattr(SpinCondition, "_flywheel_idle_spin_s", None) is not None:
        return
    vllm_init = SpinCondition.__init__

    @functools.wraps(vllm_init)  # keeps vLLM's own as __wrapped__
    def __init__(self, *args, **kwargs):
        vllm_init(self, *args, **kwargs)
        # Read defensively: this runs inside vLLM's engine start, on its own class.
        if getattr(self, "is_reader", False) and isinstance(getattr(self, "busy_loop_s", None), (int, float)):
            self.busy_loop_s = min(self.busy_loop_s, limit)

    SpinCondition.__init__ = __init__
    SpinCondition._flywheel_idle_spin_s = limit
