"""Rule judge: any Python scoring function `score(prompt, completion) -> float`."""

from __future__ import annotations

from typing import Callable, Sequence

from judges.base import PairToJudge, Verdict

ScoreFunction = Callable[[str, str], float]


class RuleJudge:
    """Prefers the completion with the higher score; equal scores are a tie."""

    def __init__(self, score: ScoreFunction, name: str | None = None, version: str = "1") -> None:
        self.score = score
        self.name = name or f"rule:{getattr(score, '__module__', '?')}.{getattr(score, '__qualname__', 'score')}"
        self.version = version

    def judge(self, pairs: Sequence[PairToJudge]) -> list[Verdict]:
        verdicts = []
        for pair in pairs:
            score_a = self.score(pair.prompt, pair.completion_a)
            score_b = self.score(pair.prompt, pair.completion_b)
            winner = "a" if score_a > score_b else "b" if score_b > score_a else "tie"
            verdicts.append(
                Verdict(winner=winner, confidence=1.0, rationale=f"score a={score_a:g} b={score_b:g}")
            )
        return verdicts
