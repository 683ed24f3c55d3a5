"""Judges without an engine: the interface, loading by import path, best-vs-worst pairing,
the position-swap rule, batch-wise labelling on a real store, agreement, `flywheel judge`."""

import pytest

from cli.main import main
from flywheel.config import FlywheelConfig, JudgeConfig, PairConfig
from flywheel.examples.addition import addition_score
from flywheel.errors import UserError
from flywheel.pairing import form_pairs
from flywheel.rounds import Flywheel
from judges import HumanJudge, JudgeError, JudgeSpecError, NoVerdict, PairToJudge, RuleJudge, Verdict, load_judge
from judges.llm import PairwiseLLMJudge, combine_orders
from storage.records import Completion, Label
from storage import tables


# -- a user's own judges, named by import path (f"{__name__}:ShorterAnswerJudge") -------


class ShorterAnswerJudge:
    """A custom judge as a user writes one: the shorter answer wins, equal lengths tie."""

    name = "shorter-answer"

    def __init__(self, version: str = "1") -> None:
        self.version = version

    def judge(self, pairs):
        return [Verdict("a" if len(p.completion_a) < len(p.completion_b)
                        else "b" if len(p.completion_b) < len(p.completion_a) else "tie", confidence=0.9)
                for p in pairs]


class BreaksOnSecondBatch:
    name, version = "flaky", "1"

    def __init__(self):
        self.calls = 0

    def judge(self, pairs):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("judge server went away")
        return [Verdict("a") for _ in pairs]


class Undecided:
    name, version = "undecided", "1"

    def judge(self, pairs):
        return [NoVerdict("reply did not parse", raw_output="I think maybe") for _ in pairs]


class NoVersion:
    name = "no-version"

    def judge(self, pairs):
        return []


a_judge_instance = ShorterAnswerJudge(version="instance")


# -- a round on a real store, without an engine ------------------------------------------


ANSWERS = {"2+3=": ["5", "6", "15", "5"], "4+4=": ["8", "9", "10", "8"], "1+1=": ["2", "2", "2", "2"]}


def make_flywheel(tmp_path, judge=None, strategy="all", batch_size=256, truncated="drop"):
    config = FlywheelConfig(
        workdir=tmp_path / "fw", reference_model=tmp_path / "policy", prompts=tmp_path / "p.jsonl",
        heldout_prompts=tmp_path / "h.jsonl",
        judge=JudgeConfig("rule:flywheel.examples.addition:addition_score", {"name": "adder", "version": "1"}, batch_size=batch_size),
        pair=PairConfig(strategy=strategy, truncated=truncated),
    )
    return Flywheel(config, judge=judge)  # the vLLM engine starts only on the first sample


def sampled_round(flywheel, cut: tuple[str, ...] = ()) -> int:
    """A round in state 'sampled' holding ANSWERS as completions (the sampler's records);
    those whose text is in `cut` were cut at max_tokens."""
    with flywheel.store.transaction() as tx:
        prompt_ids = tables.add_prompts(tx, list(ANSWERS), "train")
        checkpoint = tables.add_checkpoint(tx, "/policy", "reference", "promoted")
        round_id = tables.start_round(tx, checkpoint, checkpoint, seed=1, config={})
        tables.add_completions(tx, [
            Completion(prompt_id, checkpoint, "train", i, text, [1, 4], [5, 2], -1.0,
                       "length" if text in cut else "stop", {}, round_id=round_id)
            for prompt_id, texts in zip(prompt_ids, ANSWERS.values()) for i, text in enumerate(texts)
        ])
        tables.finish_step(tx, round_id, "sampled")
    return round_id


def labels_of(store, round_id, judge_name=None):
    where = "p.round_id = ?" + (" AND l.judge_name = ?" if judge_name else "")
    params = [round_id] + ([judge_name] if judge_name else [])
    return store.read(tables.count, "labels l JOIN pairs p USING (pair_id)", where, params)


# -- scalar judges and pairing -----------------------------------------------------------


