"""The live `Flywheel` objects of this process, by database path.

A flywheel owns its vLLM engine, which must outlive any one task, so tasks look it up
here by the database path they are given. This lives in its own plain module, not beside
the flows: a served flow run gets its flow function by value through cloudpickle (the
decorated name is the Flow, not the function), with a copy of that module's globals, and
a registry there would not be the one the tasks read.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from flywheel.rounds import Flywheel

_LIVE: dict[str, Flywheel] = {}


@contextmanager
def registered(flywheel: Flywheel) -> Iterator[str]:
    """Make `flywheel` findable by its database path while the block runs; yields the path."""
    database = str(flywheel.config.database)
    _LIVE[database] = flywheel
    try:
        yield database
    finally:
        del _LIVE[database]


def flywheel_of(database: str) -> Flywheel:
    return _LIVE[database]
