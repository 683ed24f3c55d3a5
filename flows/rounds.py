"""The Prefect flow: N flywheel rounds, each step a task named after it.

Thin on purpose: every task calls one `Flywheel` step with a database path and a round
id, and the logic runs the same without Prefect (`Flywheel.run_round`). The live
`Flywheel` (it owns the vLLM engine, which must outlive a task) is looked up by the
database path in this process's registry, so tasks pass only ids and paths.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flywheel.rounds import Flywheel

_LIVE: dict[str, Flywheel] = {}


def _flywheel(database: str) -> Flywheel:
    return _LIVE[database]


@task(name="begin-round", cache_policy=NO_CACHE)
def begin_round(database: str) -> int:
    return _flywheel(database).begin_round()


@task(name="sample", task_run_name="sample-round-{round_id}", cache_policy=NO_CACHE)
def sample(database: str, round_id: int) -> int:
    return _flywheel(database).sample(round_id)


@task(name="pair", task_run_name="pair-round-{round_id}", cache_policy=NO_CACHE)
def pair(database: str, round_id: int) -> int:
    return _flywheel(database).pair(round_id)


@task(name="label", task_run_name="label-round-{round_id}", cache_policy=NO_CACHE)
def label(database: str, round_id: int) -> int | None:
    return _flywheel(database).label(round_id)


@task(name="train", task_run_name="train-round-{round_id}", cache_policy=NO_CACHE)
def train(database: str, round_id: int) -> int | None:
    return _flywheel(database).train(round_id)


@task(name="evaluate", task_run_name="evaluate-round-{round_id}", cache_policy=NO_CACHE)
def evaluate(database: str, round_id: int) -> None:
    _flywheel(database).evaluate(round_id)


@task(name="promote", task_run_name="promote-round-{round_id}", cache_policy=NO_CACHE)
def promote(database: str, round_id: int) -> bool:
    return _flywheel(database).promote(round_id)


@flow(name="flywheel-rounds")
def flywheel_rounds(database: str, rounds: int) -> list[int]:
    """Run `rounds` rounds, resuming an unfinished one first. A round that waits for
    people ends the run; the next run (scheduled or by hand) picks it up."""
    round_ids = []
    for _ in range(rounds):
        round_id = begin_round(database)
        round_ids.append(round_id)
        sample(database, round_id)
        pair(database, round_id)
        if label(database, round_id) is None:
            break
        train(database, round_id)
        evaluate(database, round_id)
        promote(database, round_id)
    return round_ids


def run_rounds(flywheel: Flywheel, rounds: int) -> list[int]:
    """Run the flow for a live flywheel of this process."""
    database = str(flywheel.config.database)
    _LIVE[database] = flywheel
    try:
        return flywheel_rounds(database, rounds)
    finally:
        del _LIVE[database]