def test_rule_judge_prefers_higher_score_ties_equal_and_is_certain():
    judge = RuleJudge(addition_score, name="adder")
    verdicts = judge.judge([PairToJudge(1, "2+3=", "5", "6"), PairToJudge(2, "2+3=", "4", "5"),
                            PairToJudge(3, "2+3=", "4", "6")])
    assert [v.winner for v in verdicts] == ["a", "b", "tie"]
    assert {v.confidence for v in verdicts} == {1.0}
    assert judge.score([("2+3=", "5"), ("2+3=", "7")]) == [1.0, 0.0]


def test_best_vs_worst_pairs_the_top_against_the_bottom_in_random_order():
    def c(cid, prompt_id, index, text):
        return Completion(prompt_id, 1, "train", index, text, [1], [2], None, "stop", {}, round_id=1, completion_id=cid)

    completions = [c(1, 10, 0, "x"), c(2, 10, 1, "yy"), c(3, 10, 2, "zzz"), c(4, 10, 3, "w"),
                   c(5, 11, 0, "p"), c(6, 11, 1, "q")]
    scores = {1: 0.2, 2: 0.9, 3: -0.5, 4: 0.1, 5: 1.0, 6: 1.0}  # prompt 11: all equal, no signal
    pairs = []
    for seed in range(20):
        pairs += form_pairs(completions, 1, "best_vs_worst", seed=seed, scores=scores)
    assert len(pairs) == 20 and {p.prompt_id for p in pairs} == {10}
    assert {frozenset((p.completion_a_id, p.completion_b_id)) for p in pairs} == {frozenset((2, 3))}
    firsts = [p.completion_a_id for p in pairs]
    assert 0 < firsts.count(2) < 20  # the better one is not always in slot a
    with pytest.raises(ValueError, match="needs scores"):
        form_pairs(completions, 1, "best_vs_worst", seed=0)


def test_best_vs_worst_round_scores_with_the_rule_judge_and_keeps_the_scores(tmp_path):
    flywheel = make_flywheel(tmp_path, strategy="best_vs_worst")
    round_id = sampled_round(flywheel)
    assert flywheel.pair(round_id) == 2  # 1+1= has one answer only
    store = flywheel.store
    _, rows = store.query(
        "SELECT pr.text, ca.text, cb.text FROM pairs p JOIN prompts pr USING (prompt_id) "
        "JOIN completions ca ON ca.completion_id = p.completion_a_id "
        "JOIN completions cb ON cb.completion_id = p.completion_b_id ORDER BY pr.text")
    for prompt, a, b in rows:
        assert sorted([addition_score(prompt, a), addition_score(prompt, b)]) == [0.0, 1.0]
    _, scored = store.query("SELECT count(*), min(judge_name), sum(score) FROM completion_scores")
    assert scored == [(12, "adder", 8.0)]  # right answers: 2 + 2 + 4
    assert flywheel.label(round_id) == 2  # every best-vs-worst pair has a winner
    assert len(store.read(tables.preference_triples, round_id)) == 2


def test_best_vs_worst_round_without_completions_forms_no_pairs(tmp_path):
    flywheel = make_flywheel(tmp_path, strategy="best_vs_worst")
    with flywheel.store.transaction() as tx:
        checkpoint = tables.add_checkpoint(tx, "/policy", "reference", "promoted")
        round_id = tables.start_round(tx, checkpoint, checkpoint, seed=1, config={})
        tables.finish_step(tx, round_id, "sampled")
    assert flywheel.pair(round_id) == 0  # no scores to rank is not "scores missing"


def test_best_vs_worst_needs_a_scalar_judge(tmp_path):
    with pytest.raises(UserError, match="scores only pairs"):
        make_flywheel(tmp_path, judge=ShorterAnswerJudge(), strategy="best_vs_worst")


# -- the pairwise LLM judge's rules (its engine runs in test_llm_judge.py) ---------------


