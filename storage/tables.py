"""Reads and writes of the flywheel's tables: free functions that take an open transaction.

Get `tx` from `Store.transaction()` (several calls, one transaction) or call one function
in a transaction of its own with `store.read(fn, ...)`. Writes go in as Arrow columns
(`insert_arrow`), one INSERT per call; token ids are stored as vLLM produced them, so that
training builds its completion masks from ids, never by re-tokenising text.
"""

from __future__ import annotations

import array
import json
import operator
from typing import Any, Iterator, Sequence

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from storage.records import (
    ROUND_STATES,
    WINNERS,
    Checkpoint,
    Completion,
    CompletionScore,
    Evaluation,
    JudgeFailure,
    Label,
    LabelWithTexts,
    Pair,
    PairForJudge,
    PreferenceTriple,
    Prompt,
    Round,
    RoundPhase,
    StepMetrics,
    TrainStep,
)
from storage.store import StoreError, Transaction

# A round's training preferences: its pairs that the round's own judge gave a winner.
# Labels other judges added later, for comparison, are not training data; nor are people's
# labels given after the round stopped waiting for them (`label_requests.last_label_id`).
# `{rounds}` picks the rounds: `pf.round_id = ?` (one round) or `pf.round_id < ?` (replay).
# The labels a round trains on: its own judge's, and of people's only those given before
# the round stopped waiting for them, by people its request did not leave out for their
# gold accuracy (`label_requests.left_out`). `{label}` is the label row's alias, `{judge}`
# its judge-name column; `rd` is the round and `rq` its label request (LEFT JOIN).
_ROUND_OWN_LABEL = (
    "{label}.{judge} = rd.judge_name AND {label}.judge_version = rd.judge_version "
    "AND (rq.last_label_id IS NULL OR {label}.label_id <= rq.last_label_id) "
    "AND NOT coalesce(list_contains(rq.left_out, {label}.annotator), false)"
)
_ROUND_PREFERENCES = (
    "SELECT pf.* FROM preferences pf JOIN rounds rd ON rd.round_id = pf.round_id "
    "LEFT JOIN label_requests rq ON rq.round_id = pf.round_id "
    "WHERE {rounds} AND " + _ROUND_OWN_LABEL.format(label="pf", judge="judge")
)


# -- Arrow in and out ----------------------------------------------------------------------


def next_ids(tx: Transaction, sequence: str, n: int) -> list[int]:
    if n == 0:
        return []
    ids = tx.execute(f"SELECT nextval('{sequence}') AS id FROM range(?)", [n]).fetchnumpy()["id"]
    return sorted(ids.tolist())


def insert_arrow(tx: Transaction, table: str, columns: dict[str, pa.Array]) -> None:
    """One INSERT of Arrow columns named as the table's columns."""
    # DuckDB reads each Arrow record batch on one thread: batches of 8192 rows let every
    # thread take part in a large insert.
    rows = pa.table(columns)
    rows = pa.Table.from_batches(rows.to_batches(max_chunksize=8192), rows.schema)
    tx.register("_flywheel_rows", rows)
    try:
        names = ", ".join(columns)
        tx.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM _flywheel_rows")
    finally:
        tx.unregister("_flywheel_rows")


def rows_through_arrow(cursor: Transaction) -> Iterator[tuple]:
    """A result's rows as tuples of Python values, built a column at a time from Arrow: a
    list column (token ids) comes out in about a third of `fetchall`'s time. The same values
    as `fetchall` for integers, floats, text, JSON (as text), lists of those and NULL."""
    result = cursor.arrow()  # a RecordBatchReader since duckdb 1.5, a Table before
    table = result.read_all() if isinstance(result, pa.RecordBatchReader) else result
    return zip(*(column.to_pylist() for column in table.columns))


