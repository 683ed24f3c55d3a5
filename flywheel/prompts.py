"""Prompt sources: JSONL, CSV or Parquet files with a `prompt` column."""

from __future__ import annotations

from pathlib import Path

from flywheel.errors import UserError

PROMPT_COLUMN = "prompt"


def load_prompts(path: Path, column: str = PROMPT_COLUMN) -> list[str]:
    """The non-empty prompts of a file, in file order, or a one-line UserError."""
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
    prompts = [p for p in table.column(column).to_pylist() if isinstance(p, str) and p.strip()]
    if not prompts:
        raise UserError(f"prompts file {path} has no non-empty prompts in column {column!r}")
    return prompts