def test_position_swap_rule():
    raw = ("x", "y")
    assert combine_orders("a", "a", raw) == Verdict("a", 1.0, "a first: 'x'; b first: 'y'")
    assert combine_orders("both_bad", "both_bad", raw).winner == "both_bad"
    flipped = combine_orders("a", "b", raw)  # e.g. a judge that always answers "A"
    assert flipped.winner == "tie" and flipped.confidence == 0.5 and "changed with the order" in flipped.rationale
    assert combine_orders("tie", "a", raw).winner == "tie"
    assert isinstance(combine_orders(None, "a", raw), NoVerdict)
    assert isinstance(combine_orders("a", None, raw), NoVerdict)


def test_llm_verdicts_are_parsed_strictly(tiny_policy):
    judge = PairwiseLLMJudge(tiny_policy)
    for reply, verdict in [("A", "A"), (" B\n", "B"), ("tie", "tie"), ("both bad.", "both bad")]:
        assert judge.parse(reply) == verdict
    for reply in ["", "a", "AB", "A or B", "Answer: A", "The answer is B", "TIE", "A, because"]:
        assert judge.parse(reply) is None, reply


def test_llm_judge_settings_are_checked(tiny_policy, tmp_path):
    with pytest.raises(JudgeSpecError, match="lacks {completion_b}"):
        PairwiseLLMJudge(tiny_policy, template="{prompt} {completion_a}")
    with pytest.raises(JudgeSpecError, match="named group"):
        PairwiseLLMJudge(tiny_policy, verdict_pattern="(A|B)")
    with pytest.raises(JudgeSpecError, match="no config.json"):
        PairwiseLLMJudge(tmp_path)
    template = tmp_path / "judge.txt"
    template.write_text("{prompt}|{completion_a}|{completion_b}|")
    one, two = PairwiseLLMJudge(tiny_policy, template_file=template), PairwiseLLMJudge(tiny_policy)
    assert one.template == template.read_text()
    assert one.version != two.version  # another template is another judge version


# -- loading judges by spec --------------------------------------------------------------


def test_custom_judges_load_by_import_path_with_options():
    judge = load_judge(f"{__name__}:ShorterAnswerJudge", {"version": "7"})
    assert (judge.name, judge.version) == ("shorter-answer", "7")
    assert load_judge(f"{__name__}:a_judge_instance") is a_judge_instance
    rule = load_judge("rule:flywheel.examples.addition:addition_score")
    assert rule.name == "rule:flywheel.examples.addition:addition_score"
    assert rule.judge([PairToJudge(1, "1+1=", "2", "3")])[0].winner == "a"


@pytest.mark.parametrize("spec, options, message", [
    ("nosuchpackage.judges:MyJudge", {}, "does not import: ModuleNotFoundError"),
    (f"{__name__}:NoSuchJudge", {}, "has no 'NoSuchJudge'"),
    (f"{__name__}:NoVersion", {}, "does not fit the Judge interface: it needs a string 'version'"),
    (f"{__name__}:ShorterAnswerJudge", {"temperature": 2}, "cannot be built with options ['temperature']"),
    (f"{__name__}:a_judge_instance", {"version": "2"}, "takes no options"),
    ("rule:flywheel.examples.addition:ALPHABET", {}, "is not callable"),
    ("reward-model:/no/such/dir", {}, "has no config.json"),
    ("MyJudge", {}, "must look like 'package.module:name'"),
])
def test_bad_judge_specs_are_one_line_errors(spec, options, message):
    with pytest.raises(JudgeSpecError, match=message.replace("(", r"\(").replace("[", r"\[")) as error:
        load_judge(spec, options)
    assert "\n" not in str(error.value)


# -- labelling a round, batch by batch ---------------------------------------------------


def test_a_judge_that_raises_keeps_earlier_batches_and_stores_none_of_its_batch(tmp_path):
    flywheel = make_flywheel(tmp_path, judge=BreaksOnSecondBatch(), batch_size=4)
    round_id = sampled_round(flywheel)
    pairs = flywheel.pair(round_id)
    assert pairs == 10  # 'all': 5 + 5 distinct-text pairs, 1+1= has none
    with pytest.raises(JudgeError, match="'flaky' failed: RuntimeError: judge server went away"):
        flywheel.label(round_id)
    store = flywheel.store
    assert labels_of(store, round_id) == 4  # the first batch, none of the second
    assert store.read(tables.get_round, round_id).state == "paired"
    flywheel.label(round_id)  # the rerun judges only what is left (calls 3 and 4 succeed)
    assert labels_of(store, round_id) == pairs
    _, duplicates = store.query("SELECT count(*) FROM (SELECT pair_id FROM labels GROUP BY pair_id HAVING count(*) > 1)")
    assert duplicates == [(0,)]
    assert store.read(tables.get_round, round_id).state == "labelled"


