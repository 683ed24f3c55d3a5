"""The human labelling queue: annotators, label requests, leases and people's labels.

Every function takes an open transaction (`Store.transaction()`). A claim is one
`INSERT ... SELECT ... RETURNING` statement and a submission one `UPDATE ... RETURNING`,
so two annotators can never hold the same slot of a pair, whatever interleaves them.
Times are naive UTC `datetime`s passed in by the caller, so tests can move the clock.

A person's label is a row in `labels` with the annotator's name, which is what marks a label
as a person's, under the judge name the caller gives (`judges.human.HUMAN_JUDGE_NAME`). The
rules of what people may submit (names, choices) live in `judges.human`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Sequence

from storage.store import StoreError, Transaction
from storage.tables import next_ids, recount_people

BIGINT_MAX = 2**63 - 1


class QueueError(StoreError):
    """A request the queue refuses; `status` is the HTTP status the web app answers with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class LabelRequest:
    round_id: int
    judge_version: str
    labels_per_pair: int
    lease_seconds: float
    quota_pairs: int | None
    deadline: datetime | None
    created_at: datetime
    closed_at: datetime | None
    closed_because: str | None
    guidelines: str | None = None  # markdown shown on the labelling page
    gold_rate: float = 0.0
    min_gold_accuracy: float | None = None


@dataclass(frozen=True)
class Progress:
    pairs: int  # queued pairs
    pairs_done: int  # pairs with all the labels they need, or all they can get (exhausted)
    labels: int  # labels given towards what is needed (a pair's extra labels not counted)
    labels_needed: int
    # Pairs that every active annotator has labelled or skipped short of labels_per_pair:
    # they count as done, or a round would wait for labels nobody can give.
    pairs_exhausted: int = 0
    active_annotators: int = 0
    left_out: tuple[str, ...] = ()  # people below the gold threshold, not trained on

    @property
    def labels_remaining(self) -> int:
        return self.labels_needed - self.labels


@dataclass(frozen=True)
class Lease:
    """A pair as one annotator sees it: left and right in the order recorded on the lease."""

    lease_id: int
    pair_id: int
    round_id: int
    prompt: str
    left: str
    right: str
    expires_at: datetime


# -- annotators --------------------------------------------------------------------------


def add_annotator(tx: Transaction, name: str, token_sha256: str) -> None:
    if tx.execute("SELECT 1 FROM annotators WHERE name = ?", [name]).fetchone():
        raise QueueError(f"annotator {name!r} already exists", 409)
    tx.execute("INSERT INTO annotators (name, token_sha256) VALUES (?, ?)", [name, token_sha256])


def active_annotator(tx: Transaction, token_sha256: str) -> str | None:
    """The name of the active (not revoked) annotator with this token hash."""
    row = tx.execute("SELECT name FROM annotators WHERE token_sha256 = ? AND revoked_at IS NULL",
                     [token_sha256]).fetchone()
    return row[0] if row else None


def annotators(tx: Transaction) -> list[tuple[str, str, int]]:
    """(name, 'active' or 'revoked', labels given) of every annotator."""
    return tx.execute(
        "SELECT a.name, CASE WHEN a.revoked_at IS NULL THEN 'active' ELSE 'revoked' END, count(l.label_id) "
        "FROM annotators a LEFT JOIN labels l ON l.annotator = a.name "
        "GROUP BY a.name, a.annotator_id, a.revoked_at ORDER BY a.annotator_id"
    ).fetchall()


def annotator_names(tx: Transaction) -> set[str]:
    return {row[0] for row in tx.execute("SELECT name FROM annotators").fetchall()}


def revoke_annotator(tx: Transaction, name: str, now: datetime) -> None:
    """Stop the annotator's token at once; their labels stay, their live leases end (the
    pairs go back to the queue)."""
    row = tx.execute("SELECT revoked_at FROM annotators WHERE name = ?", [name]).fetchone()
    if row is None:
        raise QueueError(f"no annotator named {name!r}", 404)
    if row[0] is not None:
        raise QueueError(f"annotator {name!r} was revoked already, at {row[0]:%Y-%m-%d %H:%M} UTC", 409)
    tx.execute("UPDATE annotators SET revoked_at = ? WHERE name = ?", [now, name])
    tx.execute("UPDATE label_leases SET expires_at = ? WHERE annotator = ? AND outcome IS NULL AND expires_at > ?",
               [now, name, now])


# -- requests ------------------------------------------------------------------------------


