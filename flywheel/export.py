"""Preference data out of a flywheel database, in TRL's preference format.

One row per label: the pair's prompt, the chosen and the rejected completion, and who
labelled it. By default the labels each round trained on (its own judge's, as
`storage.tables` selects them for training); or every label of one judge, or people's.
Plain-text prompts give TRL's standard format (strings); prompts that came in as messages
give its conversational format (a message list and one assistant message each), which
TRL renders with the policy's chat template. Written as Parquet or JSONL, which
`datasets.load_dataset` reads and TRL's `DPOTrainer` takes as it is.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from flywheel.errors import UserError
from judges.human import HUMAN_JUDGE_NAME
from storage import tables
from storage.records import LabelWithTexts
from storage.store import Store, Transaction

if TYPE_CHECKING:
    import datasets

EXPORT_FORMATS = ("parquet", "jsonl")


@dataclass(frozen=True)
class ExportSummary:
    rows: int
    format: str
    conversational: bool
    path: Path


def parse_round_ids(text: str) -> tuple[int, ...]:
    """Round ids from a list such as `1,2,5-7` (sorted, without repeats)."""
    ids: set[int] = set()
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if match is None:
            raise UserError(f"rounds must be ids and ranges such as 1,2,5-7, got {text!r}")
        first, last = int(match[1]), int(match[2] or match[1])
        if first > last:
            raise UserError(f"round range {item.strip()} runs backwards: write {last}-{first}")
        ids.update(range(first, last + 1))
    return tuple(sorted(ids))


def _select_labels(tx: Transaction, rounds: Sequence[int] | None, judge: str | None, people_only: bool,
                   include_all: bool) -> list[LabelWithTexts]:
    if judge is not None and people_only:
        raise UserError("give a judge or people only, not both (people's labels are the judge "
                        f"{HUMAN_JUDGE_NAME!r})")
    if rounds is not None:
        unknown = sorted(set(rounds) - tables.round_ids_among(tx, rounds))
        if unknown:
            raise UserError(f"no round with id {', '.join(map(str, unknown))} in this database")
    judge_name = HUMAN_JUDGE_NAME if people_only else judge
    if judge is not None and judge not in (names := tables.judge_names(tx)):
        raise UserError(f"no labels by a judge named {judge!r}; judges with labels: {', '.join(names) or 'none'}")
    rows = tables.labels_with_texts(tx, rounds, judge_name, with_ties=include_all)
    if rows:
        return rows
    where = "" if rounds is None else f" in round(s) {', '.join(map(str, rounds))}"
    undecided = len(tables.labels_with_texts(tx, rounds, judge_name, with_ties=True))
    if undecided:
        raise UserError(f"nothing to export: the {undecided} selected label(s){where} are all ties or both_bad "
                        "(--all keeps them)")
    labeller = "people" if people_only else "the rounds' own judges" if judge is None else f"judge {judge!r}"
    raise UserError(f"nothing to export: no labels by {labeller}{where}")


def conversation(row: LabelWithTexts) -> list[dict[str, str]]:
    """The prompt as messages; a plain-text prompt becomes one user turn."""
    return row.messages if row.messages is not None else [{"role": "user", "content": row.prompt}]


def preference_record(row: LabelWithTexts, conversational: bool, include_all: bool) -> dict[str, Any]:
    """One dataset row: winner a or b decides which completion is chosen; a tie or
    both_bad (kept only with `include_all`) keeps a as chosen and says so in `winner`."""
    chosen, rejected = ((row.completion_b, row.completion_a) if row.winner == "b"
                        else (row.completion_a, row.completion_b))
    if conversational:
        prompt: Any = conversation(row)
        chosen, rejected = ([{"role": "assistant", "content": text}] for text in (chosen, rejected))
    else:
        prompt = row.prompt
    record = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "round_id": row.round_id,
              "pair_id": row.pair_id, "judge": row.judge, "annotator": row.annotator,
              "confidence": row.confidence, "annotator_gold_accuracy": row.annotator_gold_accuracy}
    return {**record, "winner": row.winner} if include_all else record


def _features(conversational: bool, include_all: bool) -> "datasets.Features":
    # Declared, not inferred: a column that is NULL in every row (annotator, confidence)
    # keeps its type, so files from different selections load alike.
    from datasets import Features, List, Value

    text = Value("string")
    turns = List({"role": text, "content": text})
    features = {"prompt": turns if conversational else text, "chosen": turns if conversational else text,
                "rejected": turns if conversational else text, "round_id": Value("int64"),
                "pair_id": Value("int64"), "judge": text, "annotator": text, "confidence": Value("float64"),
                "annotator_gold_accuracy": Value("float64")}
    return Features({**features, "winner": text} if include_all else features)


def preferences_dataset(db: Path, *, rounds: Sequence[int] | None = None, judge: str | None = None,
                        people_only: bool = False, include_all: bool = False) -> "datasets.Dataset":
    """The preference rows of a flywheel database as a `datasets.Dataset`, one per label.

    Labels: by default those each round trained on (its own judge's); `judge` takes every
    label of the judge with that name (any version), `people_only` people's labels.
    `rounds` keeps those round ids. Ties and both_bad are left out unless `include_all`,
    which keeps them (a as chosen) and adds a `winner` column. The format is TRL's
    conversational one as soon as one selected prompt came in as messages, else its
    standard one (strings). Bad input raises a one-line UserError (StoreError for a file
    that is not a flywheel database).
    """
    from datasets import Dataset

    rows = Store.open(db).read(_select_labels, rounds, judge, people_only, include_all)
    conversational = any(row.messages is not None for row in rows)
    return Dataset.from_list([preference_record(row, conversational, include_all) for row in rows],
                             features=_features(conversational, include_all))


def export_format(out: Path, format: str | None) -> str:
    """The format given, else the one the file's suffix names."""
    if format is not None:
        if format not in EXPORT_FORMATS:
            raise UserError(f"unsupported format {format!r}: use {' or '.join(EXPORT_FORMATS)}")
        return format
    suffix = Path(out).suffix.lstrip(".").lower()
    if suffix not in EXPORT_FORMATS:
        raise UserError(f"cannot tell the format of {out}: give a path ending .parquet or .jsonl, "
                        f"or a format ({' or '.join(EXPORT_FORMATS)})")
    return suffix


def write_preferences(db: Path, out: Path, format: str | None = None, *, rounds: Sequence[int] | None = None,
                      judge: str | None = None, people_only: bool = False,
                      include_all: bool = False) -> ExportSummary:
    """Write `preferences_dataset(db, ...)` to `out` as Parquet or JSONL (`format`, else
    `out`'s suffix). The file appears whole or not at all: it is written under a
    temporary name in the same directory and renamed."""
    from datasets import Value

    out = Path(out)
    chosen_format = export_format(out, format)
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: directory {out.parent} does not exist")
    if out.is_dir():
        raise UserError(f"cannot write {out}: it is a directory")
    dataset = preferences_dataset(db, rounds=rounds, judge=judge, people_only=people_only, include_all=include_all)
    handle, scratch = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(handle)
    try:
        if chosen_format == "parquet":
            dataset.to_parquet(scratch)
        else:
            dataset.to_json(scratch, lines=True, force_ascii=False)
        os.replace(scratch, out)
    finally:
        Path(scratch).unlink(missing_ok=True)
    conversational = not isinstance(dataset.features["prompt"], Value)  # a message list, not a string
    return ExportSummary(len(dataset), chosen_format, conversational, out)
