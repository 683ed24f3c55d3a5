"""Work on a flywheel database's labels outside a round, as the `flywheel judge` and
`flywheel label` commands do it: relabel a round with another judge and compare it with
the other labellers, queue an AI-judged round for people, and export or import people's
labels as JSONL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from flywheel.errors import UserError
from flywheel.labelling import LabellingResult, label_pairs
from storage import queue, tables
from storage.store import Store, Transaction

# What `agreement_with` shows of the judge_agreement view, rates rounded.
AGREEMENT_SQL = (
    "SELECT judge_a, judge_b, pairs, agreements, round(agreement_rate, 3) AS agreement_rate, "
    "decisive_pairs, round(decisive_agreement_rate, 3) AS decisive_agreement_rate "
    "FROM judge_agreement WHERE judge_a = ? OR judge_b = ?"
)


@dataclass(frozen=True)
class Relabelling:
    round_id: int
    labeller: str  # the judge's `name@version`, as judge_agreement names it
    result: LabellingResult
    agreement: tuple[list[str], list[tuple]]  # its rows of judge_agreement, over all rounds


def require_pairs(tx: Transaction, round_id: int) -> None:
    if tables.count(tx, "pairs", "round_id = ?", [round_id]) == 0:
        raise UserError(f"round {round_id} has no pairs (it has not finished pairing, or does not exist)")


def _round_to_relabel(tx: Transaction, round_id: int | None, database: Path) -> int:
    if round_id is None:
        round_id = tables.latest_round_with_pairs(tx)
        if round_id is None:
            raise UserError(f"{database} has no pairs to judge yet")
    require_pairs(tx, round_id)
    return round_id


def relabel_round(store: Store, spec: str, options: Mapping[str, Any], round_id: int | None = None,
                  batch_size: int = 256) -> Relabelling:
    """Label a round's pairs (default: the latest round with pairs) with the judge `spec`,
    beside the labels already there: pairs this judge (name and version) judged before are
    skipped, and the round's training is unaffected. People label through the queue instead
    (`enqueue_for_people`)."""
    from judges import close_judge, load_judge
    from judges.loading import HUMAN

    round_id = store.read(_round_to_relabel, round_id, store.path)
    if spec == HUMAN:
        raise UserError("people label through the queue: `flywheel label enqueue --round N`, then `flywheel label serve`")
    judge = load_judge(spec, options)
    try:
        result = label_pairs(store, judge, round_id, batch_size)
    finally:
        close_judge(judge)
    labeller = f"{judge.name}@{judge.version}"
    return Relabelling(round_id, labeller, result, agreement_with(store, labeller))


def agreement_with(store: Store, labeller: str) -> tuple[list[str], list[tuple]]:
    """How often `labeller` (`name@version`, or `human@1 (alice)`) agrees with each other
    labeller of the same pairs, over all rounds."""
    return store.query(AGREEMENT_SQL, [labeller, labeller])


def enqueue_for_people(store: Store, round_id: int, labels_per_pair: int = 1,
                       lease_minutes: float = 10.0) -> queue.Progress:
    """Queue every pair of a round an AI judge has labelled for people, to compare with
    that judge in judge_agreement; the round's training is unaffected. Returns the
    round's queue progress."""
    from judges.human import HUMAN_JUDGE_NAME, MAX_LEASE_MINUTES

    if not 0 < lease_minutes <= MAX_LEASE_MINUTES:
        raise UserError(f"the lease must be more than 0 and at most {MAX_LEASE_MINUTES} minutes (a week), "
                        f"got {lease_minutes}")
    if labels_per_pair < 1:
        raise UserError(f"labels per pair must be at least 1, got {labels_per_pair}")
    with store.transaction() as tx:
        require_pairs(tx, round_id)
        # Only a round an AI judge has started labelling: a round with no judge yet, queued
        # here, would later be mistaken for a human round's own queue.
        judge_name = tables.get_round(tx, round_id).judge_name
        if judge_name is None or judge_name == HUMAN_JUDGE_NAME:
            raise UserError(f"round {round_id} " + ("is labelled by people already" if judge_name else
                            "has no judge yet: enqueue it for comparison once its judge has labelled it"))
        queue.request_labels(tx, round_id, judge_version="1", labels_per_pair=labels_per_pair,
                             lease_seconds=lease_minutes * 60, now=queue.utc_now())
        return queue.progress(tx, round_id)


