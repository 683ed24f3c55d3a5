import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from flywheel.demo_task import DemoPolicyConfig, build_demo_policy, write_demo_prompts  # noqa: E402

# A deliberately small build of the real demo policy: enough SFT that it answers in the
# task's format, fast enough for CI. Cached across sessions like the demo's own.
TEST_POLICY = DemoPolicyConfig(sft_steps=300, heldout_size=32, seed=0)


@pytest.fixture(scope="session")
def tiny_policy() -> Path:
    cache = Path(os.environ.get("FLYWHEEL_TEST_CACHE", Path.home() / ".cache" / "flywheel-tests"))
    return build_demo_policy(cache, TEST_POLICY, log=lambda message: None)


@pytest.fixture(scope="session")
def demo_prompts(tmp_path_factory) -> tuple[Path, Path]:
    return write_demo_prompts(tmp_path_factory.mktemp("prompts"), TEST_POLICY, num_train_prompts=256)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (starting one costs ~15 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
