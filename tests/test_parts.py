"""Pairing, the rule judge's contract, prompt files, config validation, the batch schedule and
the vLLM idle-spin plugin."""

import random

import pytest

from flywheel.config import PairConfig, SampleConfig, TrainConfig
from flywheel.examples.addition import addition_score, build_char_tokenizer, noisy_answer
from flywheel.errors import UserError
from flywheel.evaluation import promote_if_better
from flywheel.pairing import form_pairs, within_budget
from flywheel.training import batch_schedule
from flywheel.prompts import load_prompts
from judges import JudgeError, PairToJudge, Verdict, judge_batch
from storage.records import Completion


def _c(cid, prompt_id, index, text):
    return Completion(prompt_id, 1, "train", index, text, [1], [2], None, "stop", {}, round_id=1, completion_id=cid)


def test_pairs_come_from_one_prompt_and_never_pair_identical_text():
    completions = [_c(1, 10, 0, "5"), _c(2, 10, 1, "5"), _c(3, 10, 2, "6"), _c(4, 10, 3, "7"),
                   _c(5, 11, 0, "9"), _c(6, 11, 1, "9")]
    for strategy in ("random", "all"):
        pairs = form_pairs(completions, 1, strategy, seed=0)
        by_id = {c.completion_id: c for c in completions}
        for p in pairs:
            a, b = by_id[p.completion_a_id], by_id[p.completion_b_id]
            assert a.prompt_id == b.prompt_id == p.prompt_id
            assert a.text != b.text
        assert all(p.prompt_id == 10 for p in pairs)  # prompt 11 has one distinct answer
    assert len(form_pairs(completions, 1, "all", seed=0)) == 5  # 6 combinations less the 5/5 one
    assert len(form_pairs(completions, 1, "random", seed=0)) == 1  # 3 distinct texts -> 1 disjoint pair


def test_a_label_budget_keeps_a_seeded_subset_in_order():
    completions = [_c(4 * p + i, p, i, str(i)) for p in range(1, 51) for i in range(4)]  # 4 distinct texts each
    formed = form_pairs(completions, 1, "random", seed=0)
    assert len(formed) == 100
    kept = within_budget(formed, 30, seed=7)
    assert len(kept) == 30
    positions = [formed.index(p) for p in kept]
    assert positions == sorted(positions)  # a subset, in formation order
    assert kept == within_budget(formed, 30, seed=7)  # a rerun keeps the same pairs
    assert kept != within_budget(formed, 30, seed=8)
    assert positions[-1] > 50  # spread over the prompts, not the first 30 pairs
    assert within_budget(formed, None, seed=7) == formed
    assert within_budget(formed, 500, seed=7) == formed


def test_batch_schedule_epochs_or_fixed_steps():
    by_epochs = batch_schedule(7, TrainConfig(batch_size=3, epochs=2), random.Random(0))
    assert [len(b) for b in by_epochs] == [3, 3, 1, 3, 3, 1]
    assert sorted(sum(by_epochs[:3], [])) == sorted(sum(by_epochs[3:], [])) == list(range(7))
    fixed = batch_schedule(7, TrainConfig(batch_size=3, steps_per_round=5), random.Random(0))
    assert [len(b) for b in fixed] == [3] * 5  # whole batches only: every step weighs the same
    assert fixed[:2] == by_epochs[:2]  # the same first shuffle, its remainder left for later
    for first in (0, 2):  # a pass's batches never repeat a triple
        assert len(set(fixed[first] + fixed[first + 1])) == 6
    few = batch_schedule(2, TrainConfig(batch_size=32, steps_per_round=4), random.Random(0))
    assert [sorted(b) for b in few] == [[0, 1]] * 4  # fewer than a batch: all of them, every step
    assert batch_schedule(0, TrainConfig(steps_per_round=4), random.Random(0)) == []


