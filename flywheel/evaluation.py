"""Candidate versus incumbent on held-out prompts: task accuracy and judged win rate."""

from __future__ import annotations

from statistics import mean
from typing import Callable, Sequence

from judges import Judge, JudgeError, PairToJudge, Verdict, judge_batch
from storage.records import Completion, Evaluation, Prompt


def heldout_accuracy(
    completions: Sequence[Completion], prompts: dict[int, Prompt], score: Callable[[str, str], float]
) -> float:
    """Mean score of the completions (for a 0/1 rule, the share that is right)."""
    return mean(score(prompts[c.prompt_id].text, c.text) for c in completions)


def win_rate(
    candidate: Sequence[Completion],
    incumbent: Sequence[Completion],
    prompts: dict[int, Prompt],
    judge: Judge,
) -> float:
    """Share of matched samples (same prompt, same sample index) the judge gives the
    candidate; ties and both-bad count half, and pairs the judge could not decide are left out."""
    incumbent_by_key = {(c.prompt_id, c.sample_index): c for c in incumbent}
    matched = [(c, incumbent_by_key[(c.prompt_id, c.sample_index)]) for c in candidate
               if (c.prompt_id, c.sample_index) in incumbent_by_key]
    if not matched:
        raise ValueError("candidate and incumbent have no held-out samples in common")
    pairs = [PairToJudge(i, prompts[c.prompt_id].text, c.text, inc.text, prompts[c.prompt_id].messages)
             for i, (c, inc) in enumerate(matched)]
    points = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}
    decided = [points[v.winner] for v in judge_batch(judge, pairs) if isinstance(v, Verdict)]
    if not decided:
        raise JudgeError(f"judge {judge.name!r} could not decide any of {len(pairs)} held-out comparisons")
    return mean(decided)


def promote_if_better(
    candidate_accuracy: float | None,
    incumbent_accuracy: float | None,
    candidate_win_rate: float,
    margin: float,
) -> bool:
    """The promotion gate: beat the incumbent's accuracy by more than `margin` when the
    task has one; otherwise win more than half the matched comparisons by `margin`."""
    if candidate_accuracy is not None and incumbent_accuracy is not None:
        return candidate_accuracy > incumbent_accuracy + margin
    return candidate_win_rate > 0.5 + margin


def gate_reason(evaluation: Evaluation, margin: float) -> str:
    """The gate's comparison in words, recorded with its decision."""
    if evaluation.accuracy is not None and evaluation.incumbent_accuracy is not None:
        return (f"held-out accuracy {evaluation.accuracy:.3f} vs incumbent {evaluation.incumbent_accuracy:.3f}, "
                f"margin {margin}")
    return f"win rate {evaluation.win_rate:.3f} vs 0.5, margin {margin}"