def _int32_lists(values: Sequence[Sequence[int]]) -> pa.Array:
    """A list<int32> column from sequences of token ids: one flat C int buffer plus
    offsets (the sampler's `array('i')` records are copied whole)."""
    lengths = np.fromiter(map(len, values), np.int32, len(values))
    offsets = np.zeros(len(values) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = array.array("i")  # a C int (np.intc): 32 bits on every platform DuckDB and torch run on
    for token_ids in values:
        if isinstance(token_ids, array.array) and token_ids.typecode == "i":
            flat.extend(token_ids)
        else:
            flat.fromlist(token_ids if isinstance(token_ids, list) else np.asarray(token_ids).tolist())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.frombuffer(flat, np.intc)))


def _json_sorted(values: Sequence[Any]) -> pa.Array:
    """Each value as compact JSON with sorted keys (non-string keys become strings, as
    json.dumps does), as a string column. A value equal to the one before reuses its
    encoding: a prompt's n samples have the same params, and comparing two small dicts
    costs a tenth of encoding one."""
    encoded, last, last_encoded = [], object(), b""
    for value in values:
        if value != last:
            last, last_encoded = value, orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
        encoded.append(last_encoded)
    return pa.array(encoded, pa.binary()).cast(pa.string())


def _field_columns(records: Sequence[Any], types: dict[str, pa.DataType]) -> dict[str, pa.Array]:
    """One Arrow column of type `types[name]` per field `name` of the records, as it is."""
    return {name: pa.array(list(map(operator.attrgetter(name), records)), kind) for name, kind in types.items()}


def _record_columns(records: Sequence[Any], types: dict[str, pa.DataType]) -> dict[str, pa.Array]:
    """Arrow columns of dataclass records whose fields are the table's columns (strings
    unless `types` names another type). `records` is not empty."""
    fields = type(records[0]).__dataclass_fields__
    return _field_columns(records, {name: types.get(name, pa.string()) for name in fields})


def completion_columns(completions: Sequence[Completion], ids: Sequence[int]) -> dict[str, pa.Array]:
    """The Arrow columns `add_completions` inserts (its benchmark's floor too)."""
    token_ids = _int32_lists([c.token_ids for c in completions])
    return {
        "completion_id": pa.array(ids, pa.int64()),
        **_field_columns(completions, {
            "round_id": pa.int64(), "prompt_id": pa.int64(), "checkpoint_id": pa.int64(), "purpose": pa.string(),
            "sample_index": pa.int32(), "text": pa.string(), "cumulative_logprob": pa.float64(),
            "finish_reason": pa.string(),
        }),
        "prompt_token_ids": _int32_lists([c.prompt_token_ids for c in completions]),
        "token_ids": token_ids,
        "num_tokens": pc.list_value_length(token_ids),
        "sampling_params": _json_sorted([c.sampling_params for c in completions]),
    }


def label_columns(labels: Sequence[Label], ids: Sequence[int]) -> dict[str, pa.Array]:
    """The Arrow columns `add_labels` inserts (its benchmark's floor too)."""
    return {"label_id": pa.array(ids, pa.int64()),
            **_record_columns(labels, {"pair_id": pa.int64(), "confidence": pa.float64()})}


# -- counts --------------------------------------------------------------------------------


def count(tx: Transaction, table: str, where: str = "true", params: Sequence[Any] = ()) -> int:
    return tx.execute(f"SELECT count(*) FROM {table} WHERE {where}", list(params)).fetchone()[0]


# -- prompts -------------------------------------------------------------------------


def add_prompts(tx: Transaction, texts: Sequence[str], split: str, source: str | None = None,
                messages: Sequence[list[dict[str, str]] | None] | None = None) -> list[int]:
    """Insert the prompts not already present for `split`, numbered in the order given (so
    that a seeded draw of prompts is the same on every machine); return the ids of all
    `texts`, in order. `messages[i]`, where given, is text i's conversation."""
    ids = dict(tx.execute(
        "SELECT text, prompt_id FROM prompts WHERE split = ? AND text IN (SELECT unnest(?::VARCHAR[]))",
        [split, list(texts)],
    ).fetchall())
    conversations = dict(zip(texts, messages if messages is not None else [None] * len(texts)))
    new = [text for text in conversations if text not in ids]
    new_ids = next_ids(tx, "prompt_ids", len(new))
    if new:
        insert_arrow(tx, "prompts", {
            "prompt_id": pa.array(new_ids, pa.int64()), "text": pa.array(new, pa.string()),
            "split": pa.array([split] * len(new), pa.string()), "source": pa.array([source] * len(new), pa.string()),
            "messages": pa.array([None if conversations[t] is None else json.dumps(conversations[t]) for t in new],
                                 pa.string()),
        })
    ids.update(zip(new, new_ids))
    return [ids[t] for t in texts]