def test_judge_contract_violations_are_errors():
    class Short:
        name, version = "short", "1"

        def judge(self, pairs):
            return [Verdict("a")]

    class Broken:
        name, version = "broken", "1"

        def judge(self, pairs):
            raise RuntimeError("model server down")

    pairs = [PairToJudge(1, "p", "a", "b"), PairToJudge(2, "p", "a", "b")]
    with pytest.raises(JudgeError, match="returned 1 labels for 2 pairs"):
        judge_batch(Short(), pairs)
    with pytest.raises(JudgeError, match="model server down"):
        judge_batch(Broken(), pairs)


def test_addition_task_scores_and_noise():
    import random

    assert addition_score("12+30=", "42") == 1.0 and addition_score("12+30=", " 42 ") == 1.0
    assert addition_score("12+30=", "43") == 0.0
    rng = random.Random(0)
    answers = [noisy_answer(27, 15, 0.5, rng) for _ in range(2000)]
    right = answers.count("42") / len(answers)
    assert 0.45 < right < 0.55
    assert {int(a) - 42 for a in answers if a != "42"} == {-10, -2, -1, 1, 2, 10}


def test_char_tokenizer_round_trips_and_adds_bos():
    tok = build_char_tokenizer()
    ids = tok("12+7=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 6
    assert tok.decode(ids, skip_special_tokens=True) == "12+7="


def test_prompt_files(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "1+1="}\n{"prompt": ""}\n{"prompt": "2+2="}\n')
    assert load_prompts(good) == ["1+1=", "2+2="]
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,other\n3+3=,x\n")
    assert load_prompts(csv) == ["3+3="]
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(tmp_path / "nope.jsonl")
    wrong = tmp_path / "q.jsonl"
    wrong.write_text('{"question": "1+1="}\n')
    with pytest.raises(UserError, match="no 'prompt' column"):
        load_prompts(wrong)
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="empty"):
        load_prompts(empty)


def test_config_validation_names_the_field():
    with pytest.raises(UserError, match="train.beta"):
        TrainConfig(beta=-0.1)
    with pytest.raises(UserError, match="sample.n"):
        SampleConfig(n=1)
    with pytest.raises(UserError, match="train.steps_per_round must be >= 1"):
        TrainConfig(steps_per_round=0)
    with pytest.raises(UserError, match="train.epochs or train.steps_per_round, not both"):
        TrainConfig(epochs=2, steps_per_round=10)
    with pytest.raises(UserError, match="pair.max_pairs_per_round must be >= 1"):
        PairConfig(max_pairs_per_round=0)


def test_promotion_gate():
    assert promote_if_better(0.60, 0.55, 0.4, margin=0.0)
    assert not promote_if_better(0.55, 0.55, 0.9, margin=0.0)  # accuracy decides when present
    assert not promote_if_better(0.60, 0.55, 0.9, margin=0.1)
    assert promote_if_better(None, None, 0.6, margin=0.05)
    assert not promote_if_better(None, None, 0.5, margin=0.0)


def test_sloppy_carry_answers_and_their_kinds():
    from flywheel.examples.addition import answer_kind, sloppy_carry_answer

    rng = random.Random(0)
    carrying = [sloppy_carry_answer(27, 15, 0.7, 0.85, rng) for _ in range(4000)]
    assert set(carrying) == {"42", "422", "32", "322"}
    # Right needs no carry slip and no doubling: 0.15 * 0.3 = 0.045.
    assert 0.035 < carrying.count("42") / len(carrying) < 0.055
    assert 0.80 < sum(a in ("32", "322") for a in carrying) / len(carrying) < 0.90
    plain = [sloppy_carry_answer(21, 15, 0.7, 0.85, rng) for _ in range(4000)]
    assert set(plain) == {"36", "366"} and 0.27 < plain.count("36") / len(plain) < 0.33
    assert [answer_kind("27+15=", a) for a in ("42", "422", "32", "322", "41", "4")] == [
        "right", "doubled", "dropped carry", "dropped carry", "other", "other"]
    assert answer_kind("21+15=", "26") == "other"  # no carry to drop


