"""The README's config example runs as written, on the files `flywheel demo` leaves.

The example is the ```yaml block right after the line `<!-- example-config -->` in
README.md. Its paths name the demo's directory, `flywheel-demo/`: here the files are laid
out there by the demo's own `lay_out_demo`, from the session's tiny policy.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TEST_POLICY
from flywheel.config import load_config_file
from flywheel.examples.addition import DEMO_POLICY, DEMO_PROMPTS, lay_out_demo
from storage import tables
from storage.store import Store

README = Path(__file__).parent.parent / "README.md"
MARKER = "<!-- example-config -->"


def readme_example() -> str:
    readme = README.read_text(encoding="utf-8")
    if MARKER not in readme:
        pytest.fail(f"README.md has no line {MARKER}: the config example must follow it, in a ```yaml block")
    block = re.match(r"[ \t]*\n```yaml\n(.*?)^```", readme.split(MARKER, 1)[1], re.S | re.M)
    if block is None:
        pytest.fail(f"the line after {MARKER} in README.md does not open a ```yaml block")
    return block.group(1)


@pytest.fixture
def demo_cwd(tiny_policy, tmp_path) -> Path:
    """A working directory as `flywheel demo` leaves it, with the example as my-flywheel.yaml."""
    lay_out_demo(tmp_path / "flywheel-demo", tiny_policy, TEST_POLICY, num_train_prompts=256)
    (tmp_path / "my-flywheel.yaml").write_text(readme_example(), encoding="utf-8")
    return tmp_path


def test_the_example_names_the_demos_files(demo_cwd):
    run_file = load_config_file(demo_cwd / "my-flywheel.yaml")
    demo = demo_cwd / "flywheel-demo"
    config = run_file.config
    assert config.reference_model == (demo / DEMO_POLICY).resolve()
    assert config.prompts.path == demo / DEMO_PROMPTS / "train.jsonl" and config.prompts.path.is_file()
    assert config.heldout_prompts.path == demo / DEMO_PROMPTS / "heldout.jsonl" and config.heldout_prompts.path.is_file()
    assert config.workdir == demo_cwd / "my-flywheel" and run_file.rounds >= 1


def flywheel(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", "run", "--config", "my-flywheel.yaml", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=1200)


def session_api() -> dict:
    """The environment with the session's Prefect API, so that a run does not start its own (~15 s)."""
    from prefect.settings import get_current_settings

    return {**os.environ, "PREFECT_API_URL": get_current_settings().api.url}


@pytest.mark.slow
def test_the_example_runs_as_written(demo_cwd, prefect_harness):
    rounds = load_config_file(demo_cwd / "my-flywheel.yaml").rounds
    result = flywheel(demo_cwd, env=session_api())
    assert result.returncode == 0, result.stderr[-3000:]
    store = Store.open(demo_cwd / "my-flywheel" / "flywheel.duckdb")
    assert store.read(tables.count, "rounds", "state = 'done'") == store.read(tables.count, "rounds") == rounds
    assert store.read(tables.count, "evals") == rounds


def test_the_example_with_a_context_too_long_for_the_model(demo_cwd):
    result = flywheel(demo_cwd, "sample.max_model_len=1024")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("flywheel: error: sample.max_model_len (1024) is longer than the context of "), lines[0]
    assert lines[0].endswith("set sample.max_model_len to at most 64"), lines[0]
    assert not (demo_cwd / "my-flywheel").exists()  # refused before anything started
