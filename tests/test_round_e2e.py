"""Whole rounds with the real vLLM engine, the real Prefect flow and a real DuckDB file."""

from pathlib import Path

import pytest

from conftest import E2E_SAMPLE, run_flow
from flywheel.config import EvalConfig, FlywheelConfig, JudgeConfig, PairConfig, TrainConfig
from flywheel.errors import UserError
from flywheel.rounds import Flywheel
from flywheel.examples.addition import addition_score
from judges import Verdict
from judges.rule import source_fingerprint
from storage import tables

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flywheel(tiny_policy, demo_prompts, policy_sampler, tmp_path_factory):
    prompts, heldout = demo_prompts
    config = FlywheelConfig(
        workdir=tmp_path_factory.mktemp("flywheel"), reference_model=tiny_policy,
        prompts=prompts, heldout_prompts=heldout, seed=3,
        judge=JudgeConfig("rule:flywheel.examples.addition:addition_score", {"name": "adder"}),
        sample=E2E_SAMPLE,
        train=TrainConfig(learning_rate=1e-4, batch_size=16),
        eval=EvalConfig(samples_per_prompt=2, accuracy_score="flywheel.examples.addition:addition_score"),
    )
    wheel = Flywheel(config, sampler=policy_sampler)
    wheel.initialise()
    yield wheel
    wheel.close()


def test_sampler_is_seeded_and_keeps_vllm_token_ids(flywheel):
    policy = flywheel.store.read(tables.current_policy)
    prompts = flywheel.store.read(tables.prompts, "heldout")[:8]
    kwargs = dict(n=3, temperature=1.0, seed=11, purpose="eval", round_id=None)
    first = flywheel.sampler.sample(policy.path, policy.checkpoint_id, prompts, **kwargs)
    again = flywheel.sampler.sample(policy.path, policy.checkpoint_id, prompts, **kwargs)
    assert [c.text for c in first] == [c.text for c in again]
    tokenizer_eos = 2
    for c in first:
        assert c.prompt_token_ids[0] == 1  # <bos>
        assert c.finish_reason in ("stop", "length")
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == tokenizer_eos  # the EOS is part of what DPO trains on
        assert c.sampling_params["seed"] == 11 + c.prompt_id


def test_flow_runs_rounds_and_records_everything(flywheel, prefect_harness):
    
    round_ids = run_flow(flywheel, rounds=2)
    store = flywheel.store
    assert len(round_ids) == 2
    columns, rows = store.query("SELECT * FROM round_summary ORDER BY round_id")
    summary = [dict(zip(columns, row)) for row in rows]
    assert [s["state"] for s in summary] == ["done", "done"]
    for s in summary:
        assert s["completions"] == 64 * 4
        assert s["labels"] == s["pairs"] > 0
        assert s["train_steps"] >= 1
        assert s["candidate_accuracy"] is not None and 0.0 <= s["win_rate"] <= 1.0
        assert s["promoted"] == (s["candidate_accuracy"] > s["incumbent_accuracy"])
    # Round 2 samples from whatever was promoted after round 1.
    _, policies = store.query("SELECT policy_checkpoint_id FROM rounds ORDER BY round_id")
    expected = summary[0]["candidate_checkpoint_id"] if summary[0]["promoted"] else policies[0][0]
    assert policies[1][0] == expected
    # The reference's log-probs of every trained completion were cached under the round's reference.
    _, uncached = store.query(
        "SELECT count(*) FROM preferences p JOIN rounds r ON r.round_id = p.round_id WHERE NOT EXISTS "
        "(SELECT 1 FROM reference_logps x WHERE x.checkpoint_id = r.reference_checkpoint_id "
        "AND x.completion_id IN (p.chosen_completion_id, p.rejected_completion_id) HAVING count(*) = 2)")
    assert uncached == [(0,)] and store.read(tables.count, "reference_logps") > 0
    # Every completion says which checkpoint made it and how.
    _, bad = store.query("SELECT count(*) FROM completions WHERE checkpoint_id IS NULL OR sampling_params IS NULL")
    assert bad == [(0,)]
    # Labels carry the judge's name and version; pairs join completions of one prompt.
    _, judges = store.query("SELECT DISTINCT judge_name, judge_version FROM labels")
    assert judges == [("adder", source_fingerprint(addition_score))]  # a rule's version: its source
    _, mismatched = store.query(
        "SELECT count(*) FROM pairs p JOIN completions a ON a.completion_id = p.completion_a_id "
        "JOIN completions b ON b.completion_id = p.completion_b_id "
        "WHERE a.prompt_id <> p.prompt_id OR b.prompt_id <> p.prompt_id")
    assert mismatched == [(0,)]
    # Each round published the rounds table as a markdown artifact and redrew the plot.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["flywheel-rounds"])))
    latest = max(artifacts, key=lambda a: a.created)
    assert len(artifacts) >= 2 and "after round 2" in latest.data
    table_rows = [line for line in latest.data.splitlines() if line.startswith("| ") and line[2:3].isdigit()]
    assert [row.split("|")[1].strip() for row in table_rows] == [str(r) for r in round_ids]
    assert (flywheel.config.workdir / "rounds.png").read_bytes()[:4] == b"\x89PNG"
    # The candidate is a save_pretrained checkpoint with a tokenizer, reloadable as is.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = store.read(tables.checkpoint, summary[0]["candidate_checkpoint_id"]).path
    AutoModelForCausalLM.from_pretrained(path)
    assert AutoTokenizer.from_pretrained(path).eos_token == "<eos>"
    # Each round recorded its phases in order, and the sampler's engine events among them:
    # it was told to sleep after sampling, before the trainer's passes, and again after the
    # held-out samples; the candidate's weights were reloaded before its held-out samples.
    for summary_row in summary:
        timeline = store.read(tables.round_phases, summary_row["round_id"])
        steps = [(p.kind, p.name) for p in timeline]
        phases = [name for kind, name in steps if kind == "phase"]
        assert phases == ["sample", "logprob_check", "reference_logps", "train", "evaluate"]
        sleeps = [i for i, step in enumerate(steps) if step == ("sampler", "sleep")]
        train_at, evaluate_at = steps.index(("phase", "train")), steps.index(("phase", "evaluate"))
        assert len(sleeps) == 2 and steps.index(("phase", "sample")) < sleeps[0] < train_at < evaluate_at < sleeps[1]
        candidate = store.read(tables.checkpoint, summary_row["candidate_checkpoint_id"]).path
        reloads = [i for i, p in enumerate(timeline) if p.name == "reload" and p.detail == str(Path(candidate).resolve())]
        assert len(reloads) == 1 and evaluate_at < reloads[0] < sleeps[1]
        # vLLM's CPU build has no sleep mode: the round says so instead of pretending.
        assert all(timeline[i].detail.startswith("skipped: this vLLM build has no sleep mode") for i in sleeps)
        assert all(p.peak_gpu_bytes is None and p.seconds >= 0 for p in timeline)


