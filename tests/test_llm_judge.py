"""The pairwise LLM judge through the real vLLM engine, on a tiny judge the test trains."""

import pytest

from cli.main import main
from judges import NoVerdict, PairToJudge
from judges.llm import PairwiseLLMJudge
from storage.records import Completion, Pair
from storage.store import Store
from tiny_judges import TEMPLATES, build_llm_judge
from storage import tables

pytestmark = pytest.mark.slow

# Engine settings for the tiny judge; judges with equal settings share one engine. A tenth
# of the RAM for its KV cache (not vLLM's 0.3): the session's policy engine holds 0.3 of it,
# and the `flywheel judge` call below starts an engine of its own beside both.
ENGINE = dict(max_model_len=128, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.1)


@pytest.fixture(scope="module")
def judge_model(tmp_path_factory):
    path = build_llm_judge(tmp_path_factory.mktemp("judge"))
    yield path
    PairwiseLLMJudge(path, **ENGINE).close()


def tiny_judge(judge_model, template):
    return PairwiseLLMJudge(judge_model, template=TEMPLATES[template], name=f"tiny-{template}", **ENGINE)


PAIRS = [PairToJudge(i, prompt, a, b) for i, (prompt, a, b) in enumerate([
    ("3+4=", "good", "bad"), ("56+7=", "bad", "good"), ("1+1=", "good", "good"), ("9+90=", "bad", "bad"),
    ("12+34=", "bad", "good"), ("8+8=", "good", "bad"),
])]


def test_llm_judge_labels_pairs_through_vllm_in_both_orders(judge_model):
    verdicts = tiny_judge(judge_model, "judging").judge(PAIRS)
    assert [v.winner for v in verdicts] == ["a", "b", "tie", "both_bad", "b", "a"]
    assert all(v.confidence == 1.0 for v in verdicts)  # each verdict survived the swap
    assert verdicts[0].rationale == "a first: 'A'; b first: 'B'"


def test_a_judge_that_always_answers_a_gives_only_ties(judge_model):
    verdicts = tiny_judge(judge_model, "always_a").judge(PAIRS)
    assert [v.winner for v in verdicts] == ["tie"] * len(PAIRS)
    assert all("changed with the order" in v.rationale and "'A'" in v.rationale for v in verdicts)


def test_unparseable_replies_are_recorded_failures_never_labels(judge_model, tmp_path, capsys):
    verdicts = tiny_judge(judge_model, "rambling").judge(PAIRS[:2])
    assert all(isinstance(v, NoVerdict) and "hmm" in v.raw_output for v in verdicts)
    # The same through `flywheel judge` on a real store: failures kept, no labels.
    store = Store.create(tmp_path / "fw.duckdb")
    with store.transaction() as tx:
        (prompt_id,) = tables.add_prompts(tx, ["3+4="], "train")
        checkpoint = tables.add_checkpoint(tx, "/policy", "reference", "promoted")
        round_id = tables.start_round(tx, checkpoint, checkpoint, seed=1, config={})
        ids = tables.add_completions(tx, [Completion(prompt_id, checkpoint, "train", i, text, [1], [2], None, "stop", {},
                                             round_id=round_id) for i, text in enumerate(["good", "bad"])])
        tables.add_pairs(tx, [Pair(round_id, prompt_id, ids[0], ids[1], "all")])
    options = [f"template={TEMPLATES['rambling']}", "max_model_len=128", "dtype=float32", "enforce_eager=true",
               "gpu_memory_utilization=0.1"]
    args = ["judge", "--judge", f"llm:{judge_model}", "--db", str(store.path)]
    for option in options:
        args += ["--judge-option", option]
    assert main(args) == 0
    assert "1 undecided" in capsys.readouterr().err
    assert store.read(tables.count, "labels") == 0
    _, failures = store.query("SELECT judge_name, raw_output FROM judge_failures")
    assert failures == [("llm:llm-judge", "a first: 'hmm'; b first: 'hmm'")]
