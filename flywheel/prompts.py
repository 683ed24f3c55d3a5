"""Prompt sources and rendering: files or `datasets` sources of strings or conversations,
turned into the token ids the sampler hands vLLM."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from flywheel.config import PromptSource
from flywheel.errors import UserError

ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class PromptRow:
    row: int  # 1-based row number in its source
    text: str  # the prompt, or a conversation's turns as plain text (`conversation_text`)
    messages: Messages | None  # the conversation; None for a plain-text prompt


@dataclass(frozen=True)
class PromptRows:
    rows: list[PromptRow]  # the non-empty prompts, in source order
    empty_rows: list[int]  # row numbers of empty or blank prompts, to record as skipped


def load_prompts(source: PromptSource | Path) -> list[str]:
    """The non-empty prompts' texts, in source order, or a one-line UserError."""
    return [row.text for row in read_prompts(source).rows]


def read_prompts(source: PromptSource | Path) -> PromptRows:
    """A source's non-empty prompts with their row numbers, and its empty rows; a bad row
    is a one-line UserError naming the source and the row."""
    source = source if isinstance(source, PromptSource) else PromptSource(path=source)
    values = _read_file(source) if source.path is not None else _read_dataset(source)
    rows, empty_rows = [], []
    for number, value in enumerate(values, start=1):
        prompt = parse_prompt(value, f"{source}: row {number}")
        if prompt is None:
            empty_rows.append(number)
        else:
            text, messages = prompt
            rows.append(PromptRow(number, text, messages))
    if not rows:
        raise UserError(f"prompts {source} has no non-empty prompts in column {source.column!r}")
    return PromptRows(rows, empty_rows)


def parse_prompt(value: Any, where: str) -> tuple[str, Messages | None] | None:
    """(text, messages) of one prompt value, None for an empty one; `where` names the row
    in the UserError for a value that is neither a string nor a conversation ending on a
    user turn."""
    if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value):
        return None
    if isinstance(value, str):
        return value, None
    if not isinstance(value, list):
        raise UserError(f"{where}: a prompt is a string or a list of messages, got {type(value).__name__}")
    messages = []
    for index, message in enumerate(value, start=1):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise UserError(f"{where}: message {index} is not a {{role, content}} mapping of strings")
        if message["role"] not in ROLES:
            raise UserError(f"{where}: message {index} has role {message['role']!r}; roles are {', '.join(ROLES)}")
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[-1]["role"] != "user":
        raise UserError(f"{where}: the conversation ends on {'an' if messages[-1]['role'] == 'assistant' else 'a'} "
                        f"{messages[-1]['role']} turn; a prompt ends on a user turn")
    return conversation_text(messages), messages


def conversation_text(messages: Messages) -> str:
    """A conversation as the text that text judges, rule scores and SQL see: one user turn
    is its content (after the system prompt, if any); longer ones are `role: content` turns."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1:
        return "\n\n".join([*system, turns[0]["content"]])
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _read_file(source: PromptSource) -> list:
    """The prompt column of a .jsonl, .json, .csv or .parquet file."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    path = source.path
    if not path.is_file():
        raise UserError(f"prompts file {path} does not exist")
    kinds = (".jsonl", ".json", ".csv", ".parquet")
    if path.suffix.lower() not in kinds:
        raise UserError(f"prompts file {path}: unsupported type {path.suffix!r} (use {', '.join(kinds)}, "
                        "or prompts: {dataset: ...} for any source `datasets` loads)")
    if path.stat().st_size == 0:
        raise UserError(f"prompts file {path} is empty")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = _read_json_rows(path)
        columns = list(dict.fromkeys(key for row in rows for key in row))
        values = [row.get(source.column) for row in rows] if source.column in columns else None
    else:
        reader = pyarrow.csv.read_csv if path.suffix.lower() == ".csv" else pyarrow.parquet.read_table
        try:
            table = reader(path)
        except (pa.ArrowInvalid, OSError) as error:
            raise UserError(f"prompts file {path} could not be read: {str(error).splitlines()[0]}") from error
        columns = table.column_names
        values = table.column(source.column).to_pylist() if source.column in columns else None
    if values is None:
        raise UserError(f"prompts file {path} has no {source.column!r} column (columns: {columns})")
    return values


