"""The reward-model judge on a real (tiny) reward model that the test trains."""

import math
import random

import pytest

from judges import JudgeSpecError, PairToJudge, load_judge
from tiny_judges import RM_ACCURACY, RM_MAX_OPERAND, build_reward_model, every_training_pair, near_miss
from flywheel.examples.addition import addition_prompt


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    return build_reward_model(tmp_path_factory.mktemp("rm"))


def test_trained_reward_model_prefers_the_right_sum(reward_model):
    judge = load_judge(f"reward-model:{reward_model}", {"batch_size": "7"})  # CLI options are strings
    assert judge.batch_size == 7 and judge.name == "reward-model:reward-model"
    rng = random.Random(1)
    pairs, right_is_a = [], []
    for a in range(RM_MAX_OPERAND + 1):
        for b in range(RM_MAX_OPERAND + 1):
            right, wrong = str(a + b), near_miss(a, b, rng)
            first = rng.random() < 0.5
            pairs.append(PairToJudge(len(pairs), addition_prompt(a, b), *((right, wrong) if first else (wrong, right))))
            right_is_a.append(first)
    verdicts = judge.judge(pairs)
    picked_right = [v.winner == ("a" if first else "b") for v, first in zip(verdicts, right_is_a)]
    # Each pair is one fact with one of its near misses, and the fixture trained until at
    # most 3 % of all (fact, near miss) pairs were ranked wrong: at most 13 of the 435,
    # so at most 13 of these 100 facts, whatever the seed or the machine.
    assert sum(picked_right) >= len(pairs) - math.floor((1 - RM_ACCURACY) * len(every_training_pair()))
    # Confidence is the Bradley-Terry probability of the winner: in (0.5, 1).
    assert all(0.5 <= v.confidence < 1.0 for v in verdicts)


def test_scores_do_not_depend_on_padding_or_batch_neighbours(reward_model):
    judge = load_judge(f"reward-model:{reward_model}", {"batch_size": 4})
    short = ("3+4=", "7")
    alone = judge.score([short])[0]
    padded = judge.score([short, ("12+34=", "4600000"), ("1+1=", "2")])[0]  # padded to the longest
    assert padded == pytest.approx(alone, abs=1e-5)
    # Too long for the model: cut from the left, so the answer at the end is still read.
    long_prompt = "1+" * 40 + "1="
    assert len(judge.score([(long_prompt, "41")])) == 1


def test_only_single_output_sequence_classifiers_are_reward_models(tiny_policy, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    with pytest.raises(JudgeSpecError, match="LlamaForCausalLM, not a sequence-classification model"):
        load_judge(f"reward-model:{tiny_policy}")
    two_outputs = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_labels=2))
    two_outputs.save_pretrained(tmp_path / "classifier")
    with pytest.raises(JudgeSpecError, match="has 2 outputs; a reward model needs exactly 1"):
        load_judge(f"reward-model:{tmp_path / 'classifier'}")
