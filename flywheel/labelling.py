"""Labelling a round's pairs with a judge, batch by batch, and scoring completions.

Each batch of verdicts lands in one transaction, so a crash or a failing judge loses at
most the batch in flight, and a rerun judges only the pairs this judge has not judged.
Used both by a round's label step and by `flywheel judge` (relabelling after the fact).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tqdm import tqdm

from judges import Judge, NoVerdict, PairToJudge, ScalarJudge, judge_batch, score_batch
from storage.records import Completion, CompletionScore, JudgeFailure, Label
from storage.store import Store
from storage import tables


@dataclass(frozen=True)
class LabellingResult:
    labelled: int  # labels stored by this call
    failed: int  # pairs the judge could not decide (recorded in judge_failures)
    already_done: int  # pairs this judge had judged before the call


def label_pairs(store: Store, judge: Judge, round_id: int, batch_size: int, progress: bool = True) -> LabellingResult:
    """Judge every pair of the round that this judge (name and version) has not judged yet."""
    with store.transaction() as tx:
        todo = tables.pairs_to_judge(tx, round_id, judge.name, judge.version)
        already_done = tables.count(tx, "pairs", "round_id = ?", [round_id]) - len(todo)
    labelled = failed = 0
    with tqdm(total=len(todo), desc=f"labelling round {round_id} ({judge.name})", unit="pair",
              disable=not progress or not todo, leave=False) as bar:
        for start in range(0, len(todo), batch_size):
            rows = todo[start : start + batch_size]
            verdicts = judge_batch(judge, [PairToJudge(*row) for row in rows])
            labels, failures = [], []
            for row, verdict in zip(rows, verdicts):
                if isinstance(verdict, NoVerdict):
                    failures.append(JudgeFailure(row[0], judge.name, judge.version, verdict.reason, verdict.raw_output))
                else:
                    labels.append(Label(pair_id=row[0], winner=verdict.winner, judge_name=judge.name,
                                        judge_version=judge.version, confidence=verdict.confidence,
                                        rationale=verdict.rationale))
            with store.transaction() as tx:
                tables.add_labels(tx, labels)
                tables.add_judge_failures(tx, failures)
            labelled += len(labels)
            failed += len(failures)
            bar.update(len(rows))
    return LabellingResult(labelled, failed, already_done)


def score_completions(
    judge: ScalarJudge, completions: Sequence[Completion], prompt_texts: dict[int, str], batch_size: int,
    progress: bool = True,
) -> list[CompletionScore]:
    """A scalar judge's score of each completion (for best-vs-worst pairing)."""
    scores: list[CompletionScore] = []
    with tqdm(total=len(completions), desc=f"scoring with {judge.name}", unit="completion",
              disable=not progress or not completions, leave=False) as bar:
        for start in range(0, len(completions), batch_size):
            batch = completions[start : start + batch_size]
            values = score_batch(judge, [(prompt_texts[c.prompt_id], c.text) for c in batch])
            scores.extend(CompletionScore(c.completion_id, judge.name, judge.version, v) for c, v in zip(batch, values))
            bar.update(len(batch))
    return scores
