"""People as the judge: a round's pairs wait in the labelling queue until enough are labelled.

Choosing `human` as a round's judge queues its pairs (`storage.queue`) and leaves the
round in state `labelling`. Each later run of the flow asks `ready_to_train`; once the
quota of fully labelled pairs or the deadline is met, the round trains on what people
labelled. People label through `flywheel label serve` (`judges.labelling_app`) or bring
labels from another tool with `flywheel label import`.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import ClassVar, Literal

from judges.base import JudgeSpecError
from storage.queue import (
    BIGINT_MAX,
    CHOICES,
    LabelRequest,
    Progress,
    QueueError,
    add_annotator,
    add_gold_answers,
    deadline_after,
    label_request,
    request_labels,
)
from storage.records import WINNERS
from storage.store import Store, Transaction
from storage import tables

# The judge name of every person's label (the annotator column says who).
HUMAN_JUDGE_NAME = "human"
Choice = Literal[CHOICES]  # the labelling page's answer, as its request body types it
ANNOTATOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


def check_annotator_name(name: str) -> None:
    if not isinstance(name, str) or not ANNOTATOR_NAME.fullmatch(name):
        raise QueueError(
            f"annotator name {name!r} must be 1-64 letters, digits or _.@- and start with a letter or digit", 400)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_annotator(store: Store, name: str) -> str:
    """Add an annotator; returns their token for the labelling page (only its hash is stored)."""
    check_annotator_name(name)
    token = secrets.token_urlsafe(24)
    with store.transaction() as tx:
        add_annotator(tx, name, token_sha256(token))
    return token


@dataclass(frozen=True)
class HumanLabel:
    """A person's label, in the JSONL format of `flywheel label export --labels` and `import`."""

    pair_id: int
    winner: str
    annotator: str
    rationale: str | None = None

    def __post_init__(self) -> None:
        if type(self.pair_id) is not int or not 1 <= self.pair_id <= BIGINT_MAX:
            raise QueueError(f"pair_id must be a positive integer id, got {self.pair_id!r}", 422)
        if self.winner not in WINNERS:
            raise QueueError(f"winner must be one of {WINNERS}, got {self.winner!r}", 422)
        if not isinstance(self.annotator, str) or not ANNOTATOR_NAME.fullmatch(self.annotator):
            raise QueueError(f"annotator must be a name of letters, digits or _.@-, got {self.annotator!r}", 422)
        if self.rationale is not None and not isinstance(self.rationale, str):
            raise QueueError(f"rationale must be text, got {self.rationale!r}", 422)





MAX_LEASE_MINUTES = 7 * 24 * 60
MAX_DEADLINE_HOURS = 365 * 24
MAX_GUIDELINES_BYTES = 64 * 1024