def request_labels(
    tx: Transaction,
    round_id: int,
    *,
    judge_version: str,
    labels_per_pair: int,
    lease_seconds: float,
    now: datetime,
    quota_pairs: int | None = None,
    deadline: datetime | None = None,
    guidelines: str | None = None,
    gold_rate: float = 0.0,
    min_gold_accuracy: float | None = None,
) -> LabelRequest:
    """Queue every pair of the round for people, once; a second call returns the request as it is."""
    existing = label_request(tx, round_id)
    if existing is not None:
        return existing
    tx.execute(
        "INSERT INTO label_requests (round_id, judge_version, labels_per_pair, lease_seconds, quota_pairs, "
        "deadline, created_at, guidelines, gold_rate, min_gold_accuracy) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [round_id, judge_version, labels_per_pair, lease_seconds, quota_pairs, deadline, now, guidelines,
         gold_rate, min_gold_accuracy],
    )
    queued = tx.execute(
        "INSERT INTO label_queue (pair_id, round_id) SELECT pair_id, round_id FROM pairs "
        "WHERE round_id = ? AND pair_id NOT IN (SELECT pair_id FROM label_queue) RETURNING pair_id",
        [round_id],
    ).fetchall()
    recount_people(tx, [row[0] for row in queued])  # people may have labelled some already
    return label_request(tx, round_id)


def label_request(tx: Transaction, round_id: int) -> LabelRequest | None:
    row = tx.execute(
        f"SELECT {', '.join(LabelRequest.__dataclass_fields__)} FROM label_requests WHERE round_id = ?", [round_id]
    ).fetchone()
    return LabelRequest(*row) if row else None


def close_request(tx: Transaction, round_id: int, because: str, now: datetime) -> None:
    """Let the round go on with the labels given so far (`last_label_id` marks them, and
    `left_out` the people below its gold threshold, so a resumed round trains on the same
    set); its unlabelled pairs stay in the queue."""
    tx.execute(
        "UPDATE label_requests SET closed_at = ?, closed_because = ?, "
        "last_label_id = (SELECT coalesce(max(label_id), 0) FROM labels), "
        "left_out = CASE WHEN min_gold_accuracy IS NOT NULL THEN coalesce((SELECT list(annotator ORDER BY "
        "annotator) FROM annotator_gold WHERE gold_accuracy < min_gold_accuracy), []) END "
        "WHERE round_id = ? AND closed_at IS NULL",
        [now, because, round_id],
    )


def progress(tx: Transaction, round_id: int | None = None) -> Progress:
    """Progress of one round's queue, or of the whole queue (`labelling_progress`)."""
    row = tx.execute(
        "SELECT coalesce(sum(pairs), 0), coalesce(sum(pairs_done), 0), coalesce(sum(labels), 0), "
        "coalesce(sum(labels_needed), 0), coalesce(sum(pairs_exhausted), 0), "
        "(SELECT count(*) FROM annotators WHERE revoked_at IS NULL), "
        "coalesce(list_sort(list_distinct(flatten(list(left_out_annotators)))), []) "
        "FROM labelling_progress WHERE ? IS NULL OR round_id = ?",
        [round_id, round_id],
    ).fetchone()
    return Progress(*(int(v) for v in row[:6]), tuple(row[6]))


# -- leases ----------------------------------------------------------------------------------

# A queued pair is open to an annotator while its people's labels plus the other live
# leases on it are fewer than it needs, and the annotator has not labelled it, skipped
# it, or leased it before. Open requests first, then the newest round: fresh pairs are
# the on-policy ones; then the lowest pair id.
#
# The queue keeps each pair's count of people (`label_queue.people`), so the pairs still
# wanted come from one pass over the queue; the few closed to this annotator (their own,
# and those whose live leases fill what is wanted) are taken out by one hash join. With
# 100k pairs queued this took 2-5 ms however many were labelled, against 7 ms with none
# and 48 ms with 99k labelled when every label was counted again on each choice.
_NEXT_OPEN_PAIR = """
WITH closed AS (
    SELECT pair_id FROM label_leases
    WHERE annotator = $annotator AND (outcome IS NOT NULL OR expires_at > $now)
    UNION ALL
    SELECT pair_id FROM labels WHERE annotator = $annotator
    UNION ALL
    SELECT e.pair_id
    FROM label_leases e JOIN label_queue q ON q.pair_id = e.pair_id JOIN label_requests r ON r.round_id = q.round_id
    WHERE e.outcome IS NULL AND e.expires_at > $now
    GROUP BY e.pair_id, q.people, r.labels_per_pair
    HAVING q.people + count(*) >= r.labels_per_pair
)
SELECT q.pair_id, q.round_id, r.lease_seconds
FROM label_queue q JOIN label_requests r ON r.round_id = q.round_id
ANTI JOIN closed c ON c.pair_id = q.pair_id
WHERE q.people < r.labels_per_pair
ORDER BY r.closed_at IS NOT NULL, q.round_id DESC, q.pair_id
LIMIT 1
"""