def add_skipped_prompts(tx: Transaction, source: str, split: str,
                        skipped: Sequence[tuple[int, str, int | None]]) -> None:
    """Record (row number, reason, token count) of prompts read but not used; a row
    recorded before is left as it was."""
    for row_number, reason, token_count in skipped:
        tx.execute(
            "INSERT INTO skipped_prompts (source, split, row_number, reason, token_count) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [source, split, row_number, reason, token_count],
        )


def prompts(tx: Transaction, split: str) -> list[Prompt]:
    rows = tx.execute(
        "SELECT prompt_id, text, split, messages FROM prompts WHERE split = ? ORDER BY prompt_id", [split]
    ).fetchall()
    return [Prompt(id_, text, split_, None if messages is None else json.loads(messages))
            for id_, text, split_, messages in rows]


# -- checkpoints ---------------------------------------------------------------------


def add_checkpoint(tx: Transaction, path: str, role: str, status: str, parent_checkpoint_id: int | None = None,
                   round_id: int | None = None) -> int:
    return tx.execute(
        "INSERT INTO checkpoints (path, role, status, parent_checkpoint_id, round_id, promoted_at) "
        "VALUES (?, ?, ?, ?, ?, CASE WHEN ? = 'promoted' THEN current_timestamp END) "
        "RETURNING checkpoint_id",
        [str(path), role, status, parent_checkpoint_id, round_id, status],
    ).fetchone()[0]


def checkpoint(tx: Transaction, checkpoint_id: int) -> Checkpoint:
    row = tx.execute(
        "SELECT checkpoint_id, path, role, status, parent_checkpoint_id, round_id "
        "FROM checkpoints WHERE checkpoint_id = ?",
        [checkpoint_id],
    ).fetchone()
    if row is None:
        raise StoreError(f"no checkpoint with id {checkpoint_id}")
    return Checkpoint(*row)


def current_policy(tx: Transaction) -> Checkpoint | None:
    """The incumbent: the most recently promoted checkpoint."""
    row = tx.execute(
        "SELECT checkpoint_id FROM checkpoints WHERE status = 'promoted' "
        "ORDER BY promoted_at DESC, checkpoint_id DESC LIMIT 1"
    ).fetchone()
    return checkpoint(tx, row[0]) if row else None


def reference_checkpoint(tx: Transaction) -> Checkpoint | None:
    row = tx.execute(
        "SELECT checkpoint_id FROM checkpoints WHERE role = 'reference' ORDER BY checkpoint_id LIMIT 1"
    ).fetchone()
    return checkpoint(tx, row[0]) if row else None


def set_checkpoint_status(tx: Transaction, checkpoint_id: int, status: str) -> None:
    tx.execute(
        "UPDATE checkpoints SET status = ?, "
        "promoted_at = CASE WHEN ? = 'promoted' THEN current_timestamp ELSE promoted_at END "
        "WHERE checkpoint_id = ?",
        [status, status, checkpoint_id],
    )


def record_promotion(tx: Transaction, checkpoint_id: int, action: str, decided_by: str, reason: str | None,
                     round_id: int | None, policy_before: int | None) -> None:
    """Log a promotion decision; call it in the transaction that applied it, after it."""
    policy_after = current_policy(tx)
    tx.execute(
        "INSERT INTO promotions (checkpoint_id, action, decided_by, reason, round_id, policy_before, "
        "policy_after) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [checkpoint_id, action, decided_by, reason, round_id, policy_before,
         policy_after.checkpoint_id if policy_after else None],
    )


# -- rounds --------------------------------------------------------------------------