def test_round_resumes_after_stopping_between_steps(flywheel):
    store = flywheel.store
    round_id = flywheel.begin_round()
    flywheel.sample(round_id)
    flywheel.pair(round_id)
    completions_before = store.read(tables.count, "completions", "round_id = ?", [round_id])
    pairs_before = store.read(tables.count, "pairs", "round_id = ?", [round_id])
    # A new process would find the unfinished round and carry on from 'paired'.
    assert flywheel.begin_round() == round_id
    flywheel.run_round()
    assert store.read(tables.get_round, round_id).state == "done"
    assert store.read(tables.count, "completions", "round_id = ? AND purpose = 'train'", [round_id]) == completions_before
    assert store.read(tables.count, "pairs", "round_id = ?", [round_id]) == pairs_before
    assert store.read(tables.count, "labels l JOIN pairs p USING (pair_id)", "p.round_id = ?", [round_id]) == pairs_before


def _flywheel_like(flywheel, workdir, sample=None, train=None):
    """A flywheel of its own (database, checkpoints) on the shared engine, like `flywheel`'s
    config but for the sample and train settings given."""
    import dataclasses

    config = dataclasses.replace(flywheel.config, workdir=workdir,
                                 sample=dataclasses.replace(flywheel.config.sample, **(sample or {})),
                                 train=dataclasses.replace(flywheel.config.train, **(train or {})))
    wheel = Flywheel(config, sampler=flywheel.sampler)  # one engine for the session
    wheel.initialise()
    return wheel


def test_sampling_stores_each_batch_in_turn_and_a_failed_write_loses_only_its_batch(flywheel, tmp_path, monkeypatch):
    batched = _flywheel_like(flywheel, tmp_path, sample={"batch_prompts": 24})
    events = []  # in order: ("sampled", prompts), ("stored", completions) or ("failed",)
    sample, add_completions = batched.sampler.sample, tables.add_completions
    monkeypatch.setattr(batched.sampler, "sample",
                        lambda *args, **kwargs: events.append(("sampled", len(args[2]))) or sample(*args, **kwargs))

    def stored(tx, completions):
        if fail_second_write and len(events) == 3:
            events.append(("failed",))
            raise RuntimeError("disk full (a failure injected into the second batch's write)")
        ids = add_completions(tx, completions)
        events.append(("stored", len(completions)))
        return ids

    monkeypatch.setattr(tables, "add_completions", stored)
    try:
        round_id = batched.begin_round()
        store = batched.store
        # A batch whose write fails stops the step; the batches before it stay stored.
        fail_second_write = True
        with pytest.raises(RuntimeError, match="disk full"):
            batched.sample(round_id)
        assert events == [("sampled", 24), ("stored", 96), ("sampled", 24), ("failed",)]
        assert store.read(tables.count, "completions", "round_id = ?", [round_id]) == 96
        assert store.read(tables.get_round, round_id).state == "started"

        # The rerun samples only the 40 prompts without completions, in batches of 24 and 16,
        # each stored before the next is sampled; the last also ends the step.
        fail_second_write = False
        events.clear()
        assert batched.sample(round_id) == 64 * 4
        assert events == [("sampled", 24), ("stored", 96), ("sampled", 16), ("stored", 64)]
        assert store.read(tables.get_round, round_id).state == "sampled"
        _, counts = store.query("SELECT count(DISTINCT prompt_id), count(DISTINCT (prompt_id, sample_index)), "
                                "count(*) FROM completions WHERE round_id = ? AND purpose = 'train'", [round_id])
        assert counts == [(64, 256, 256)]  # every prompt's n samples, each once
    finally:
        batched.close()  # leaves the shared engine running