_LEASE_COLUMNS = "lease_id, pair_id, round_id, left_slot, expires_at"


def claim_next_pair(tx: Transaction, annotator: str, now: datetime, left_slot: str) -> Lease | None:
    """The annotator's live lease if they hold one (a reloaded page), else a new lease on
    the next open pair, with `left_slot` ('a' or 'b') shown on the left; None: nothing left."""
    # A claim returns the lease held, so there is one at most; the lowest id should there be
    # more, taken here: ORDER BY ... LIMIT 1 doubled the query's time.
    held = min(tx.execute(f"SELECT {_LEASE_COLUMNS} FROM label_leases WHERE annotator = ? AND outcome IS NULL "
                          "AND expires_at > ?", [annotator, now]).fetchall(), default=None)
    if held is None:
        pair = tx.execute(_NEXT_OPEN_PAIR, {"annotator": annotator, "now": now}).fetchone()
        if pair is None:
            return None
        pair_id, round_id, lease_seconds = pair
        held = tx.execute(
            "INSERT INTO label_leases (pair_id, round_id, annotator, left_slot, leased_at, expires_at) "
            f"VALUES (?, ?, ?, ?, ?, ?) RETURNING {_LEASE_COLUMNS}",
            [pair_id, round_id, annotator, left_slot, now, now + timedelta(seconds=lease_seconds)]).fetchone()
    return _lease(tx, *held)


def guidelines_for(tx: Transaction, annotator: str, lease: Lease) -> tuple[str | None, bool]:
    """The guidelines of the request that queued the lease's pair, and whether this is the
    annotator's first pair of that request (the page then shows them in full)."""
    guidelines, first = tx.execute(
        "SELECT (SELECT guidelines FROM label_requests WHERE round_id = $round), NOT EXISTS (SELECT 1 "
        "FROM label_leases WHERE round_id = $round AND annotator = $annotator AND lease_id <> $lease)",
        {"round": lease.round_id, "annotator": annotator, "lease": lease.lease_id}).fetchone()
    return guidelines, bool(first)


def _lease(tx: Transaction, lease_id: int, pair_id: int, round_id: int, left_slot: str,
           expires_at: datetime) -> Lease:
    # Each row looked up by its id: DuckDB then reads only the row groups holding it. A
    # join with `pair_texts` read every prompt and completion text (17 ms on a newly
    # opened file with 100k pairs queued, against 9 ms).
    prompt_id, a_id, b_id = tx.execute(
        "SELECT prompt_id, completion_a_id, completion_b_id FROM pairs WHERE pair_id = ?", [pair_id]).fetchone()
    prompt, a_text, b_text = tx.execute(
        "SELECT (SELECT text FROM prompts WHERE prompt_id = $prompt), "
        "(SELECT text FROM completions WHERE completion_id = $a), (SELECT text FROM completions WHERE completion_id = $b)",
        {"prompt": prompt_id, "a": a_id, "b": b_id}).fetchone()
    left, right = (a_text, b_text) if left_slot == "a" else (b_text, a_text)
    return Lease(lease_id, pair_id, round_id, prompt, left, right, expires_at)