def start_round(tx: Transaction, policy_checkpoint_id: int, reference_checkpoint_id: int, seed: int,
                config: dict[str, Any]) -> int:
    return tx.execute(
        "INSERT INTO rounds (state, policy_checkpoint_id, reference_checkpoint_id, seed, config) "
        "VALUES ('started', ?, ?, ?, ?) RETURNING round_id",
        [policy_checkpoint_id, reference_checkpoint_id, seed, json.dumps(config)],
    ).fetchone()[0]


def get_round(tx: Transaction, round_id: int) -> Round:
    row = tx.execute(
        "SELECT round_id, state, policy_checkpoint_id, reference_checkpoint_id, "
        "candidate_checkpoint_id, seed, config, judge_name, judge_version FROM rounds WHERE round_id = ?",
        [round_id],
    ).fetchone()
    if row is None:
        raise StoreError(f"no round with id {round_id}")
    *head, config, judge_name, judge_version = row
    return Round(*head, config=json.loads(config) if config else {},
                 judge_name=judge_name, judge_version=judge_version)


def claim_round_judge(tx: Transaction, round_id: int, judge_name: str, judge_version: str) -> tuple[str, str]:
    """Make this judge the round's training labeller unless one already is; return the
    round's judge (name, version), which the caller compares with its own."""
    tx.execute(
        "UPDATE rounds SET judge_name = ?, judge_version = ? "
        "WHERE round_id = ? AND judge_name IS NULL",
        [judge_name, judge_version, round_id],
    )
    round_ = get_round(tx, round_id)
    return round_.judge_name, round_.judge_version


def round_starts(tx: Transaction, up_to: int) -> list[tuple[int, bool]]:
    """For each round up to `up_to`, in round order: the policy it began with, and whether a
    person promoted or rolled back a checkpoint after the round before it began."""
    return [(policy, bool(after_a_person)) for policy, after_a_person in tx.execute(
        """
        SELECT r.policy_checkpoint_id,
               EXISTS (SELECT 1 FROM promotions p WHERE p.decided_by <> 'gate'
                       AND p.decided_at > r.previous_start AND p.decided_at <= r.started_at)
        FROM (SELECT round_id, policy_checkpoint_id, started_at,
                     lag(started_at, 1, TIMESTAMP '-infinity') OVER (ORDER BY round_id) AS previous_start
              FROM rounds WHERE round_id <= ?) r
        ORDER BY r.round_id
        """, [up_to]).fetchall()]


def unfinished_round(tx: Transaction) -> Round | None:
    row = tx.execute(
        "SELECT round_id FROM rounds WHERE state <> 'done' ORDER BY round_id LIMIT 1"
    ).fetchone()
    return get_round(tx, row[0]) if row else None


def finish_step(tx: Transaction, round_id: int, state: str, candidate_checkpoint_id: int | None = None) -> None:
    """Record that a round finished `state`; call it in the transaction that wrote the rows."""
    if state not in ROUND_STATES:
        raise ValueError(f"unknown round state {state!r}")
    tx.execute(
        "UPDATE rounds SET state = ?, updated_at = current_timestamp, "
        "candidate_checkpoint_id = coalesce(?, candidate_checkpoint_id), "
        "finished_at = CASE WHEN ? = 'done' THEN current_timestamp END "
        "WHERE round_id = ?",
        [state, candidate_checkpoint_id, state, round_id],
    )


def set_sampler_logprob_gap(tx: Transaction, round_id: int, gap: float | None) -> None:
    tx.execute("UPDATE rounds SET sampler_logprob_gap = ? WHERE round_id = ?", [gap, round_id])


# -- completions ---------------------------------------------------------------------


def add_completions(tx: Transaction, completions: Sequence[Completion]) -> list[int]:
    ids = next_ids(tx, "completion_ids", len(completions))
    if not ids:
        return []
    insert_arrow(tx, "completions", completion_columns(completions, ids))
    return ids


def sampled_prompt_ids(tx: Transaction, round_id: int) -> set[int]:
    """Prompts whose training completions this round has stored (a batch is all or nothing)."""
    rows = tx.execute(
        "SELECT DISTINCT prompt_id FROM completions WHERE round_id = ? AND purpose = 'train'", [round_id]
    ).fetchall()
    return {row[0] for row in rows}


