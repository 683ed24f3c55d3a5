"""Prompt sources: JSONL, CSV or Parquet files with a `prompt` column."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flywheel.errors import UserError

PROMPT_COLUMN = "prompt"


def load_prompts(path: Path, column: str = PROMPT_COLUMN) -> list[str]:
    """The non-empty prompts of a file, in file order, or a one-line UserError."""
    return [text for _, text in read_prompts(path, column).rows]


@dataclass(frozen=True)
class PromptFile:
    rows: list[tuple[int, str]]  # (1-based row number, text) of each non-empty prompt
    empty_rows: list[int]  # row numbers of empty or blank prompts, to record as skipped


def read_prompts(path: Path, column: str = PROMPT_COLUMN) -> PromptFile:
    """A prompts file's non-empty prompts with their row numbers, and its empty rows."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file {path} does not exist")
    readers = {".jsonl": pyarrow.json.read_json, ".json": pyarrow.json.read_json,
               ".csv": pyarrow.csv.read_csv, ".parquet": pyarrow.parquet.read_table}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"prompts file {path}: unsupported type {path.suffix!r} (use {', '.join(readers)})")
    if path.stat().st_size == 0:
        raise UserError(f"prompts file {path} is empty")
    try:
        table = reader(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise UserError(f"prompts file {path} could not be read: {str(error).splitlines()[0]}") from error
    if column not in table.column_names:
        raise UserError(f"prompts file {path} has no {column!r} column (columns: {table.column_names})")
    rows, empty_rows = [], []
    for number, text in enumerate(table.column(column).to_pylist(), start=1):
        if isinstance(text, str) and text.strip():
            rows.append((number, text))
        else:
            empty_rows.append(number)
    if not rows:
        raise UserError(f"prompts file {path} has no non-empty prompts in column {column!r}")
    return PromptFile(rows, empty_rows)


def usable_prompts(prompt_file: PromptFile, count_tokens, max_prompt_tokens: int
                   ) -> tuple[list[str], list[tuple[int, str, int | None]]]:
    """Split a file's prompts into those the sampler can take and those it cannot:
    (texts, [(row number, reason, token count)]) for `store.add_skipped_prompts`.
    `count_tokens(text)` counts a prompt's tokens as the sampler will (special tokens too)."""
    texts: list[str] = []
    skipped: list[tuple[int, str, int | None]] = [(row, "empty", None) for row in prompt_file.empty_rows]
    for row, text in prompt_file.rows:
        tokens = count_tokens(text)
        if tokens > max_prompt_tokens:
            skipped.append((row, f"longer than the context ({tokens} > {max_prompt_tokens} tokens)", tokens))
        else:
            texts.append(text)
    return texts, sorted(skipped)
