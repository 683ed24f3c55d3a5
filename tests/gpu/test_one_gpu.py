"""What only CUDA runs: vLLM's sleep mode around training, bfloat16 passes on the GPU, the
per-phase GPU memory. Skipped without CUDA (CI here has none); `scripts/gpu_check.sh` is
the prepared check of the same path at a real model size."""

import dataclasses

import pytest
import torch

from conftest import E2E_SAMPLE
from flywheel.config import EvalConfig, FlywheelConfig, JudgeConfig, TrainConfig
from flywheel.rounds import Flywheel
from storage import tables

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def peaks_of(timeline) -> dict:
    return {p.name: p.peak_gpu_bytes for p in timeline if p.kind == "phase"}


def test_a_round_on_one_gpu_sleeps_the_engine_through_training_and_reloads_on_waking(
        tiny_policy, demo_prompts, tmp_path):
    prompts, heldout = demo_prompts
    config = FlywheelConfig(
        workdir=tmp_path, reference_model=tiny_policy, prompts=prompts, heldout_prompts=heldout, seed=3,
        judge=JudgeConfig("rule:flywheel.examples.addition:addition_score"),
        sample=dataclasses.replace(E2E_SAMPLE, dtype="bfloat16", gpu_memory_utilization=0.3),
        train=TrainConfig(learning_rate=1e-4, batch_size=16),  # dtype auto: bfloat16 on CUDA
        eval=EvalConfig(samples_per_prompt=2, accuracy_score="flywheel.examples.addition:addition_score"),
    )
    wheel = Flywheel(config)
    try:
        wheel.initialise()
        first, second = wheel.run_round(), wheel.run_round()
        for round_id in (first, second):
            timeline = wheel.store.read(tables.round_phases, round_id)
            steps = [(p.kind, p.name, p.detail) for p in timeline]
            names = [(kind, name) for kind, name, _ in steps]
            sleeps = [i for i, s in enumerate(names) if s == ("sampler", "sleep")]
            assert all(steps[i][2].startswith("level 1") for i in sleeps)
            assert sleeps[0] < names.index(("phase", "train"))
            if round_id == second:  # round 1's evaluation left it asleep: round 2 wakes it
                assert ("sampler", "wake") in names
            # Every wake reloads the checkpoint between waking the weights and the KV cache.
            for i, (kind, name, detail) in enumerate(steps):
                if (name, detail) == ("wake", "weights"):
                    assert steps[i + 1][1] == "reload"
                    assert steps[i + 2][1:] == ("wake", "kv_cache")
            # The sample phase's peak includes the awake engine (read before it slept).
            assert peaks_of(timeline)["sample"] >= max(p.peak_gpu_bytes for p in timeline if p.name == "sleep")
            assert all(peak is not None and peak > 0 for peak in peaks_of(timeline).values())
        _, gaps = wheel.store.query("SELECT sampler_logprob_gap FROM rounds")
        # bfloat16 on both sides: 0.0043 measured on CPU, 0.02 is the warning threshold.
        assert all(g < 0.02 for (g,) in gaps)
    finally:
        wheel.close()
