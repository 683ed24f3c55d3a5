"""Find or start the Prefect server that `flywheel serve` needs.

Prefect's temporary (ephemeral) API, which `flywheel run` uses, cannot run schedules:
a served deployment with a cron needs a real `prefect server start` (or Prefect Cloud)
named by PREFECT_API_URL (in the environment or the active Prefect profile).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from flywheel.errors import UserError

STARTUP_TIMEOUT_S = 120.0


def check_cron(expression: str) -> None:
    """A cron expression Prefect accepts, or a one-line UserError."""
    from prefect._internal.schemas.validators import validate_cron_string

    try:
        validate_cron_string(expression)
    except ValueError as error:
        raise UserError(f"--cron: {error} (five fields: minute hour day-of-month month day-of-week)") from None


def api_answers(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def find_or_start_server(host: str, port: int, log_file: Path, log: Callable[[str], None]
                         ) -> tuple[str, subprocess.Popen | None]:
    """The API URL of a live Prefect server: the one PREFECT_API_URL names, else one at
    host:port, else a new `prefect server start` there (returned too, for the caller to
    stop). A PREFECT_API_URL that does not answer is a one-line error, not a new server.
    The URL is also put in the environment, for the flow runs the server starts."""
    from prefect.settings import get_current_settings

    named = get_current_settings().api.url
    if named:
        if not api_answers(named):
            raise UserError(f"PREFECT_API_URL={named} does not answer; start that server "
                            "(`prefect server start`) or unset PREFECT_API_URL to let flywheel start one")
        log(f"using the Prefect server at {named} (PREFECT_API_URL)")
        return named, None
    api_url = f"http://{host}:{port}/api"
    if api_answers(api_url):
        os.environ["PREFECT_API_URL"] = api_url
        log(f"using the Prefect server already running at {api_url}")
        return api_url, None
    log(f"no Prefect server found: starting `prefect server start` at {api_url} (log: {log_file}); "
        "it stops with this command. For a server that outlives it, run `prefect server start` "
        "yourself and set PREFECT_API_URL")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    prefect = Path(sys.executable).with_name("prefect")
    with open(log_file, "ab") as output:
        server = subprocess.Popen(
            [str(prefect), "server", "start", "--host", host, "--port", str(port)],
            stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not api_answers(api_url):
        if server.poll() is not None:
            raise UserError(f"`prefect server start` exited with code {server.returncode}; see {log_file}")
        if time.monotonic() > deadline:
            server.terminate()
            raise UserError(f"the Prefect server did not answer within {STARTUP_TIMEOUT_S:.0f} s; see {log_file}")
        time.sleep(0.5)
    os.environ["PREFECT_API_URL"] = api_url
    return api_url, server
