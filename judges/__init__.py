"""Pluggable judges. A judge labels pairs; every label records the judge's name and version.

Heavy judges live in their own modules so that importing this package stays cheap:
`judges.reward_model.RewardModelJudge` (transformers) and `judges.llm.PairwiseLLMJudge` (vLLM).
People label through the queue (`judges.human`) and its web page (`judges.labelling_app`).
"""

from judges.base import (
    Judge,
    JudgeError,
    JudgeSpecError,
    NoVerdict,
    PairToJudge,
    ScalarJudge,
    Verdict,
    close_judge,
    judge_batch,
    score_batch,
)
from judges.human import HumanJudge
from judges.loading import import_object, load_judge
from judges.rule import RuleJudge

__all__ = [
    "HumanJudge", "Judge", "JudgeError", "JudgeSpecError", "NoVerdict", "PairToJudge", "RuleJudge", "ScalarJudge",
    "Verdict", "close_judge", "import_object", "judge_batch", "load_judge", "score_batch",
]