def completions(tx: Transaction, *, round_id: int | None = None, checkpoint_id: int | None = None,
                purpose: str | None = None) -> list[Completion]:
    clauses, params = [], []
    for column, value in (("round_id", round_id), ("checkpoint_id", checkpoint_id), ("purpose", purpose)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    where = " AND ".join(clauses) or "true"
    rows = rows_through_arrow(tx.execute(
        "SELECT prompt_id, checkpoint_id, purpose, sample_index, text, prompt_token_ids, "
        "token_ids, cumulative_logprob, finish_reason, sampling_params, round_id, completion_id "
        f"FROM completions WHERE {where} ORDER BY completion_id",
        params,
    ))
    return [
        Completion(*row[:9], sampling_params=orjson.loads(row[9]), round_id=row[10], completion_id=row[11])
        for row in rows
    ]


# -- pairs and labels ----------------------------------------------------------------


def add_pairs(tx: Transaction, pairs: Sequence[Pair]) -> list[int]:
    ids = next_ids(tx, "pair_ids", len(pairs))
    if not ids:
        return []
    insert_arrow(tx, "pairs", {"pair_id": pa.array(ids, pa.int64()), **_field_columns(pairs, {
        "round_id": pa.int64(), "prompt_id": pa.int64(), "completion_a_id": pa.int64(),
        "completion_b_id": pa.int64(), "strategy": pa.string(),
    })})
    return ids


def latest_round_with_pairs(tx: Transaction) -> int | None:
    return tx.execute("SELECT max(round_id) FROM pairs").fetchone()[0]


def pairs_to_judge(tx: Transaction, round_id: int, judge_name: str, judge_version: str) -> list[PairForJudge]:
    """The round's pairs this judge has neither labelled nor failed on yet, with what a
    judge reads (texts, the prompt's conversation) and whether each completion was cut."""
    rows = tx.execute(
        "SELECT p.pair_id, pr.text, ca.text, cb.text, pr.messages, "
        "       ca.finish_reason = 'length', cb.finish_reason = 'length' "
        "FROM pairs p JOIN prompts pr ON pr.prompt_id = p.prompt_id "
        "JOIN completions ca ON ca.completion_id = p.completion_a_id "
        "JOIN completions cb ON cb.completion_id = p.completion_b_id "
        "WHERE p.round_id = ? "
        "AND p.pair_id NOT IN (SELECT pair_id FROM labels WHERE judge_name = ? AND judge_version = ?) "
        "AND p.pair_id NOT IN (SELECT pair_id FROM judge_failures WHERE judge_name = ? AND judge_version = ?) "
        "ORDER BY p.pair_id",
        [round_id, judge_name, judge_version, judge_name, judge_version],
    ).fetchall()
    return [PairForJudge(pair_id, prompt, a, b, None if messages is None else json.loads(messages),
                         bool(cut_a), bool(cut_b))
            for pair_id, prompt, a, b, messages, cut_a, cut_b in rows]


def _insert_records(tx: Transaction, table: str, records: Sequence[Any], types: dict[str, pa.DataType]) -> None:
    """Insert dataclass records whose fields are the table's columns (`_record_columns`)."""
    if records:
        insert_arrow(tx, table, _record_columns(records, types))


def add_judge_failures(tx: Transaction, failures: Sequence[JudgeFailure]) -> None:
    _insert_records(tx, "judge_failures", failures, {"pair_id": pa.int64()})


def add_completion_scores(tx: Transaction, scores: Sequence[CompletionScore]) -> None:
    _insert_records(tx, "completion_scores", scores, {"completion_id": pa.int64(), "score": pa.float64()})


def add_labels(tx: Transaction, labels: Sequence[Label]) -> list[int]:
    bad = sorted({l.winner for l in labels} - set(WINNERS))
    if bad:
        raise StoreError(f"label winner must be one of {WINNERS}, got {bad}")
    ids = next_ids(tx, "label_ids", len(labels))
    if not ids:
        return []
    insert_arrow(tx, "labels", label_columns(labels, ids))
    recount_people(tx, [l.pair_id for l in labels if l.annotator is not None])
    return ids


def recount_people(tx: Transaction, pair_ids: Sequence[int]) -> None:
    """Count again the people who labelled these pairs, into `label_queue.people` (for the
    queued ones): whatever writes a person's label calls this, or adds one in its place
    where it knows the label is that person's first on the pair (`queue.submit_label`)."""
    if pair_ids:
        tx.execute(
            "UPDATE label_queue SET people = h.n FROM (SELECT pair_id, count(DISTINCT annotator) AS n FROM labels "
            "WHERE annotator IS NOT NULL AND pair_id IN (SELECT unnest(?::BIGINT[])) GROUP BY pair_id) h "
            "WHERE label_queue.pair_id = h.pair_id", [sorted(set(pair_ids))])


def count_preferences(tx: Transaction, round_id: int) -> int:
    """How many of the round's pairs its own judge gave a winner."""
    return tx.execute(
        f"SELECT count(*) FROM ({_ROUND_PREFERENCES.format(rounds='pf.round_id = ?')})", [round_id]
    ).fetchone()[0]


def preference_triples(tx: Transaction, round_id: int, earlier_rounds: bool = False) -> list[PreferenceTriple]:
    """The round's preferences (`_ROUND_PREFERENCES`) as token ids, what vLLM produced;
    with `earlier_rounds`, those of every round before it instead (for replay)."""
    rounds = "pf.round_id < ?" if earlier_rounds else "pf.round_id = ?"
    rows = rows_through_arrow(tx.execute(
        "SELECT pf.pair_id, c.prompt_token_ids, c.token_ids, r.token_ids, c.completion_id, r.completion_id "
        f"FROM ({_ROUND_PREFERENCES.format(rounds=rounds)}) pf "
        "JOIN completions c ON c.completion_id = pf.chosen_completion_id "
        "JOIN completions r ON r.completion_id = pf.rejected_completion_id "
        "ORDER BY pf.label_id",
        [round_id],
    ))
    return [PreferenceTriple(*row) for row in rows]


def labels_with_texts(tx: Transaction, rounds: Sequence[int] | None, judge_name: str | None,
                      with_ties: bool) -> list[LabelWithTexts]:
    """Labels with their pair's prompt and completion texts, oldest first: those each round
    trained on (`judge_name` None), or every label of the judge `judge_name` (any version).
    `rounds` keeps those round ids; ties and both_bad only `with_ties`."""
    labels = ("l.judge_name = ?" if judge_name is not None
              else _ROUND_OWN_LABEL.format(label="l", judge="judge_name"))
    params: list[Any] = [] if judge_name is None else [judge_name]
    if rounds is not None:
        params.append(list(rounds))
    rows = tx.execute(
        "SELECT p.pair_id, p.round_id, pr.text, pr.messages, ca.text, cb.text, l.winner, "
        "l.judge_name || '@' || l.judge_version, l.annotator, l.confidence, ag.gold_accuracy "
        "FROM labels l JOIN pairs p ON p.pair_id = l.pair_id JOIN rounds rd ON rd.round_id = p.round_id "
        "LEFT JOIN annotator_gold ag ON ag.annotator = l.annotator "
        "JOIN prompts pr ON pr.prompt_id = p.prompt_id "
        "JOIN completions ca ON ca.completion_id = p.completion_a_id "
        "JOIN completions cb ON cb.completion_id = p.completion_b_id "
        "LEFT JOIN label_requests rq ON rq.round_id = p.round_id "
        f"WHERE ({labels}) "
        + ("" if rounds is None else "AND p.round_id IN (SELECT unnest(?::BIGINT[])) ")
        + ("" if with_ties else "AND l.winner IN ('a', 'b') ")
        + "ORDER BY l.label_id",
        params,
    ).fetchall()
    return [LabelWithTexts(*row[:3], None if row[3] is None else json.loads(row[3]), *row[4:]) for row in rows]


def round_ids_among(tx: Transaction, round_ids: Sequence[int]) -> set[int]:
    """Which of these round ids exist."""
    return {row[0] for row in tx.execute(
        "SELECT round_id FROM rounds WHERE round_id IN (SELECT unnest(?::BIGINT[]))", [list(round_ids)]).fetchall()}


def judge_names(tx: Transaction) -> list[str]:
    """The names of the judges (people included, as one) that have labels, sorted."""
    return [row[0] for row in tx.execute("SELECT DISTINCT judge_name FROM labels ORDER BY 1").fetchall()]


def reference_logps(tx: Transaction, checkpoint_id: int, completion_ids: Sequence[int]) -> dict[int, float]:
    """Cached reference log-probs (sums over completion tokens) of these completions."""
    return dict(tx.execute(
        "SELECT completion_id, logp FROM reference_logps WHERE checkpoint_id = ? "
        "AND completion_id IN (SELECT unnest(?::BIGINT[]))",
        [checkpoint_id, list(completion_ids)],
    ).fetchall())


def add_reference_logps(tx: Transaction, checkpoint_id: int, logps: dict[int, float]) -> None:
    insert_arrow(tx, "reference_logps", {
        "completion_id": pa.array(list(logps), pa.int64()),
        "checkpoint_id": pa.array([checkpoint_id] * len(logps), pa.int64()),
        "logp": pa.array(list(logps.values()), pa.float64()),
    })


# -- training and evaluation ---------------------------------------------------------


def add_train_steps(tx: Transaction, steps: Sequence[TrainStep]) -> None:
    if not steps:
        return
    columns = {
        "round_id": pa.array([s.round_id for s in steps], pa.int64()),
        "checkpoint_id": pa.array([s.checkpoint_id for s in steps], pa.int64()),
    }
    for name in StepMetrics.__dataclass_fields__:
        if name != "pair_ids":
            columns[name] = pa.array([getattr(s.metrics, name) for s in steps])
    insert_arrow(tx, "train_steps", columns)
    # Lineage: which pairs each step trained on.
    lineage = [(s.checkpoint_id, s.metrics.step, pair_id) for s in steps for pair_id in s.metrics.pair_ids]
    if lineage:
        checkpoints, step_numbers, pair_ids = zip(*lineage)
        insert_arrow(tx, "train_pairs", {
            "checkpoint_id": pa.array(checkpoints, pa.int64()),
            "step": pa.array(step_numbers, pa.int32()),
            "pair_id": pa.array(pair_ids, pa.int64()),
        })


def add_round_phases(tx: Transaction, phases: Sequence[RoundPhase]) -> None:
    for phase in phases:
        tx.execute("INSERT INTO round_phases (round_id, kind, name, detail, started_at, seconds, peak_gpu_bytes) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)",
                   [phase.round_id, phase.kind, phase.name, phase.detail, phase.started_at, phase.seconds,
                    phase.peak_gpu_bytes])


def round_phases(tx: Transaction, round_id: int) -> list[RoundPhase]:
    """A round's phases and engine events in the order they started."""
    rows = tx.execute("SELECT round_id, kind, name, detail, started_at, seconds, peak_gpu_bytes FROM round_phases "
                      "WHERE round_id = ? ORDER BY started_at, phase_id", [round_id]).fetchall()
    return [RoundPhase(*row) for row in rows]


def add_evaluation(tx: Transaction, evaluation: Evaluation) -> int:
    fields = list(Evaluation.__dataclass_fields__)
    return tx.execute(
        f"INSERT INTO evals ({', '.join(fields)}) VALUES ({', '.join('?' for _ in fields)}) "
        "RETURNING eval_id",
        [getattr(evaluation, f) for f in fields],
    ).fetchone()[0]


def evaluation(tx: Transaction, round_id: int, checkpoint_id: int) -> Evaluation:
    fields = list(Evaluation.__dataclass_fields__)
    row = tx.execute(
        f"SELECT {', '.join(fields)} FROM evals WHERE round_id = ? AND checkpoint_id = ? "
        "ORDER BY eval_id DESC LIMIT 1",
        [round_id, checkpoint_id],
    ).fetchone()
    if row is None:
        raise StoreError(f"round {round_id} has no evaluation of checkpoint {checkpoint_id}")
    return Evaluation(*row)
