"""The judge plug point: `judge(pairs) -> labels`, with a name and version on every label."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

from storage.records import WINNERS


# A prompt's conversation: [{"role": "system" | "user" | "assistant", "content": text}, ...].
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class PairToJudge:
    pair_id: int
    prompt: str  # the prompt's text; a conversation's turns as plain text
    completion_a: str
    completion_b: str
    # The conversation, for a prompt that came as one (None for plain text). Judges that
    # read text take `prompt`; a reward model renders this with its own chat template.
    prompt_messages: Messages | None = None


@dataclass(frozen=True)
class Verdict:
    """A label: which completion is better, how sure the judge is, and why."""

    winner: str  # one of storage.records.WINNERS
    confidence: float | None = None
    rationale: str | None = None

    def __post_init__(self) -> None:
        if self.winner not in WINNERS:
            raise ValueError(f"winner must be one of {WINNERS}, got {self.winner!r}")
        if self.confidence is not None and not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence must be in [0, 1], got {self.confidence}")


@dataclass(frozen=True)
class NoVerdict:
    """The judge could not decide this pair (say, its answer did not parse).

    Stored in `judge_failures` with the raw output, never as a label, so a judge that
    rambles is visible instead of silently labelling pairs.
    """

    reason: str
    raw_output: str | None = None


@runtime_checkable
class Judge(Protocol):
    """Anything with a name, a version and a `judge` method returning one result per pair."""

    name: str
    version: str

    def judge(self, pairs: Sequence[PairToJudge]) -> list[Verdict | NoVerdict]: ...


@runtime_checkable
class ScalarJudge(Judge, Protocol):
    """A judge that scores one completion at a time; best-vs-worst pairing needs one."""

    def score(self, items: Sequence[tuple[str, str]], messages: Sequence[Messages | None] | None = None
              ) -> list[float]:
        """One score per (prompt text, completion); higher is better. `messages[i]` is item
        i's conversation where the prompts came as conversations (passed only then)."""
        ...


class JudgeError(Exception):
    """A judge broke its contract; the round stops and none of the batch is stored."""


class JudgeSpecError(ValueError):
    """A judge named in a config or on the command line cannot be built; one-line message."""


def close_judge(judge: Judge) -> None:
    """Release what a judge holds (an engine, a model), if it has a `close` method."""
    close = getattr(judge, "close", None)
    if callable(close):
        close()


def judge_batch(judge: Judge, pairs: Sequence[PairToJudge]) -> list[Verdict | NoVerdict]:
    """Call a judge and check it kept the contract: one `Verdict` or `NoVerdict` per pair, in order."""
    try:
        verdicts = list(judge.judge(pairs))
    except Exception as error:
        raise JudgeError(f"judge {judge.name!r} failed: {type(error).__name__}: {error}") from error
    if len(verdicts) != len(pairs):
        raise JudgeError(
            f"judge {judge.name!r} returned {len(verdicts)} labels for {len(pairs)} pairs"
        )
    wrong = [v for v in verdicts if not isinstance(v, (Verdict, NoVerdict))]
    if wrong:
        raise JudgeError(
            f"judge {judge.name!r} returned {type(wrong[0]).__name__}, not Verdict or NoVerdict"
        )
    return verdicts


def score_batch(judge: ScalarJudge, items: Sequence[tuple[str, str]],
                messages: Sequence[Messages | None] | None = None) -> list[float]:
    """Call a scalar judge and check it returned one finite score per item. Conversations
    are passed only when there are some, so a judge written for text keeps working."""
    conversations = {"messages": list(messages)} if messages is not None and any(messages) else {}
    try:
        scores = [float(s) for s in judge.score(items, **conversations)]
    except Exception as error:
        raise JudgeError(f"judge {judge.name!r} failed to score: {type(error).__name__}: {error}") from error
    if len(scores) != len(items):
        raise JudgeError(f"judge {judge.name!r} returned {len(scores)} scores for {len(items)} completions")
    if not all(math.isfinite(s) for s in scores):
        raise JudgeError(f"judge {judge.name!r} returned a score that is not a finite number")
    return scores


def verdicts_from_scores(
    judge: ScalarJudge, pairs: Sequence[PairToJudge], bradley_terry: bool
) -> list[Verdict]:
    """Label pairs by scoring both completions; equal scores are a tie.

    With `bradley_terry` the confidence is the Bradley-Terry probability that the winner
    is preferred, sigmoid(|r_a - r_b|) (Ouyang et al. 2022, eq. 1), which is what a
    reward model's scores mean; otherwise a strict rule is certain (confidence 1).
    """
    items = [(p.prompt, c) for p in pairs for c in (p.completion_a, p.completion_b)]
    scores = score_batch(judge, items, [p.prompt_messages for p in pairs for _ in range(2)])
    verdicts = []
    for score_a, score_b in zip(scores[0::2], scores[1::2]):
        winner = "a" if score_a > score_b else "b" if score_b > score_a else "tie"
        confidence = 1.0 / (1.0 + math.exp(-abs(score_a - score_b))) if bradley_terry else 1.0
        verdicts.append(Verdict(winner, confidence, f"score a={score_a:.4g} b={score_b:.4g}"))
    return verdicts


def checkpoint_fingerprint(path: Path, *extra: str) -> str:
    """A short id of a checkpoint's content (config, weight file sizes and headers) and any
    extra settings, so a judge's version changes when its model or prompt does."""
    digest = hashlib.sha256()
    for file in sorted(Path(path).iterdir()):
        if file.suffix in (".json", ".safetensors", ".bin") and file.is_file():
            digest.update(file.name.encode())
            digest.update(str(file.stat().st_size).encode())
            with file.open("rb") as handle:
                # A safetensors header (tensor names, shapes, offsets) sits in the first
                # bytes; hashing gigabytes of weights on every start would cost seconds.
                digest.update(handle.read(1 << 20))
    for item in extra:
        digest.update(item.encode())
    return digest.hexdigest()[:12]