def test_a_judge_returning_the_wrong_number_of_labels_stores_nothing(tmp_path):
    class Short:
        name, version = "short", "1"

        def judge(self, pairs):
            return [Verdict("a")] * (len(pairs) - 1)

    flywheel = make_flywheel(tmp_path, judge=Short())
    round_id = sampled_round(flywheel)
    flywheel.pair(round_id)
    with pytest.raises(JudgeError, match="returned 9 labels for 10 pairs"):
        flywheel.label(round_id)
    assert labels_of(flywheel.store, round_id) == 0


def test_undecided_pairs_are_recorded_failures_not_labels(tmp_path):
    flywheel = make_flywheel(tmp_path, judge=Undecided())
    round_id = sampled_round(flywheel)
    flywheel.pair(round_id)
    assert flywheel.label(round_id) == 0
    store = flywheel.store
    assert labels_of(store, round_id) == 0
    _, failures = store.query("SELECT count(*), min(judge_name), min(raw_output) FROM judge_failures")
    assert failures == [(10, "undecided", "I think maybe")]
    _, summary = store.query("SELECT judge, labels, judge_failures FROM round_summary")
    assert summary == [("undecided@1", 0, 10)]


def test_a_round_keeps_the_judge_that_started_labelling_it(tmp_path):
    flywheel = make_flywheel(tmp_path, judge=BreaksOnSecondBatch(), batch_size=4)
    round_id = sampled_round(flywheel)
    flywheel.pair(round_id)
    with pytest.raises(JudgeError):
        flywheel.label(round_id)
    flywheel.judge = ShorterAnswerJudge()
    with pytest.raises(UserError, match="being labelled by flaky@1"):
        flywheel.label(round_id)


# -- agreement between labellers, and relabelling after the fact -------------------------


def test_judge_agreement_and_training_data_of_a_relabelled_round(tmp_path):
    flywheel = make_flywheel(tmp_path, judge=RuleJudge(addition_score, name="adder", version="1"))
    round_id = sampled_round(flywheel)
    flywheel.pair(round_id)
    flywheel.label(round_id)
    store = flywheel.store
    triples_before = store.read(tables.preference_triples, round_id)
    # Hand-made labels: a second judge and a person, on the first four of the adder's pairs.
    _, adder_labels = store.query("SELECT pair_id, winner FROM labels WHERE judge_name = 'adder' ORDER BY pair_id")
    adder = dict(adder_labels)
    pairs = [pair_id for pair_id, _ in adder_labels]
    flip = {"a": "b", "b": "a", "tie": "tie"}
    with store.transaction() as tx:
        tables.add_labels(tx, [Label(pair_id, adder[pair_id] if i < 3 else flip[adder[pair_id]], "other", "2")
                       for i, pair_id in enumerate(pairs[:4])])
        tables.add_labels(tx, [Label(pair_id, "a", "human", "1", annotator="alice") for pair_id in pairs[:2]])
    _, rows = store.query("SELECT judge_a, judge_b, pairs, agreements FROM judge_agreement ORDER BY judge_a, judge_b")
    expected_alice = sum(adder[pair_id] == "a" for pair_id in pairs[:2])
    assert ("adder@1", "other@2", 4, 3) in rows
    assert ("adder@1", "human@1 (alice)", 2, expected_alice) in rows
    assert {(r[0], r[1]) for r in rows} == {("adder@1", "other@2"), ("adder@1", "human@1 (alice)"),
                                           ("human@1 (alice)", "other@2")}
    # Labels added by other labellers are for comparison; the round trains on its own judge's.
    assert store.read(tables.preference_triples, round_id) == triples_before
    assert store.read(tables.count_preferences, round_id) == len(triples_before)