def _finish_lease(tx: Transaction, annotator: str, pair_id: int, lease_id: int, outcome: str,
                  now: datetime) -> tuple[str, int | None]:
    """Close the annotator's live lease in one statement; returns its left slot and, for a
    label, the id the label is to take. Explains a refusal."""
    # A label imported for this person while they held the lease already counts as theirs.
    row = tx.execute(
        "UPDATE label_leases SET outcome = $outcome, finished_at = $now, "
        "label_id = CASE WHEN $outcome = 'labelled' THEN nextval('label_ids') END WHERE lease_id = $lease "
        "AND pair_id = $pair AND annotator = $annotator AND outcome IS NULL AND expires_at > $now "
        "AND ($outcome = 'skipped' OR NOT EXISTS "
        "(SELECT 1 FROM labels l WHERE l.pair_id = $pair AND l.annotator = $annotator)) RETURNING left_slot, label_id",
        {"outcome": outcome, "now": now, "lease": lease_id, "pair": pair_id, "annotator": annotator},
    ).fetchone()
    if row is not None:
        return row
    if tx.execute("SELECT 1 FROM pairs WHERE pair_id = ?", [pair_id]).fetchone() is None:
        raise QueueError(f"no pair with id {pair_id}", 404)
    lease = tx.execute(
        "SELECT pair_id, annotator, outcome, expires_at FROM label_leases WHERE lease_id = ?", [lease_id]
    ).fetchone()
    if lease is None or lease[0] != pair_id:
        raise QueueError(f"lease {lease_id} is not a lease on pair {pair_id}", 409)
    if lease[1] != annotator:
        raise QueueError(f"lease {lease_id} belongs to another annotator", 403)
    if lease[2] is not None:
        raise QueueError(f"lease {lease_id} is already {lease[2]}", 409)
    if lease[3] > now:
        raise QueueError(f"you have already labelled pair {pair_id}", 409)
    raise QueueError(f"lease {lease_id} expired at {lease[3]:%H:%M:%S} UTC; the pair may have gone to "
                     "someone else: take the next pair", 409)


# What a person answers on the labelling page: the left or the right answer, a tie, or neither.
CHOICES = ("left", "right", "tie", "both_bad")


def submit_label(tx: Transaction, annotator: str, pair_id: int, lease_id: int, choice: str, now: datetime,
                 rationale: str | None = None, *, judge_name: str) -> int:
    """Store the annotator's choice (left, right, tie, both_bad) on a live lease; returns the label id."""
    if choice not in CHOICES:
        raise QueueError(f"choice must be left, right, tie or both_bad, got {choice!r}", 422)
    left_slot, label_id = _finish_lease(tx, annotator, pair_id, lease_id, "labelled", now)
    winner = {"left": left_slot, "right": "b" if left_slot == "a" else "a"}.get(choice, choice)
    _insert_person_label(tx, label_id, pair_id, winner, annotator, rationale, judge_name)
    # `_finish_lease` refuses a person who labelled the pair already: one more person
    # (`tables.recount_people` counts them all again: 1.8 ms against 0.6).
    tx.execute("UPDATE label_queue SET people = people + 1 WHERE pair_id = ?", [pair_id])
    return label_id


def _insert_person_label(tx: Transaction, label_id: int, pair_id: int, winner: str, annotator: str,
                         rationale: str | None, judge_name: str) -> None:
    # Labelled under the version of the request that queued the pair, so a round that
    # trains on people's labels finds them; '1' for a pair that was never queued.
    tx.execute(
        "INSERT INTO labels (label_id, pair_id, winner, judge_name, judge_version, annotator, rationale) "
        "SELECT $label, $pair, $winner, $judge, coalesce((SELECT judge_version FROM label_requests "
        "WHERE round_id = (SELECT round_id FROM label_queue WHERE pair_id = $pair)), '1'), $annotator, $rationale",
        {"label": label_id, "pair": pair_id, "winner": winner, "judge": judge_name, "annotator": annotator,
         "rationale": rationale},
    )


def skip_pair(tx: Transaction, annotator: str, pair_id: int, lease_id: int, now: datetime) -> None:
    """Give the pair back; this annotator is not offered it again."""
    _finish_lease(tx, annotator, pair_id, lease_id, "skipped", now)


def labels_of(tx: Transaction, annotator: str, limit: int = 50, before: int | None = None) -> list[dict]:
    """An annotator's own labels, newest first (nobody sees anyone else's): `limit` of them
    with ids below `before` (a cursor: the last id of the previous page)."""
    return _dicts(tx.execute(
        "SELECT l.label_id, l.pair_id, t.prompt, l.winner, strftime(l.created_at, '%Y-%m-%dT%H:%M:%S') AS created_at "
        "FROM labels l JOIN pair_texts t ON t.pair_id = l.pair_id "
        "WHERE l.annotator = ? AND (? IS NULL OR l.label_id < ?) ORDER BY l.label_id DESC LIMIT ?",
        [annotator, before, before, limit],
    ))


def own_quality(tx: Transaction, annotator: str) -> dict:
    """What the page shows a person of their own work: gold accuracy (None before any gold
    answer), and labels per hour of labelling."""
    row = tx.execute("SELECT gold_labels, gold_accuracy, labels_per_hour FROM annotator_stats WHERE annotator = ?",
                     [annotator]).fetchone()
    gold_labels, gold_accuracy, per_hour = row if row else (None, None, None)
    return {"gold_labels": gold_labels or 0, "gold_accuracy": gold_accuracy, "labels_per_hour": per_hour}


