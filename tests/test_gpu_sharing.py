"""Sharing one GPU between sampler and trainer: the trainer's precision, where the log-prob
passes run, and the sampler sleeping through training (docs/gpu.md). What only CUDA runs
is in tests/gpu/."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flywheel.config import SampleConfig, TrainConfig
from flywheel.sampling import VLLMSampler
from flywheel.training import (
    KeptModel,
    completion_logps,
    logps_precision,
    setup_training,
    train_dpo,
    train_dtype,
    trainer_device,
)
from storage.records import PreferenceTriple

ROOT = Path(__file__).resolve().parents[1]
TRIPLES = [PreferenceTriple(i, [1, 4 + i % 10, 14, 5, 15], [6 + i % 5, 2], [7 + i % 3, 4, 2]) for i in range(8)]


def test_auto_dtype_is_bfloat16_on_cuda_and_float32_elsewhere():
    assert train_dtype(TrainConfig()) == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert train_dtype(TrainConfig(dtype="bfloat16")) == torch.bfloat16
    assert train_dtype(TrainConfig(dtype="float32")) == torch.float32
    assert trainer_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    # Log-prob passes hold weights as the policy trains them: float32 for full
    # fine-tuning, the train dtype for LoRA's base; both run under autocast in it.
    assert logps_precision(TrainConfig(dtype="bfloat16")) == (torch.float32, torch.bfloat16)
    assert logps_precision(TrainConfig(dtype="bfloat16", lora_rank=8)) == (torch.bfloat16, torch.bfloat16)
    assert logps_precision(TrainConfig(dtype="float32")) == (torch.float32, torch.float32)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_bfloat16_training_keeps_the_trained_weights_and_adam_states_in_float32(tiny_policy, lora_rank):
    config = TrainConfig(dtype="bfloat16", lora_rank=lora_rank, batch_size=4)
    setup = setup_training(tiny_policy, tiny_policy, len(TRIPLES), config, seed=0)
    assert setup.compute_dtype == torch.bfloat16
    frozen = [p for p in setup.policy.parameters() if not p.requires_grad]
    assert setup.trainable and {p.dtype for p in setup.trainable} == {torch.float32}
    # Full fine-tuning trains every weight (float32 masters); LoRA's frozen base is bfloat16.
    assert {p.dtype for p in frozen} == ({torch.bfloat16} if lora_rank else set())
    assert {p.dtype for p in setup.reference.parameters()} == {torch.bfloat16}
    from flywheel.training import training_loop

    training_loop(setup, TRIPLES, replace(config, steps_per_round=1))
    states = [t for state in setup.optimizer.state.values() for t in state.values() if t.dim() > 0]
    assert states and {t.dtype for t in states} == {torch.float32}


def test_a_trained_policy_is_saved_in_float32_with_every_update_kept(tiny_policy, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A bfloat16 parent, as most published checkpoints are, trained in bfloat16 with a
    # learning rate whose updates are far below bfloat16's resolution of the weights.
    parent = tmp_path / "bf16-parent"
    AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.bfloat16).save_pretrained(parent)
    AutoTokenizer.from_pretrained(tiny_policy).save_pretrained(parent)
    before = load_file(parent / "model.safetensors")
    for name, options in {"full": {}, "lora": {"lora_rank": 4}}.items():
        config = TrainConfig(dtype="bfloat16", batch_size=4, learning_rate=1e-6, **options)
        train_dpo(parent, parent, TRIPLES, config, tmp_path / name, seed=0)
        saved = load_file(tmp_path / name / "model.safetensors")
        assert {t.dtype for t in saved.values()} == {torch.float32}, name
        changed = sum(int((saved[n] != before[n].float()).sum()) for n in saved)
        # Cast back to bfloat16, most of those 1e-6 steps would round to the parent's weights.
        survive = sum(int((saved[n].to(torch.bfloat16) != before[n]).sum()) for n in saved)
        assert changed > 0 and survive < changed / 2, (name, changed, survive)


def test_log_prob_passes_run_on_the_trainers_device_in_its_dtype(tiny_policy):
    sequences = [([1, 4 + i, 14, 5, 15], [6 + i % 5, 7, 2]) for i in range(6)]
    exact = completion_logps(tiny_policy, sequences, batch_size=4)
    halved = completion_logps(tiny_policy, sequences, batch_size=4, precision=(torch.bfloat16, torch.bfloat16))
    kept = KeptModel((torch.bfloat16, torch.bfloat16))
    model, _ = kept.get(tiny_policy)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {(trainer_device().type, torch.bfloat16)}
    assert completion_logps(tiny_policy, sequences, batch_size=4, kept=kept) == halved
    # bfloat16 keeps 8 significant bits (0.4% a value): the largest relative gap here was
    # 0.57%, so 3% leaves 5x room, and a pass that ignored the dtype would be exact.
    assert halved == pytest.approx(exact, rel=0.03) and halved != exact
    kept.release()


def test_engine_arguments_carry_tensor_parallelism_and_sleep_mode_only_where_vllm_can_sleep():
    from flywheel.sampling import sleep_mode_available

    arguments = VLLMSampler(SampleConfig(tensor_parallel_size=2)).engine_arguments()
    assert arguments["tensor_parallel_size"] == 2
    assert arguments["enable_sleep_mode"] == sleep_mode_available()
    assert VLLMSampler(SampleConfig(sleep_mode=False)).engine_arguments()["enable_sleep_mode"] is False
    if not torch.cuda.is_available():
        assert not sleep_mode_available()  # vLLM's CPU build: rounds record that it could not sleep


@pytest.mark.slow
def test_gpu_round_script_dry_run_on_cpu(tmp_path):
    figures = tmp_path / "figures.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_round.py"), "--cpu-dry-run",
                             "--json", str(figures)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    report = json.loads(figures.read_text())
    assert report["round"] == 2 and report["sampling_tokens_per_s"] > 0 and report["dpo_tokens_per_s"] > 0
    assert list(report["phases"]) == ["sample", "logprob_check", "reference_logps", "train", "evaluate"]
    assert all(gap < 0.02 for gap in report["logprob_gap"].values())
    assert "DPO training:" in result.stdout and "sampler log-prob gap by round" in result.stdout


def _operations_prefect_yaml() -> str:
    """The `prefect.yaml` that docs/operations.md tells users to write."""
    text = (ROOT / "docs" / "operations.md").read_text()
    start = text.index("```yaml\nname: flywheel") + len("```yaml\n")
    return text[start : text.index("```", start)]


@pytest.mark.slow
def test_the_documented_work_pool_deployment_registers_with_a_prefect_api(prefect_harness, tmp_path):
    import os

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "home")}
    prefect = [str(Path(sys.executable).with_name("prefect")), "--no-prompt"]
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(_operations_prefect_yaml())
    for command in (["work-pool", "create", "gpu-pool", "--type", "process"],
                    ["deploy", "--name", "flywheel", "--prefect-file", str(prefect_file)]):
        result = subprocess.run(prefect + command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("flywheel-rounds/flywheel")
    assert deployment.work_pool_name == "gpu-pool"
    assert deployment.parameters == {"config": "/srv/flywheel/flywheel.yaml", "rounds": 1}
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.entrypoint == "flows/rounds.py:flywheel_rounds"
