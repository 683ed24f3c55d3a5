import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from flywheel.config import SampleConfig  # noqa: E402
from flywheel.examples.addition import DemoPolicyConfig, build_demo_policy, write_demo_prompts  # noqa: E402

# A deliberately small build of the real demo policy: enough SFT that it answers in the
# task's format, fast enough for CI. Cached across sessions like the demo's own.
TEST_POLICY = DemoPolicyConfig(sft_steps=300, heldout_size=32, seed=0)
# The engine settings of every test round on it (vLLM engines cannot change them).
E2E_SAMPLE = SampleConfig(prompts_per_round=64, n=4, max_tokens=6, dtype="float32", enforce_eager=True)


@pytest.fixture(scope="session")
def tiny_policy() -> Path:
    cache = Path(os.environ.get("FLYWHEEL_TEST_CACHE", Path.home() / ".cache" / "flywheel-tests"))
    return build_demo_policy(cache, TEST_POLICY, log=lambda message: None)


@pytest.fixture(scope="session")
def perturbed_policy(tiny_policy, tmp_path_factory) -> Path:
    """The tiny policy with small seeded noise on every weight: a second, different model
    of the same architecture (a policy that is not its reference)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32)
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=noise))
    path = tmp_path_factory.mktemp("perturbed")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_policy).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def demo_prompts(tmp_path_factory) -> tuple[Path, Path]:
    return write_demo_prompts(tmp_path_factory.mktemp("prompts"), TEST_POLICY, num_train_prompts=256)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (starting one costs ~15 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def policy_sampler():
    """One vLLM engine for every test that runs rounds on the tiny policy (a start costs
    ~45 s on CPU). Flywheels given it share it and leave it running."""
    from flywheel.sampling import VLLMSampler

    sampler = VLLMSampler(E2E_SAMPLE, seed=0)
    yield sampler
    sampler.close()


def run_flow(flywheel, rounds: int) -> list[int]:
    """The Prefect flow on `flywheel`'s config, judges and engine, as `flywheel run` runs
    it; `flywheel` hands its run lease over first and stays open for the test to read."""
    from flows.rounds import flywheel_rounds

    flywheel.lease.release()
    return flywheel_rounds(flywheel.config, rounds, judge=flywheel.judge, eval_judge=flywheel.eval_judge,
                           sampler=flywheel.sampler)


@pytest.fixture(scope="session")
def chat_policy() -> Path:
    """A tiny chat policy (`tests/chat_models.py`): addition through a chat template whose
    end-of-turn token is not the tokenizer's EOS. Cached beside `tiny_policy`."""
    from chat_models import cached_chat_policy

    return cached_chat_policy(Path(os.environ.get("FLYWHEEL_TEST_CACHE", Path.home() / ".cache" / "flywheel-tests")))


@pytest.fixture(scope="session")
def chat_reward_model(tmp_path_factory) -> Path:
    """A random tiny reward model with a tokenizer and chat template unlike the chat
    policy's (`tests/chat_models.py`)."""
    from chat_models import build_chat_reward_model

    return build_chat_reward_model(tmp_path_factory.mktemp("chat-reward-model"))
