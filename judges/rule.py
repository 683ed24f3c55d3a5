"""Rule judge: any Python scoring function `score(prompt, completion) -> float`."""

from __future__ import annotations

import hashlib
import inspect
from typing import Callable, Sequence

from judges.base import Messages, PairToJudge, Verdict, verdicts_from_scores

ScoreFunction = Callable[[str, str], float]


class RuleJudge:
    """Prefers the completion with the higher score; equal scores are a tie. Its version is
    a fingerprint of the function's source unless given, so labels from an edited function
    are told apart (in `judge_agreement`, and a round resumed after an edit refuses it)."""

    def __init__(self, score: ScoreFunction, name: str | None = None, version: str | None = None) -> None:
        self.score_function = score
        self.name = name or f"rule:{getattr(score, '__module__', '?')}:{getattr(score, '__qualname__', 'score')}"
        self.version = version or source_fingerprint(score)

    def score(self, items: Sequence[tuple[str, str]], messages: Sequence[Messages | None] | None = None
              ) -> list[float]:
        return [self.score_function(prompt, completion) for prompt, completion in items]

    def judge(self, pairs: Sequence[PairToJudge]) -> list[Verdict]:
        return verdicts_from_scores(self, pairs, bradley_terry=False)


def source_fingerprint(function: Callable) -> str:
    """The first 12 hex digits of the SHA-256 of a function's source; "1" where Python has
    no source for it (a builtin, a function typed into a REPL)."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return "1"
    return hashlib.sha256(source.encode()).hexdigest()[:12]