def test_error_kinds_sql_agrees_with_answer_kind(tmp_path):
    from flywheel.examples.addition import ERROR_KINDS_SQL, answer_kind
    from storage.store import Store

    cases = [("27+15=", a) for a in ("42", "422", "32", "322", "41", " 42\n")] + [
        ("21+15=", "26"), ("21+15=", "366"), ("9+1=", "0"), ("9+1=", "00"), ("95+5=", "1000"), ("0+0=", "0")]
    store = Store.create(tmp_path / "flywheel.duckdb")  # the real schema
    with store.transaction() as tx:
        for i, (prompt, answer) in enumerate([*cases, ("hello", "42")]):
            tx.execute("INSERT INTO prompts (prompt_id, text, split) VALUES (?, ?, 'heldout') ON CONFLICT DO NOTHING",
                       [i, prompt])
            prompt_id = tx.execute("SELECT prompt_id FROM prompts WHERE text = ?", [prompt]).fetchone()[0]
            tx.execute("INSERT INTO completions (completion_id, round_id, prompt_id, checkpoint_id, purpose, "
                       "sample_index, text, prompt_token_ids, token_ids, num_tokens, sampling_params) "
                       "VALUES (?, 1, ?, 1, 'eval', 0, ?, [], [], 0, '{}')", [i, prompt_id, answer])
        rows = tx.execute(f"SELECT completion_id, kind, carries FROM ({ERROR_KINDS_SQL})").fetchall()
    kinds = {completion: kind for completion, kind, _ in rows}
    assert [kinds[i] for i in range(len(cases))] == [answer_kind(p, a) for p, a in cases]
    assert set(kinds.values()) == {"right", "doubled", "dropped carry", "other"}
    assert {completion for completion, _, carries in rows if carries} == {0, 1, 2, 3, 4, 5, 8, 9, 10}
    assert kinds[len(cases)] == "other"  # not an addition prompt


def test_rounds_sample_from_the_current_initial_or_last_refreshed_policy(tmp_path):
    from flywheel.promotion import roll_back
    from flywheel.rounds import sampling_policy
    from storage import tables
    from storage.store import Store

    store = Store.create(tmp_path / "flywheel.duckdb")
    with store.transaction() as tx:
        initial = tables.add_checkpoint(tx, "/models/initial", role="reference", status="promoted")
    began_with, round_ids = [], []
    for number in range(1, 7):  # round n begins with the policy held after round n - 1
        if number == 4:  # round 3's candidate was rejected; a person rolls round 2's back too
            rolled_back = store.read(tables.current_policy).checkpoint_id
            roll_back(store, "alice", "worse on our own prompts")
        with store.transaction() as tx:
            policy = tables.current_policy(tx).checkpoint_id
            round_ids.append(tables.start_round(tx, policy, initial, seed=number, config={}))
            began_with.append(policy)
            tables.add_checkpoint(tx, f"/models/round-{number}", role="candidate",
                                  status="rejected" if number == 3 else "promoted")
            tables.finish_step(tx, round_ids[-1], "done")
    assert rolled_back == began_with[2] and began_with[3] == began_with[1]

    def sampled(**sample):
        with store.transaction() as tx:
            return [sampling_policy(tx, tables.get_round(tx, r), SampleConfig(**sample)).checkpoint_id
                    for r in round_ids]

    assert sampled() == began_with  # online
    assert sampled(source="initial") == [initial] * 6  # offline
    # Semi-online: rounds 1, 3, 5 refresh, and so does round 4, begun after the rollback:
    # it does not sample the rolled-back checkpoint that round 3 sampled.
    assert sampled(refresh_every=2) == [began_with[i] for i in (0, 0, 2, 3, 4, 4)]
    assert rolled_back not in sampled(refresh_every=2)[3:]
    assert sampled(refresh_every=3) == [began_with[i] for i in (0, 0, 0, 3, 3, 3)]
    with pytest.raises(UserError, match="sample.refresh_every applies to sample.source current only"):
        SampleConfig(source="initial", refresh_every=2)
    with pytest.raises(UserError, match="sample.refresh_every must be >= 1"):
        SampleConfig(refresh_every=0)
