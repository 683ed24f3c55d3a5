"""Rule judge: any Python scoring function `score(prompt, completion) -> float`."""

from __future__ import annotations

from typing import Callable, Sequence

from judges.base import PairToJudge, Verdict, verdicts_from_scores

ScoreFunction = Callable[[str, str], float]


class RuleJudge:
    """Prefers the completion with the higher score; equal scores are a tie."""

    def __init__(self, score: ScoreFunction, name: str | None = None, version: str = "1") -> None:
        self.score_function = score
        self.name = name or f"rule:{getattr(score, '__module__', '?')}:{getattr(score, '__qualname__', 'score')}"
        self.version = version

    def score(self, items: Sequence[tuple[str, str]]) -> list[float]:
        return [self.score_function(prompt, completion) for prompt, completion in items]

    def judge(self, pairs: Sequence[PairToJudge]) -> list[Verdict]:
        return verdicts_from_scores(self, pairs, bradley_terry=False)
