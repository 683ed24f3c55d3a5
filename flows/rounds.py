"""The Prefect flow: N flywheel rounds, each step a task named after it.

Thin on purpose: the flow builds the `Flywheel` from its config, and every task calls one
of its steps with a round id; the logic runs the same without Prefect
(`Flywheel.run_round`). Tasks run in the flow's process and take the live `Flywheel` as an
argument (it owns the vLLM engine, which must outlive a task): Prefect hands task arguments
over as they are, and stores a flow parameter it cannot serialise (a judge or a sampler
object) as a placeholder (`Flow.serialize_parameters`). `flywheel serve` schedules the same
flow with the config file's path, read again by each run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType
from prefect.settings import PREFECT_API_URL, temporary_settings

from flywheel.config import FlywheelConfig, load_config_file
from flywheel.report import markdown_table, plot_round_table, round_table
from flywheel.rounds import Flywheel
from flywheel.sampling import VLLMSampler
from judges import HumanJudge, Judge

# Written beside the database after every round.
PLOT_NAME = "rounds.png"


@task(name="begin-round", cache_policy=NO_CACHE)
def begin_round(flywheel: Flywheel) -> int:
    return flywheel.begin_round()


@task(name="sample", task_run_name="sample-round-{round_id}", cache_policy=NO_CACHE)
def sample(flywheel: Flywheel, round_id: int) -> int:
    return flywheel.sample(round_id)


@task(name="pair", task_run_name="pair-round-{round_id}", cache_policy=NO_CACHE)
def pair(flywheel: Flywheel, round_id: int) -> int:
    return flywheel.pair(round_id)


@task(name="label", task_run_name="label-round-{round_id}", cache_policy=NO_CACHE)
def label(flywheel: Flywheel, round_id: int) -> int | None:
    return flywheel.label(round_id)


@task(name="train", task_run_name="train-round-{round_id}", cache_policy=NO_CACHE)
def train(flywheel: Flywheel, round_id: int) -> int | None:
    return flywheel.train(round_id)


@task(name="evaluate", task_run_name="evaluate-round-{round_id}", cache_policy=NO_CACHE)
def evaluate(flywheel: Flywheel, round_id: int) -> None:
    flywheel.evaluate(round_id)


@task(name="promote", task_run_name="promote-round-{round_id}", cache_policy=NO_CACHE)
def promote(flywheel: Flywheel, round_id: int) -> bool:
    return flywheel.promote(round_id)


@task(name="publish-report", task_run_name="publish-report-round-{round_id}", cache_policy=NO_CACHE)
def publish_report(flywheel: Flywheel, round_id: int) -> str:
    """The rounds table as a Prefect markdown artifact, and the plot as a PNG beside the database."""
    columns, rows = round_table(flywheel.store)
    plot = plot_round_table((columns, rows), flywheel.config.workdir / PLOT_NAME)
    database = flywheel.config.database
    create_markdown_artifact(
        key="flywheel-rounds",
        markdown=f"## Flywheel rounds after round {round_id}\n\n{markdown_table(columns, rows)}\n\n"
                 f"Plot: `{plot}`; database: `{database}`\n",
        description=f"flywheel rounds of {database}",
    )
    return str(plot)


# Parameters are not validated: pydantic would rebuild the config dataclass and judge objects.
@flow(name="flywheel-rounds", validate_parameters=False)
def flywheel_rounds(config: FlywheelConfig | str, rounds: int = 1, judge: Judge | HumanJudge | None = None,
                    eval_judge: Judge | None = None, sampler: VLLMSampler | None = None,
                    log: Callable[[str], None] | None = None) -> list[int]:
    """Run `rounds` rounds, resuming an unfinished one first. `config` is the config, or the
    path of its YAML file (what a scheduled run gets). A round that waits for people ends
    the run; the next run (scheduled or by hand) picks it up. Judges and a sampler given
    here are used instead of building them (a sampler given is left running); progress
    lines go to `log`, by default the flow run's logger."""
    if isinstance(config, str):
        config = load_config_file(Path(config)).config
    flywheel = Flywheel(config, log=log or get_run_logger().info, judge=judge, eval_judge=eval_judge, sampler=sampler)
    try:
        flywheel.initialise()
        round_ids = []
        for _ in range(rounds):
            round_id = begin_round(flywheel)
            round_ids.append(round_id)
            sample(flywheel, round_id)
            pair(flywheel, round_id)
            if label(flywheel, round_id) is None:
                break
            train(flywheel, round_id)
            evaluate(flywheel, round_id)
            promote(flywheel, round_id)
            publish_report(flywheel, round_id)
        return round_ids
    finally:
        flywheel.close()


def serve_rounds(api_url: str, config_file: Path, cron: str, rounds: int, pause_on_shutdown: bool) -> None:
    """Serve `flywheel_rounds` on a cron schedule, through the Prefect server at
    `api_url`, until stopped. Runs never overlap: a run due while one is going is
    cancelled (deployment concurrency 1, cancel-new)."""
    # Prefect read its settings when it was imported; the server may have started since.
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        flywheel_rounds.serve(
            name=deployment_name(config_file),
            cron=cron,
            parameters={"config": str(config_file), "rounds": rounds},
            global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
            pause_on_shutdown=pause_on_shutdown,
            # By module, not file path: a scheduled run imports `flows.rounds` from the installed package.
            entrypoint_type=EntrypointType.MODULE_PATH,
            print_starting_message=False,
        )


def deployment_name(config_file: Path) -> str:
    """One deployment per config file: its name without the suffix."""
    return Path(config_file).stem
