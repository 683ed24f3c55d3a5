"""The judge plug point: `judge(pairs) -> labels`, with a name and version on every label."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from storage.records import WINNERS


@dataclass(frozen=True)
class PairToJudge:
    pair_id: int
    prompt: str
    completion_a: str
    completion_b: str


@dataclass(frozen=True)
class Verdict:
    winner: str  # one of storage.records.WINNERS
    confidence: float | None = None
    rationale: str | None = None

    def __post_init__(self) -> None:
        if self.winner not in WINNERS:
            raise ValueError(f"winner must be one of {WINNERS}, got {self.winner!r}")


@runtime_checkable
class Judge(Protocol):
    """Anything with a name, a version and a `judge` method returning one verdict per pair."""

    name: str
    version: str

    def judge(self, pairs: Sequence[PairToJudge]) -> list[Verdict]: ...


class JudgeError(Exception):
    """A judge broke its contract; the round stops and none of the batch is stored."""


def judge_batch(judge: Judge, pairs: Sequence[PairToJudge]) -> list[Verdict]:
    """Call a judge and check it kept the contract: one `Verdict` per pair, in order."""
    try:
        verdicts = list(judge.judge(pairs))
    except Exception as error:
        raise JudgeError(f"judge {judge.name!r} failed: {type(error).__name__}: {error}") from error
    if len(verdicts) != len(pairs):
        raise JudgeError(
            f"judge {judge.name!r} returned {len(verdicts)} labels for {len(pairs)} pairs"
        )
    wrong = [v for v in verdicts if not isinstance(v, Verdict)]
    if wrong:
        raise JudgeError(f"judge {judge.name!r} returned {type(wrong[0]).__name__}, not Verdict")
    return verdicts
