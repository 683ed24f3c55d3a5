"""Labelling a round's pairs with a judge, batch by batch, and scoring completions.

Each batch of verdicts lands in one transaction, so a crash or a failing judge loses at
most the batch in flight, and a rerun judges only the pairs this judge has not judged.
Used both by a round's label step and by `flywheel judge` (relabelling after the fact).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tqdm import tqdm

from judges import Judge, NoVerdict, PairToJudge, ScalarJudge, Verdict, judge_batch, score_batch
from storage.records import Completion, CompletionScore, JudgeFailure, Label, PairForJudge, Prompt
from storage.store import Store
from storage import tables


@dataclass(frozen=True)
class LabellingResult:
    labelled: int  # labels stored by this call
    failed: int  # pairs the judge could not decide (recorded in judge_failures)
    already_done: int  # pairs this judge had judged before the call


def label_pairs(store: Store, judge: Judge, round_id: int, batch_size: int, progress: bool = True,
                truncated: str = "keep") -> LabellingResult:
    """Judge every pair of the round that this judge (name and version) has not judged yet.

    With `truncated="lose"` (`pair.truncated`), a pair of a completion cut at max_tokens
    and a finished one is not put to the judge: the finished one wins, and the label says why.
    """
    with store.transaction() as tx:
        todo = tables.pairs_to_judge(tx, round_id, judge.name, judge.version)
        already_done = tables.count(tx, "pairs", "round_id = ?", [round_id]) - len(todo)
    labelled = failed = 0
    with tqdm(total=len(todo), desc=f"labelling round {round_id} ({judge.name})", unit="pair",
              disable=not progress or not todo, leave=False) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            decided = {pair.pair_id: verdict for pair in batch
                       if truncated == "lose" and (verdict := truncation_verdict(pair)) is not None}
            asked = [pair for pair in batch if pair.pair_id not in decided]
            verdicts = dict(zip((pair.pair_id for pair in asked), judge_batch(judge, [
                PairToJudge(p.pair_id, p.prompt, p.completion_a, p.completion_b, p.prompt_messages) for p in asked])))
            verdicts.update(decided)
            labels, failures = [], []
            for pair in batch:
                verdict = verdicts[pair.pair_id]
                if isinstance(verdict, NoVerdict):
                    failures.append(JudgeFailure(pair.pair_id, judge.name, judge.version, verdict.reason,
                                                 verdict.raw_output))
                else:
                    labels.append(Label(pair_id=pair.pair_id, winner=verdict.winner, judge_name=judge.name,
                                        judge_version=judge.version, confidence=verdict.confidence,
                                        rationale=verdict.rationale))
            with store.transaction() as tx:
                tables.add_labels(tx, labels)
                tables.add_judge_failures(tx, failures)
            labelled += len(labels)
            failed += len(failures)
            bar.update(len(batch))
    return LabellingResult(labelled, failed, already_done)


def truncation_verdict(pair: PairForJudge) -> Verdict | None:
    """The finished completion's win over one cut at max_tokens; None unless exactly one was cut."""
    if pair.truncated_a == pair.truncated_b:
        return None
    cut = "a" if pair.truncated_a else "b"
    return Verdict("b" if pair.truncated_a else "a", confidence=1.0,
                   rationale=f"completion {cut} was cut at sample.max_tokens (pair.truncated: lose)")


def score_completions(
    judge: ScalarJudge, completions: Sequence[Completion], prompts: dict[int, Prompt], batch_size: int,
    progress: bool = True,
) -> list[CompletionScore]:
    """A scalar judge's score of each completion (for best-vs-worst pairing)."""
    scores: list[CompletionScore] = []
    with tqdm(total=len(completions), desc=f"scoring with {judge.name}", unit="completion",
              disable=not progress or not completions, leave=False) as bar:
        for start in range(0, len(completions), batch_size):
            batch = completions[start : start + batch_size]
            values = score_batch(judge, [(prompts[c.prompt_id].text, c.text) for c in batch],
                                 [prompts[c.prompt_id].messages for c in batch])
            scores.extend(CompletionScore(c.completion_id, judge.name, judge.version, v) for c, v in zip(batch, values))
            bar.update(len(batch))
    return scores