def count_labels_of(tx: Transaction, annotator: str) -> int:
    return tx.execute("SELECT count(*) FROM labels WHERE annotator = ?", [annotator]).fetchone()[0]


# -- export and import -----------------------------------------------------------------------


def pending_pairs(tx: Transaction, round_id: int | None = None) -> list[dict]:
    """Queued pairs that still need labels, with their texts, for labelling elsewhere."""
    return _dicts(tx.execute(
        "SELECT t.*, r.labels_per_pair - (SELECT count(DISTINCT l.annotator) FROM labels l "
        "WHERE l.pair_id = q.pair_id) AS labels_needed "
        "FROM label_queue q JOIN label_requests r ON r.round_id = q.round_id "
        "JOIN pair_texts t ON t.pair_id = q.pair_id "
        "WHERE (? IS NULL OR q.round_id = ?) AND labels_needed > 0 ORDER BY q.pair_id",
        [round_id, round_id],
    ))


def people_labels(tx: Transaction, round_id: int | None = None) -> list[dict]:
    """Every person's label (with texts), in the format `import_labels` reads."""
    return _dicts(tx.execute(
        "SELECT l.pair_id, l.winner, l.annotator, l.rationale, t.round_id, t.prompt, t.completion_a, t.completion_b "
        "FROM labels l JOIN pair_texts t ON t.pair_id = l.pair_id "
        "WHERE l.annotator IS NOT NULL AND (? IS NULL OR t.round_id = ?) ORDER BY l.label_id",
        [round_id, round_id],
    ))


def _dicts(cursor) -> list[dict]:
    columns = [d[0] for d in cursor.description]
    return [dict(zip(columns, row)) for row in cursor.fetchall()]


def import_labels(tx: Transaction, labels: Sequence[Any], now: datetime, *, judge_name: str) -> tuple[int, int]:
    """Add people's labels made elsewhere (`judges.human.HumanLabel`s: pair_id, winner,
    annotator, rationale); returns (added, already there). A label for a
    pair that does not exist refuses the whole import (nothing is added). A person's live
    lease on a pair they bring a label for ends with it."""
    missing = unknown_pairs(tx, [label.pair_id for label in labels])
    if missing:
        raise QueueError(f"no pairs with ids {missing[:10]}{' ...' if len(missing) > 10 else ''}", 404)
    pair_ids = sorted({label.pair_id for label in labels})
    present = set(tx.execute(
        "SELECT pair_id, annotator FROM labels WHERE annotator IS NOT NULL AND pair_id IN "
        "(SELECT unnest(?::BIGINT[]))", [pair_ids]).fetchall())
    new = []
    for label in labels:
        if (label.pair_id, label.annotator) not in present:
            present.add((label.pair_id, label.annotator))
            new.append(label)
    for label, label_id in zip(new, next_ids(tx, "label_ids", len(new))):
        _insert_person_label(tx, label_id, label.pair_id, label.winner, label.annotator, label.rationale, judge_name)
        tx.execute(
            "UPDATE label_leases SET outcome = 'labelled', label_id = ?, finished_at = ? "
            "WHERE pair_id = ? AND annotator = ? AND outcome IS NULL",
            [label_id, now, label.pair_id, label.annotator],
        )
    recount_people(tx, [label.pair_id for label in new])
    return len(new), len(labels) - len(new)


def unknown_pairs(tx: Transaction, pair_ids: Sequence[int]) -> list[int]:
    """Those of `pair_ids` that are no pair's id, sorted."""
    wanted = sorted(set(pair_ids))
    known = {r[0] for r in tx.execute(
        "SELECT pair_id FROM pairs WHERE pair_id IN (SELECT unnest(?::BIGINT[]))", [wanted]).fetchall()}
    return [p for p in wanted if p not in known]


def add_gold_answers(tx: Transaction, answers: dict[int, str], source: str) -> None:
    for pair_id, winner in answers.items():
        tx.execute("INSERT OR IGNORE INTO gold_answers (pair_id, winner, source) VALUES (?, ?, ?)",
                   [pair_id, winner, source])


def utc_now() -> datetime:
    """Naive UTC, the form every time in the queue tables takes."""
    from datetime import timezone

    return datetime.now(timezone.utc).replace(tzinfo=None)


def deadline_after(now: datetime, hours: float) -> datetime | None:
    return now + timedelta(hours=hours) if hours > 0 else None