def export_rows(store: Store, round_id: int | None = None, labels: bool = False) -> list[dict]:
    """The queued pairs that still need labels (with their texts), or with `labels` people's
    labels, in the JSONL format `import_labels_file` reads; one round's or all."""
    return store.read(queue.people_labels if labels else queue.pending_pairs, round_id)


# How many bad lines an import refusal lists (all are counted).
BAD_LINES_SHOWN = 20


def read_label_lines(path: Path, default_annotator: str | None = None) -> list[tuple[int, Any]]:
    """People's labels from a JSONL file, with their line numbers: one object a line with
    "pair_id", "winner", "annotator" (or `default_annotator`) and optionally "rationale";
    other keys (the texts an export wrote) are ignored. Any bad line refuses the file,
    and every bad line is named."""
    from judges.human import HumanLabel

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from error
    labels, bad = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("each line must be a JSON object")
            if "pair_id" not in row or "winner" not in row or ("annotator" not in row and not default_annotator):
                raise ValueError("needs a pair_id, a winner and an annotator (or --annotator)")
            labels.append((number, HumanLabel(row["pair_id"], row["winner"], row.get("annotator", default_annotator),
                                              row.get("rationale"))))
        except (ValueError, queue.QueueError) as error:
            bad.append((number, str(error)))
    _refuse_bad_lines(path, bad)
    return labels


def _refuse_bad_lines(path: Path, bad: list[tuple[int, str]]) -> None:
    if not bad:
        return
    bad.sort()
    listed = "; ".join(f"line {number}: {problem}" for number, problem in bad[:BAD_LINES_SHOWN])
    more = f"; and {len(bad) - BAD_LINES_SHOWN} more" if len(bad) > BAD_LINES_SHOWN else ""
    raise UserError(f"{path}: {len(bad)} bad line{'s' if len(bad) > 1 else ''}, nothing imported: {listed}{more}")


def import_labels_file(store: Store, path: Path, default_annotator: str | None = None,
                       add_annotators: bool = False) -> tuple[int, int]:
    """Add the people's labels of a JSONL file (`read_label_lines`) in one transaction;
    returns (added, already there). A label by someone who is not an annotator refuses
    the file unless `add_annotators` (they are then added, with no page token: they label
    elsewhere), and so does one for a pair that does not exist; every such line is named."""
    import secrets

    from judges.human import HUMAN_JUDGE_NAME, token_sha256

    numbered = read_label_lines(path, default_annotator)
    labels = [label for _, label in numbered]
    try:
        with store.transaction() as tx:
            missing_pairs = set(queue.unknown_pairs(tx, [label.pair_id for label in labels]))
            known = queue.annotator_names(tx)
            strangers = sorted({label.annotator for label in labels} - known)
            bad = [(number, f"no pair with id {label.pair_id}") for number, label in numbered
                   if label.pair_id in missing_pairs]
            if not add_annotators:
                bad += [(number, f"{label.annotator!r} is not an annotator (add them with `flywheel annotators "
                         "add`, or import with --add-annotators)") for number, label in numbered
                        if label.annotator not in known]
            _refuse_bad_lines(path, bad)
            for name in strangers:
                queue.add_annotator(tx, name, token_sha256(secrets.token_urlsafe(24)))
            return queue.import_labels(tx, labels, queue.utc_now(), judge_name=HUMAN_JUDGE_NAME)
    except queue.QueueError as error:
        raise UserError(f"{path}: {error}; nothing imported") from error