def test_a_kept_reference_is_loaded_once_across_rounds(flywheel, tmp_path, monkeypatch):
    from flywheel import training

    kept = _flywheel_like(flywheel, tmp_path, train={"keep_reference_loaded": True})
    loads = []  # every checkpoint a log-prob pass loads (a spy: the real loader still runs)
    load = training._load_for_logps
    monkeypatch.setattr(training, "_load_for_logps",
                        lambda path, dtype: loads.append(Path(path).resolve()) or load(path, dtype))
    try:
        for _ in range(2):
            kept.run_round()
        # Each round needs the reference twice or three times (its log-probs of the new
        # completions, the KL at evaluation, and the sampler check while it is the policy);
        # kept, it is loaded once for both rounds. Each candidate is still loaded for its
        # KL, and a promoted one again for the next round's sampler check.
        reference = Path(kept.store.read(tables.reference_checkpoint).path).resolve()
        assert loads.count(reference) == 1
        _, promoted = kept.store.query("SELECT count(*) FROM round_summary WHERE round_id = 1 AND promoted")
        assert len(loads) == 3 + promoted[0][0]
        _, states = kept.store.query("SELECT state, kl_to_reference IS NOT NULL FROM round_summary")
        assert states == [("done", True), ("done", True)]
    finally:
        kept.close()
    assert kept.kept_reference._loaded is None  # released with the flywheel


class LongerAnswerJudge:
    """A user's own judge, named by import path in the config below."""

    name, version = "longer-answer", "1"

    def judge(self, pairs):
        return [Verdict("a" if len(p.completion_a) > len(p.completion_b) else "b") for p in pairs]


def test_a_custom_judge_named_by_import_path_labels_a_round(flywheel, tmp_path):
    config = FlywheelConfig(
        workdir=tmp_path, reference_model=flywheel.config.reference_model,
        prompts=flywheel.config.prompts, heldout_prompts=flywheel.config.heldout_prompts, seed=5,
        judge=JudgeConfig(f"{__name__}:LongerAnswerJudge"),
        sample=flywheel.config.sample, pair=PairConfig(strategy="all"),
        train=TrainConfig(learning_rate=1e-4, batch_size=16), eval=EvalConfig(samples_per_prompt=2),
    )
    custom = Flywheel(config, sampler=flywheel.sampler)  # one engine for the session
    with pytest.raises(UserError, match="call initialise"):
        custom.run_round()
    custom.initialise()
    round_id = custom.run_round()
    store = custom.store
    _, judges = store.query("SELECT DISTINCT judge_name, judge_version FROM labels")
    assert judges == [("longer-answer", "1")]
    _, summary = store.query("SELECT state, judge, pairs, labels, win_rate IS NOT NULL FROM round_summary")
    state, judge, pairs, labels, has_win_rate = summary[0]
    assert (state, judge, has_win_rate) == ("done", "longer-answer@1", True)
    assert labels == pairs > 0 and store.read(tables.get_round, round_id).judge_name == "longer-answer"
    custom.close()  # leaves the shared engine running
    assert flywheel.sampler._llm is not None


def test_vllm_samples_from_a_lora_trained_checkpoint(flywheel, tmp_path):
    from flywheel.training import train_dpo
    from storage.records import PreferenceTriple

    triples = [PreferenceTriple(i, [1, 4 + i % 10, 14, 5, 15], [6 + i % 5, 2], [7 + i % 3, 4, 2]) for i in range(8)]
    path = tmp_path / "lora"
    train_dpo(flywheel.config.reference_model, flywheel.config.reference_model, triples,
              TrainConfig(batch_size=8, learning_rate=1e-2, lora_rank=4), path, seed=0)
    prompts = flywheel.store.read(tables.prompts, "heldout")[:4]
    completions = flywheel.sampler.sample(path, 10_000, prompts, n=2, temperature=1.0, seed=1, purpose="eval",
                                          round_id=None)
    assert len(completions) == 8 and all(c.checkpoint_id == 10_000 for c in completions)
