"""Query results (columns and rows) as text: a terminal table, CSV, JSON or Markdown.

None of them shortens a value. The table folds a value too long for the width it is given
onto more lines; CSV and JSON carry every value whole, for scripts and notebooks.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Sequence
from uuid import UUID

FORMATS = ("table", "csv", "json", "markdown")


def format_rows(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str = "table",
                title: str | None = None, width: int | None = None) -> str:
    """`rows` under `columns` in format `fmt` (one of FORMATS), ending in a newline. `title`
    heads a table; `width` is the table's width in characters (default: as wide as its
    longest values, so nothing folds)."""
    if fmt == "table":
        return text_table(columns, rows, title, width)
    if fmt == "csv":
        return csv_text(columns, rows)
    if fmt == "json":
        return json_text(columns, rows)
    if fmt == "markdown":
        return markdown_text(columns, rows)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def cell_text(value: Any) -> str:
    """A value as a table or CSV cell: empty for NULL, ISO 8601 for times, JSON for lists
    and structs, text as it is."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(jsonable(value), ensure_ascii=False)
    return str(jsonable(value))


def jsonable(value: Any) -> Any:
    """A DuckDB value as JSON holds it: times as ISO 8601 strings, lists as arrays, structs
    and maps as objects, decimals as numbers, NaN and infinities as null, bytes as base64."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return jsonable(float(value)) if value != value.to_integral_value() else int(value)
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, UUID):
        return str(value)
    return str(value)


def json_text(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An array of objects, one per row, keyed by column name."""
    records = [{column: jsonable(value) for column, value in zip(columns, row)} for row in rows]
    return json.dumps(records, ensure_ascii=False, indent=1) + "\n"


def csv_text(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A header row, then one row per row (RFC 4180 quoting)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([cell_text(value) for value in row])
    return out.getvalue()


def markdown_text(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A pipe table; `|` is escaped and line breaks become `<br>`."""
    def cell(value: Any) -> str:
        return cell_text(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def text_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None,
               width: int | None = None) -> str:
    """A boxed table (rich). Values are never cut: a value wider than its column folds
    onto more lines. Without `width` the table is as wide as its longest values."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    cells = [[cell_text(value) for value in row] for row in rows]
    if width is None:
        longest = [max([len(column), *(max(map(len, (row[i] or " ").splitlines() or [""])) for row in cells)])
                   for i, column in enumerate(columns)]
        width = max(40, sum(longest) + 3 * len(columns) + 1, len(title or ""))
    table = Table(title=title)
    for column in columns:
        table.add_column(Text(column), overflow="fold")
    for row in cells:
        table.add_row(*(Text(value) for value in row))
    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False, soft_wrap=False)
    console.print(table)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()) + "\n"