def _read_json_rows(path: Path) -> list[dict]:
    """JSON lines (or one JSON array) of objects. Read in Python, not by Arrow, whose
    reader refuses a column that mixes strings and conversations."""
    import orjson

    text = path.read_bytes()
    try:
        if text.lstrip().startswith(b"["):
            rows = orjson.loads(text)
        else:
            rows = [orjson.loads(line) for line in text.splitlines() if line.strip()]
    except orjson.JSONDecodeError as error:
        raise UserError(f"prompts file {path} could not be read: not JSON lines ({error})") from error
    bad = next((number for number, row in enumerate(rows, start=1) if not isinstance(row, dict)), None)
    if bad is not None:
        raise UserError(f"prompts file {path}: row {bad} is not a JSON object")
    return rows


def _read_dataset(source: PromptSource) -> list:
    """The prompt column of a `datasets` source: a `save_to_disk` directory through
    `load_from_disk`, anything else through `load_dataset(dataset, data_files=, split=)`."""
    import datasets

    location = Path(source.dataset)
    # datasets logs the error it then raises (the UserError below says it in one line), and
    # draws bars for reading a prompt list, which takes a moment.
    verbosity, bars_were_off = datasets.logging.get_verbosity(), datasets.are_progress_bars_disabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        if location.is_dir() and any((location / name).is_file() for name in ("dataset_info.json", "state.json",
                                                                              "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(location))
            if isinstance(loaded, datasets.DatasetDict):
                if source.split not in loaded:
                    raise UserError(f"prompts {source}: no split {source.split!r} (splits: {', '.join(loaded)})")
                loaded = loaded[source.split]
        else:
            data_files = None if source.data_files is None else str(source.data_files)
            loaded = datasets.load_dataset(source.dataset, data_files=data_files, split=source.split)
    except UserError:
        raise
    except Exception as error:  # datasets raises a dozen kinds (not found, offline, bad files, splits)
        reason = (str(error).strip().splitlines() or [""])[0]
        raise UserError(f"prompts {source} does not load: {type(error).__name__}: {reason}") from error
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()
    if source.column not in loaded.column_names:
        raise UserError(f"prompts {source} has no {source.column!r} column (columns: {loaded.column_names})")
    return loaded[source.column]


class PromptRenderer:
    """A prompt's token ids as the sampler gives them to vLLM and the trainer sees them:
    a conversation through the tokenizer's chat template with the generation prompt, a
    string through the tokenizer (special tokens included, as vLLM adds them to text).

    Templated text is never tokenized again: a template that writes the BOS itself, then
    tokenized with special tokens, would give two BOS (TRL #3853)."""

    def __init__(self, tokenizer: Any, model: str | Path) -> None:
        self.tokenizer = tokenizer
        self.model = model

    def ids(self, text: str, messages: Messages | None) -> list[int]:
        if messages is None:
            return list(self.tokenizer(text)["input_ids"])
        return list(self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                       return_dict=False))

    def check_can_render(self, source: PromptSource, rows: Sequence[PromptRow]) -> None:
        """A UserError naming the first conversation when the tokenizer has no chat template."""
        first = next((row for row in rows if row.messages is not None), None)
        if first is not None and not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"{source}: row {first.row} is a conversation, and the tokenizer of {self.model} "
                            "has no chat template to render it (give plain-text prompts, or a model with a template)")


def load_renderer(model: str | Path) -> PromptRenderer:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the tokenizer of {model}: {str(error).strip().splitlines()[0]}") from error
    return PromptRenderer(tokenizer, model)


def usable_prompts(prompts: PromptRows, count_tokens: Callable[[PromptRow], int], max_prompt_tokens: int
                   ) -> tuple[list[PromptRow], list[tuple[int, str, int | None]]]:
    """Split a source's prompts into those the sampler can take and those it cannot:
    (rows, [(row number, reason, token count)]) for `tables.add_skipped_prompts`.
    `count_tokens(row)` counts a prompt's tokens as the sampler renders them."""
    usable: list[PromptRow] = []
    skipped: list[tuple[int, str, int | None]] = [(row, "empty", None) for row in prompts.empty_rows]
    for row in prompts.rows:
        tokens = count_tokens(row)
        if tokens > max_prompt_tokens:
            skipped.append((row.row, f"longer than the context ({tokens} > {max_prompt_tokens} tokens)", tokens))
        else:
            usable.append(row)
    return usable, sorted(skipped)
