"""The Prefect flows: N flywheel rounds, each step a task named after it; and the
scheduled flow `flywheel serve` runs, which builds its flywheel from a config file.

Thin on purpose: every task calls one `Flywheel` step with a database path and a round
id, and the logic runs the same without Prefect (`Flywheel.run_round`). The live
`Flywheel` (it owns the vLLM engine, which must outlive a task) is looked up by the
database path in this process's registry (`flows.live`), so tasks pass only ids and paths.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.live import flywheel_of, registered
from flywheel.config import load_config_file
from flywheel.report import markdown_table, plot_round_table, round_table
from flywheel.rounds import Flywheel

# Written beside the database after every round.
PLOT_NAME = "rounds.png"


@task(name="begin-round", cache_policy=NO_CACHE)
def begin_round(database: str) -> int:
    return flywheel_of(database).begin_round()


@task(name="sample", task_run_name="sample-round-{round_id}", cache_policy=NO_CACHE)
def sample(database: str, round_id: int) -> int:
    return flywheel_of(database).sample(round_id)


@task(name="pair", task_run_name="pair-round-{round_id}", cache_policy=NO_CACHE)
def pair(database: str, round_id: int) -> int:
    return flywheel_of(database).pair(round_id)


@task(name="label", task_run_name="label-round-{round_id}", cache_policy=NO_CACHE)
def label(database: str, round_id: int) -> int | None:
    return flywheel_of(database).label(round_id)


@task(name="train", task_run_name="train-round-{round_id}", cache_policy=NO_CACHE)
def train(database: str, round_id: int) -> int | None:
    return flywheel_of(database).train(round_id)


@task(name="evaluate", task_run_name="evaluate-round-{round_id}", cache_policy=NO_CACHE)
def evaluate(database: str, round_id: int) -> None:
    flywheel_of(database).evaluate(round_id)


@task(name="promote", task_run_name="promote-round-{round_id}", cache_policy=NO_CACHE)
def promote(database: str, round_id: int) -> bool:
    return flywheel_of(database).promote(round_id)


@task(name="publish-report", task_run_name="publish-report-round-{round_id}", cache_policy=NO_CACHE)
def publish_report(database: str, round_id: int) -> str:
    """The rounds table as a Prefect markdown artifact, and the plot as a PNG beside the database."""
    flywheel = flywheel_of(database)
    columns, rows = round_table(flywheel.store)
    plot = plot_round_table((columns, rows), flywheel.config.workdir / PLOT_NAME)
    create_markdown_artifact(
        key="flywheel-rounds",
        markdown=f"## Flywheel rounds after round {round_id}\n\n{markdown_table(columns, rows)}\n\n"
                 f"Plot: `{plot}`; database: `{database}`\n",
        description=f"flywheel rounds of {database}",
    )
    return str(plot)


def _run_rounds(database: str, rounds: int) -> list[int]:
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
        publish_report(database, round_id)
    return round_ids


@flow(name="flywheel-rounds")
def flywheel_rounds(database: str, rounds: int) -> list[int]:
    """Run `rounds` rounds, resuming an unfinished one first. A round that waits for
    people ends the run; the next run (scheduled or by hand) picks it up."""
    return _run_rounds(database, rounds)


@flow(name="flywheel-scheduled")
def scheduled_rounds(config_file: str, rounds: int = 1) -> list[int]:
    """What `flywheel serve` schedules: build the flywheel from its config file (each
    scheduled run is a fresh process), run `rounds` rounds, close it."""
    logger = get_run_logger()
    flywheel = Flywheel(load_config_file(Path(config_file)).config, log=logger.info)
    try:
        flywheel.initialise()
        with registered(flywheel) as database:
            return _run_rounds(database, rounds)
    finally:
        flywheel.close()


def serve_rounds(api_url: str, config_file: Path, cron: str, rounds: int, pause_on_shutdown: bool) -> None:
    """Serve `scheduled_rounds` on a cron schedule, through the Prefect server at
    `api_url`, until stopped. Runs never overlap: a run due while one is going is
    cancelled (deployment concurrency 1, cancel-new)."""
    # Prefect read its settings when it was imported; the server may have started since.
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        scheduled_rounds.serve(
            name=deployment_name(config_file),
            cron=cron,
            parameters={"config_file": str(config_file), "rounds": rounds},
            global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
            pause_on_shutdown=pause_on_shutdown,
            # By module, not file path: a scheduled run imports `flows.rounds` from the installed package.
            entrypoint_type=EntrypointType.MODULE_PATH,
            print_starting_message=False,
        )


def deployment_name(config_file: Path) -> str:
    """One deployment per config file: its name without the suffix."""
    return Path(config_file).stem


def run_rounds(flywheel: Flywheel, rounds: int) -> list[int]:
    """Run the flow for a live flywheel of this process."""
    with registered(flywheel) as database:
        return flywheel_rounds(database, rounds)