@dataclass(frozen=True)
class HumanJudge:
    """How people label a round: `labels_per_pair` labels from different people per pair;
    the round goes on when `quota_pairs` pairs (or, if 0, `quota_fraction` of them) have
    all their labels, or `deadline_hours` after queueing (0: no deadline). A lease lasts
    `lease_minutes`, after which the pair goes back to the queue.

    Quality: `guidelines_file`, a markdown file stored with the request and shown on the
    labelling page. `gold_judge` (a `rule:` spec) settles pairs when the round is queued;
    `gold_rate` of the round's pairs, drawn among those it settled (a or b), become gold
    pairs, unmarked on the page, and each person's answers on them are their gold
    accuracy. With `min_gold_accuracy` above 0, the labels of people below it are kept
    but not trained on (fixed when the round stops waiting)."""

    name: ClassVar[str] = HUMAN_JUDGE_NAME
    version: str = "1"
    labels_per_pair: int = 1
    quota_fraction: float = 1.0
    quota_pairs: int = 0
    deadline_hours: float = 0.0
    lease_minutes: float = 10.0
    guidelines_file: str = ""
    gold_judge: str = ""
    gold_rate: float = 0.1
    min_gold_accuracy: float = 0.0
    guidelines: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        problems = []
        for name in ("quota_fraction", "deadline_hours", "lease_minutes"):
            if not math.isfinite(getattr(self, name)):
                problems.append(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.labels_per_pair < 1:
            problems.append(f"labels_per_pair must be >= 1, got {self.labels_per_pair}")
        if not 0 < self.quota_fraction <= 1:
            problems.append(f"quota_fraction must be in (0, 1], got {self.quota_fraction}")
        if self.quota_pairs < 0:
            problems.append(f"quota_pairs must be >= 0, got {self.quota_pairs}")
        if self.deadline_hours < 0:
            problems.append(f"deadline_hours must be >= 0 (0: none), got {self.deadline_hours}")
        if not 0 < self.lease_minutes <= MAX_LEASE_MINUTES:
            problems.append(f"lease_minutes must be > 0 and at most {MAX_LEASE_MINUTES} (a week), "
                            f"got {self.lease_minutes}")
        if self.deadline_hours > MAX_DEADLINE_HOURS:
            problems.append(f"deadline_hours must be at most {MAX_DEADLINE_HOURS} (a year), got {self.deadline_hours}")
        if not self.version:
            problems.append("version must not be empty")
        if not 0 < self.gold_rate <= 1:
            problems.append(f"gold_rate must be in (0, 1], got {self.gold_rate}")
        if not 0 <= self.min_gold_accuracy <= 1:
            problems.append(f"min_gold_accuracy must be in [0, 1] (0: off), got {self.min_gold_accuracy}")
        if self.gold_judge and not self.gold_judge.startswith("rule:"):
            problems.append(f"gold_judge must be a rule judge (rule:module:function), got {self.gold_judge!r}")
        if self.min_gold_accuracy > 0 and not self.gold_judge:
            problems.append("min_gold_accuracy needs gold pairs: give gold_judge too")
        if self.gold_judge.startswith("rule:"):
            from judges.loading import load_judge

            try:
                load_judge(self.gold_judge)
            except JudgeSpecError as error:
                problems.append(f"gold_judge: {error}")
        if self.guidelines_file:
            object.__setattr__(self, "guidelines", self._read_guidelines(problems))
        if problems:
            raise JudgeSpecError("human judge: " + "; ".join(problems))

    def _read_guidelines(self, problems: list[str]) -> str | None:
        path = Path(self.guidelines_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            problems.append(f"guidelines_file {path}: {getattr(error, 'strerror', None) or error}")
            return None
        if len(text.encode()) > MAX_GUIDELINES_BYTES:
            problems.append(f"guidelines_file {path} is over {MAX_GUIDELINES_BYTES // 1024} KB")
        return text

    def queue_round(self, tx: Transaction, round_id: int, now: datetime) -> LabelRequest:
        """Queue the round's pairs for people (once; later calls return the request)."""
        existing = label_request(tx, round_id)
        if existing is not None:
            return existing
        pairs = tables.count(tx, "pairs", "round_id = ?", [round_id])
        quota = self.quota_pairs or math.ceil(self.quota_fraction * pairs)
        if self.gold_judge:
            self._settle_gold(tx, round_id, pairs)
        return request_labels(
            tx, round_id, judge_version=self.version, labels_per_pair=self.labels_per_pair,
            lease_seconds=self.lease_minutes * 60, now=now, quota_pairs=min(quota, pairs),
            deadline=deadline_after(now, self.deadline_hours), guidelines=self.guidelines,
            gold_rate=self.gold_rate if self.gold_judge else 0.0,
            min_gold_accuracy=self.min_gold_accuracy or None,
        )

    def _settle_gold(self, tx: Transaction, round_id: int, pairs: int) -> None:
        """Gold answers for `gold_rate` of the round's pairs, drawn (seeded by the round)
        among those the gold judge settles with a winner."""
        from judges.base import PairToJudge
        from judges.loading import load_judge

        judge = load_judge(self.gold_judge)
        rows = tx.execute("SELECT pair_id, prompt, completion_a, completion_b FROM pair_texts "
                          "WHERE round_id = ? ORDER BY pair_id", [round_id]).fetchall()
        verdicts = judge.judge([PairToJudge(*row) for row in rows])
        settled = [(row[0], verdict.winner) for row, verdict in zip(rows, verdicts)
                   if getattr(verdict, "winner", None) in ("a", "b")]
        chosen = random.Random(round_id).sample(settled, min(len(settled), round(self.gold_rate * pairs)))
        add_gold_answers(tx, dict(chosen), source=f"{judge.name}@{judge.version}")


def ready_to_train(request: LabelRequest, progress: Progress, now: datetime) -> str | None:
    """Why the round may go on ('quota' or 'deadline'), or None while it waits."""
    if request.closed_because is not None:
        return request.closed_because
    if progress.pairs_done >= (request.quota_pairs or 0):
        return "quota"
    if request.deadline is not None and now >= request.deadline:
        return "deadline"
    return None


def people_warnings(request: LabelRequest, progress: Progress) -> list[str]:
    """What a run should say about a round's people: too few of them for the labels each
    pair needs, pairs nobody left can label, people whose labels are not trained on."""
    warnings = []
    if 0 < progress.active_annotators < request.labels_per_pair:
        warnings.append(f"{request.labels_per_pair} labels per pair are asked of {progress.active_annotators} "
                        "active annotator(s): a pair counts as done once all of them have labelled or skipped it")
    if progress.pairs_exhausted:
        warnings.append(f"{progress.pairs_exhausted} pair(s) were labelled or skipped by every active annotator "
                        "short of their labels; they count as done with what they have")
    if progress.left_out:
        warnings.append(f"labels of {', '.join(progress.left_out)} are kept but not trained on: gold accuracy "
                        f"below {request.min_gold_accuracy}")
    return warnings


def waiting_message(request: LabelRequest, progress: Progress) -> str:
    deadline = f", deadline {request.deadline:%Y-%m-%d %H:%M} UTC" if request.deadline else ""
    return (f"{progress.pairs_done} of {progress.pairs} pairs fully labelled "
            f"(quota {request.quota_pairs}{deadline})")