def test_flywheel_judge_command_relabels_a_round_with_a_custom_judge(tmp_path, capsys):
    flywheel = make_flywheel(tmp_path)
    round_id = sampled_round(flywheel)
    flywheel.pair(round_id)
    flywheel.label(round_id)
    db = str(flywheel.config.database)
    assert main(["judge", "--judge", f"{__name__}:ShorterAnswerJudge", "--judge-option", "version=3",
                 "--db", db]) == 0
    store = flywheel.store
    assert labels_of(store, round_id, "shorter-answer") == store.read(tables.count, "pairs", "round_id = ?", [round_id])
    _, versions = store.query("SELECT DISTINCT judge_version FROM labels WHERE judge_name = 'shorter-answer'")
    assert versions == [("3",)]
    out = capsys.readouterr()
    assert "shorter-answer@3" in out.out and "adder@1" in out.out  # the agreement table
    # Again: nothing left to judge, nothing duplicated.
    assert main(["judge", "--judge", f"{__name__}:ShorterAnswerJudge", "--judge-option", "version=3",
                 "--db", db, "--round", str(round_id)]) == 0
    assert "labelled 0 pairs" in capsys.readouterr().err
    assert labels_of(store, round_id, "shorter-answer") == store.read(tables.count, "pairs", "round_id = ?", [round_id])
    assert main(["judge", "--judge", "nosuch.module:Judge", "--db", db]) == 2
    assert main(["judge", "--judge", f"{__name__}:ShorterAnswerJudge", "--db", db, "--round", "99"]) == 2
    assert "round 99 has no pairs" in capsys.readouterr().err


def test_the_readme_custom_judge_works_as_written(tmp_path, monkeypatch):
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = readme.split("# mypkg/judges.py\n", 1)[1].split("```", 1)[0]
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "judges.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    judge = load_judge("mypkg.judges:ShorterIsBetter")
    verdicts = judge.judge([PairToJudge(1, "1+1=", "2", "22"), PairToJudge(2, "1+1=", "3", "2")])
    assert [v.winner for v in verdicts] == ["a", "tie"]


@pytest.mark.parametrize("truncated", ["keep", "lose", "drop"])
def test_completions_cut_at_max_tokens_are_kept_lose_or_are_dropped(tmp_path, truncated):
    """"15" (to 2+3=) was cut. Against "6", both wrong, the adder says tie: `keep` asks it,
    `lose` gives the finished "6" the win without asking, `drop` never pairs "15"."""
    flywheel = make_flywheel(tmp_path, truncated=truncated)
    round_id = sampled_round(flywheel, cut=("15",))
    flywheel.pair(round_id)
    flywheel.label(round_id)
    _, rows = flywheel.store.query(
        "SELECT ca.text, cb.text, l.winner, l.rationale FROM pairs p "
        "JOIN completions ca ON ca.completion_id = p.completion_a_id "
        "JOIN completions cb ON cb.completion_id = p.completion_b_id JOIN labels l USING (pair_id)")
    assert rows
    with_cut = {(a, b): (winner, rationale) for a, b, winner, rationale in rows if "15" in (a, b)}
    if truncated == "drop":
        assert not with_cut
        return
    winner, rationale = with_cut.get(("6", "15")) or with_cut[("15", "6")]
    six_wins = "a" if ("6", "15") in with_cut else "b"
    if truncated == "keep":
        assert winner == "tie" and "cut" not in rationale
    else:
        assert winner == six_wins and "cut at sample.max_tokens" in rationale
    # Pairs of two finished completions are the judge's either way.
    assert all("cut" not in rationale for a, b, _, rationale in rows if "15" not in (a, b))


def test_people_cannot_be_the_judge_when_cut_completions_lose(tmp_path):
    with pytest.raises(UserError, match="pair.truncated 'lose'"):
        make_flywheel(tmp_path, judge=HumanJudge(), truncated="lose")
