"""Reference log-probs cached in the store: the same training as the live reference,
without ever loading the reference, and recomputed for another reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flywheel.config import EvalConfig, FlywheelConfig, JudgeConfig, TrainConfig
from flywheel.training import KeptModel, completion_logps, reference_logps_for, train_dpo
from storage.records import PreferenceTriple
from storage.store import Store
from storage import tables


def numbered_triples(count: int) -> list[PreferenceTriple]:
    # Completion ids 2i+1 (chosen) and 2i+2 (rejected): the cache's keys.
    return [PreferenceTriple(i, [1, 4 + i % 10, 13, 5 + i % 4, 14], [6 + i % 5, 2], [7 + i % 3, 4, 2],
                             chosen_completion_id=2 * i + 1, rejected_completion_id=2 * i + 2)
            for i in range(count)]


@pytest.fixture
def loads(monkeypatch) -> list[Path]:
    """Every checkpoint `AutoModelForCausalLM.from_pretrained` loads, in order (a spy: the
    real loader still runs)."""
    from transformers import AutoModelForCausalLM

    loaded: list[Path] = []
    original = AutoModelForCausalLM.from_pretrained

    def from_pretrained(path, *args, **kwargs):
        loaded.append(Path(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    return loaded


def test_cached_reference_logps_train_like_the_live_reference_without_loading_it(
        tiny_policy, perturbed_policy, tmp_path, loads):
    store = Store.create(tmp_path / "flywheel.duckdb")
    with store.transaction() as tx:
        reference = tables.checkpoint(tx, tables.add_checkpoint(tx, str(perturbed_policy), role="reference", status="promoted"))
    triples = numbered_triples(7)
    config = TrainConfig(batch_size=3, epochs=2, learning_rate=1e-3, nll_weight=0.5)

    live = train_dpo(tiny_policy, perturbed_policy, triples, config, tmp_path / "live", seed=0)
    assert loads == [tiny_policy, perturbed_policy]
    cached = reference_logps_for(store, triples, reference, batch_size=4)
    assert store.read(tables.count, "reference_logps", "checkpoint_id = ?", [reference.checkpoint_id]) == 14
    loads.clear()
    assert torch.equal(reference_logps_for(store, triples, reference, batch_size=4).chosen, cached.chosen)
    from_cache = train_dpo(tiny_policy, cached, triples, config, tmp_path / "cached", seed=0)
    assert loads == [tiny_policy]  # the policy only: the reference came from the store
    assert len(live) == len(from_cache) == 6
    for a, b in zip(live, from_cache):
        assert (a.loss, a.chosen_reward, a.rejected_reward, a.grad_norm) == pytest.approx(
            (b.loss, b.chosen_reward, b.rejected_reward, b.grad_norm), abs=1e-5)
    assert live[0].loss != pytest.approx(0.6931, abs=1e-3)  # policy and reference differ


def test_another_reference_gets_its_own_log_probs(tiny_policy, perturbed_policy, tmp_path, loads):
    store = Store.create(tmp_path / "flywheel.duckdb")
    with store.transaction() as tx:
        first = tables.checkpoint(tx, tables.add_checkpoint(tx, str(tiny_policy), role="reference", status="promoted"))
        second = tables.checkpoint(tx, tables.add_checkpoint(tx, str(perturbed_policy), role="candidate", status="promoted"))
    triples = numbered_triples(3)
    by_first = reference_logps_for(store, triples, first, batch_size=8)
    by_second = reference_logps_for(store, triples, second, batch_size=8)
    assert loads == [tiny_policy, perturbed_policy]
    assert store.read(tables.count, "reference_logps") == 12
    assert not torch.allclose(by_first.chosen, by_second.chosen)


def test_a_kept_reference_is_loaded_once_and_again_only_when_its_files_change(
        tiny_policy, perturbed_policy, tmp_path, loads):
    import shutil

    from flywheel.checkpoints import save_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = tmp_path / "reference"
    shutil.copytree(tiny_policy, reference)
    sequences = [(t.prompt_token_ids, t.chosen_token_ids) for t in numbered_triples(5)]
    kept = KeptModel()
    first = completion_logps(reference, sequences, 2, kept)
    again = completion_logps(reference, sequences, 4, kept)
    assert loads == [reference]  # the second call used the kept model
    assert again == pytest.approx(first, abs=1e-5)
    assert completion_logps(reference, sequences, 2) == pytest.approx(first, abs=1e-6)  # as a fresh load
    loads.clear()

    # Another model saved at the same path (renamed into place, as training saves): loaded again.
    save_checkpoint(AutoModelForCausalLM.from_pretrained(perturbed_policy), AutoTokenizer.from_pretrained(perturbed_policy),
                    reference)
    loads.clear()
    changed = completion_logps(reference, sequences, 2, kept)
    assert loads == [reference]
    assert changed == pytest.approx(completion_logps(perturbed_policy, sequences, 2), abs=1e-6)
    assert changed != pytest.approx(first, abs=1e-3)
    loads.clear()
    kept.release()
    completion_logps(reference, sequences, 2, kept)
    assert loads == [reference]


def test_the_reference_is_the_initial_model_or_the_previous_promoted_one(tiny_policy, demo_prompts, tmp_path):
    from flywheel.rounds import Flywheel

    prompts, heldout = demo_prompts
    for choice in ("initial", "previous"):
        config = FlywheelConfig(
            workdir=tmp_path / choice, reference_model=tiny_policy, prompts=prompts, heldout_prompts=heldout,
            judge=JudgeConfig("rule:flywheel.examples.addition:addition_score"), train=TrainConfig(reference=choice),
            eval=EvalConfig(accuracy_score="flywheel.examples.addition:addition_score"))
        flywheel = Flywheel(config)  # the vLLM engine starts only when something is sampled
        try:
            flywheel.initialise()
            with flywheel.store.transaction() as tx:
                initial = tables.reference_checkpoint(tx).checkpoint_id
                promoted = tables.add_checkpoint(tx, "/models/round-1", role="candidate", status="promoted")
            round_ = flywheel.store.read(tables.get_round, flywheel.begin_round())
            assert round_.policy_checkpoint_id == promoted
            assert round_.reference_checkpoint_id == (initial if choice == "initial" else promoted)
        finally:
            flywheel.close()  # its lease's heartbeat would go on using the store for the session


def test_a_round_trains_on_its_fresh_pairs_plus_the_replay_share_and_records_them(
        tiny_policy, demo_prompts, tmp_path):
    from flywheel.labelling import label_pairs
    from flywheel.rounds import Flywheel
    from queue_data import round_with_pairs

    prompts, heldout = demo_prompts
    config = FlywheelConfig(
        workdir=tmp_path, reference_model=tiny_policy, prompts=prompts, heldout_prompts=heldout,
        judge=JudgeConfig("rule:flywheel.examples.addition:addition_score"),
        train=TrainConfig(replay_fraction=0.25, batch_size=8, learning_rate=1e-4))
    flywheel = Flywheel(config)
    try:
        flywheel.initialise()
        store = flywheel.store
        rounds = []
        for num_pairs, state in ((24, "done"), (12, "labelled")):
            round_id = round_with_pairs(store, num_pairs)
            with store.transaction() as tx:
                tables.claim_round_judge(tx, round_id, flywheel.judge.name, flywheel.judge.version)
            label_pairs(store, flywheel.judge, round_id, batch_size=64, progress=False)
            with store.transaction() as tx:
                tables.finish_step(tx, round_id, state)
            rounds.append(round_id)
        earlier, current = rounds
        flywheel.train(current)
        # 12 fresh pairs; replay r with r / (12 + r) = 0.25, so r = 4.
        _, data = store.query("SELECT pairs_trained, on_policy_pairs, replayed_pairs, on_policy_share "
                              "FROM round_training_data WHERE round_id = ?", [current])
        assert data == [(16, 12, 4, 0.75)]
        _, steps = store.query("SELECT step, num_pairs FROM train_steps ORDER BY step")
        _, lineage = store.query("SELECT t.step, count(*), count(*) FILTER (WHERE p.round_id = ?) FROM train_pairs t "
                                 "JOIN pairs p USING (pair_id) GROUP BY t.step ORDER BY t.step", [earlier])
        assert [(step, n) for step, n, _ in lineage] == steps and sum(old for *_, old in lineage) == 4
        # Cached reference log-probs cover the replayed completions too.
        assert store.read(tables.count, "reference_logps") == 2 * 16
    finally:
        flywheel.close()


def test_two_processes_under_accelerate_take_the_steps_of_one(tiny_policy, perturbed_policy, tmp_path):
    from safetensors.torch import load_file

    from flywheel.train_job import launch, write_job

    store = Store.create(tmp_path / "flywheel.duckdb")
    with store.transaction() as tx:
        reference = tables.checkpoint(tx, tables.add_checkpoint(tx, str(perturbed_policy), role="reference", status="promoted"))
    triples = numbered_triples(9)  # batches of 4, 4 and 1: the last leaves one process without a pair
    reference_logps = reference_logps_for(store, triples, reference, batch_size=8)
    config = TrainConfig(batch_size=4, learning_rate=1e-3, nll_weight=0.5, num_processes=2)
    one = train_dpo(tiny_policy, reference_logps, triples, config, tmp_path / "one", seed=0)
    job = write_job(tmp_path / "job", tiny_policy, reference_logps, triples, config, tmp_path / "two", seed=0)
    two = launch(job, num_processes=2)
    assert [m.pair_ids for m in two] == [m.pair_ids for m in one] and len(two) == 3
    for a, b in zip(one, two):
        assert (a.loss, a.chosen_reward, a.reward_margin, a.accuracy, a.grad_norm) == pytest.approx(
            (b.loss, b.chosen_reward, b.reward_margin, b.accuracy, b.grad_norm), abs=1e-5)
    weights_one, weights_two = load_file(tmp_path / "one" / "model.safetensors"), load_file(
        tmp_path / "two" / "model.safetensors")
    for name, tensor in weights_one.items():
        assert torch.allclose(tensor, weights_two[name], atol=1e-5), name
