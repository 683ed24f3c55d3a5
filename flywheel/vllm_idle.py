"""A vLLM general plugin: a shorter busy-wait for vLLM workers that have gone idle.

vLLM's engine sends each step to its worker processes through a shared-memory queue. A
worker that has read a message spins on that queue (`os.sched_yield` in a loop) for one
second before it falls back to waiting on a socket. After every `generate` call, each
worker therefore burns a whole core for a second. On a GPU host that is one core of many;
on a small CPU host (two cores here) it is half the machine, taken from the store writes,
pairing and training that follow sampling in a round.

vLLM loads the `vllm.general_plugins` entry points in each of its processes (pyproject
registers `shorten_idle_spin`). It acts only where the sampler has set
`FLYWHEEL_VLLM_IDLE_SPIN_S` (so other vLLM use in the same environment is untouched) and
caps the readers' spin at that many seconds. A reader past its spin waits on vLLM's own
notify socket, which the writer pings on every message: that is how every `generate`
after a second's pause already starts. Decode steps longer than the cap run as fast
through it: with a 20 ms cap, the sampling benchmark's 6-layer model (94 ms steps) made
2,733 tokens/s against 2,820 with vLLM's second. With no spin at all (0) vLLM stalled for
seconds at a time, so values of 0 or less are ignored. If vLLM changes this internal
class, the plugin does nothing.
"""

from __future__ import annotations

import os

IDLE_SPIN_ENV = "FLYWHEEL_VLLM_IDLE_SPIN_S"
# A tenth of vLLM's second: the gaps between decode steps stay spun through, and an idle
# worker burns at most a tenth of a core-second after each call.
DEFAULT_IDLE_SPIN_S = 0.1


def shorten_idle_spin() -> None:
    value = os.environ.get(IDLE_SPIN_ENV)
    if value is None:
        return
    try:
        limit = float(value)
        from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    except (ValueError, ImportError):
        return
    if not limit > 0:
        return
    if getattr(SpinCondition, "_flywheel_idle_spin_s", None) is not None:
        return
    vllm_init = SpinCondition.__init__

    def __init__(self, *args, **kwargs):
        vllm_init(self, *args, **kwargs)
        if getattr(self, "is_reader", False) and isinstance(getattr(self, "busy_loop_s", None), (int, float)):
            self.busy_loop_s = min(self.busy_loop_s, limit)

    SpinCondition.__init__ = __init__
    SpinCondition._flywheel_idle_spin_s = limit
