"""What a flywheel has done so far, for people: the per-round table, a markdown rendering
of it, a PNG of the curves across rounds, and the few lines `flywheel status` prints.

Everything here only reads the store (`Store.query`, read-only transactions), so it is
safe to call while another process runs rounds, and from any orchestrator: the CLI after
a run, `flywheel status`, a Prefect markdown artifact. matplotlib is imported only when
a plot is drawn, and only its Agg backend is used (no display, no pyplot state).
"""

from __future__ import annotations

import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from flywheel.errors import UserError
from storage.store import Store

ROUND_TABLE_TITLE = "flywheel rounds (held-out accuracy at temperature 1)"

# The table users see, one row per round. `promoted` is NULL until the round has made its
# promotion decision (round_summary says false for a round still running, which misleads).
_ROUND_TABLE_SQL = """
SELECT
    round_id AS round,
    state,
    pairs,
    preferences,
    round(final_train_loss, 4) AS train_loss,
    round(incumbent_accuracy, 3) AS incumbent_acc,
    round(candidate_accuracy, 3) AS heldout_acc,
    round(win_rate, 3) AS win_rate,
    round(kl_to_reference, 4) AS kl,
    round(mean_length, 1) AS mean_len,
    CASE WHEN promoted OR state = 'done' THEN promoted END AS promoted
FROM round_summary
WHERE round_id >= ?  -- the first round shown
ORDER BY round_id
"""

# What the plot takes from the round table (rounds with a win rate: those evaluated).
_PLOTTED_COLUMNS = ("round", "heldout_acc", "incumbent_acc", "win_rate", "kl", "mean_len", "promoted")

PROMOTIONS_SHOWN = 5


def round_table(store: Store, latest: int | None = None) -> tuple[list[str], list[tuple]]:
    """The per-round table (columns, rows), oldest round first; only the `latest` rounds
    when given.

    Columns: round, state, pairs, preferences, train_loss (the final step's, 4 decimals),
    incumbent_acc, heldout_acc (the candidate's held-out accuracy), win_rate (candidate
    against incumbent), kl (KL to the reference, 4 decimals), mean_len (mean completion
    length of the candidate, in tokens), promoted. A value the round has not produced yet
    (no evaluation, no verifier, no KL recorded, no promotion decision) is None.
    """
    first = None
    if latest is not None:
        # A bound given as a value reaches the view's aggregates, so only the latest rounds
        # are summarised: 65 ms in a file of 1,000 rounds, against 150 ms for all of them.
        first = store.read(lambda tx: tx.execute(
            "SELECT min(round_id) FROM (SELECT round_id FROM rounds ORDER BY round_id DESC LIMIT ?)",
            [latest]).fetchone()[0])
    return store.query(_ROUND_TABLE_SQL, [first if first is not None else 0])


def format_value(value: Any) -> str:
    """One table cell as text: None is empty, booleans are yes/no."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    return str(value)


def display_rows(rows: Sequence[Sequence[Any]]) -> list[tuple[str, ...]]:
    """Rows with every cell formatted by `format_value`."""
    return [tuple(format_value(value) for value in row) for row in rows]


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table. None is an empty cell, booleans are yes/no, and
    `|` (and line breaks) inside a cell are escaped so that a cell stays one cell."""

    def cell(value: Any) -> str:
        text = format_value(value).replace("\\", "\\\\").replace("|", "\\|")
        return " ".join(text.splitlines())

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |",
             "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_rounds(store: Store, path: str | os.PathLike) -> Path:
    """Write a PNG of the flywheel's curves across rounds to `path`; return the path
    (`plot_round_table` of `round_table(store)`)."""
    return plot_round_table(round_table(store), path)


def plot_round_table(table: tuple[Sequence[str], Sequence[Sequence[Any]]], path: str | os.PathLike) -> Path:
    """Write a PNG of the curves in `round_table`'s (columns, rows) to `path`; return the
    path. A caller that shows the table too passes it here rather than query twice: the
    round_summary view is most of a report's store time.

    Four panels: held-out accuracy of candidate and incumbent ("no verifier" when no round
    has an accuracy), win rate against the incumbent (with the 0.5 line), KL to the
    reference, and mean completion length. Rounds whose candidate was promoted are marked
    in every panel. Rounds without an evaluation yet are left out. With no evaluated round
    at all it still writes a PNG that says so, rather than raising: a flow may call this
    after every round, including one that stopped before evaluating.

    The PNG is written to a temporary file in the same directory and renamed over `path`,
    so a crash leaves the previous PNG or none, never half of one. A path that cannot be
    written raises UserError.
    """
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    columns, table_rows = table
    picked = [list(columns).index(name) for name in _PLOTTED_COLUMNS]
    rows = [[row[i] for i in picked] for row in table_rows if row[picked[3]] is not None]  # evaluated
    rounds = [row[0] for row in rows]
    promoted = [row[0] for row in rows if row[6]]

    figure, axes = _new_figure()
    if not rows:
        figure.text(0.5, 0.5, "no evaluated rounds yet", ha="center", va="center", fontsize=16, color="0.4")
        for ax in axes.flat:
            ax.set_visible(False)
        figure.suptitle("flywheel rounds")
        return _save_atomically(figure, path)
    figure.suptitle(f"flywheel rounds: {len(rounds)} evaluated, {len(promoted)} promoted")
    for ax, (_, series, when_empty) in zip(axes.flat, _PANELS):
        if len(rounds) <= 15:
            ax.set_xticks(rounds)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for number, round_id in enumerate(promoted):
            ax.axvline(round_id, color="tab:green", alpha=0.25, linewidth=6,
                       label="promoted" if number == 0 else None)
        drawn = False
        for label, column in series:
            points = [(row[0], row[column]) for row in rows if row[column] is not None]
            if not points:
                continue
            drawn = True
            style = "o-" if label == "candidate" else "s--"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label,
                    color="tab:blue" if label == "candidate" else "tab:gray")
        if not drawn and when_empty:
            ax.text(0.5, 0.5, when_empty, transform=ax.transAxes, ha="center", va="center",
                    fontsize=13, color="0.4")
        if ax is axes[0][1]:  # win rate
            ax.axhline(0.5, color="tab:red", linestyle=":", linewidth=1, label="win rate 0.5")
        elif not drawn:  # an empty panel gets a plain 0-1 axis
            ax.set_ylim(0, 1)
    # One legend for all panels, under the title, where it cannot cover a curve.
    named = {}
    for ax in axes.flat:
        named.update(zip(*reversed(ax.get_legend_handles_labels())))
    figure.legend(list(named.values()), list(named), loc="lower center", ncol=len(named),
                  bbox_to_anchor=(0.5, 0.91), fontsize=9, frameon=False)
    # Half a round of room each side, so the first and last promoted marks show whole.
    axes[0][0].set_xlim(rounds[0] - 0.5, rounds[-1] + 0.5)
    return _save_atomically(figure, path)


# Panels left to right, top to bottom: title, (series label, column in a plotted row), and
# what to say when no series has a value.
_PANELS = (
    ("held-out accuracy", (("candidate", 1), ("incumbent", 2)), "no verifier"),
    ("win rate against the incumbent", (("candidate", 3),), None),
    ("KL to reference", (("candidate", 4),), "no KL recorded"),
    ("mean completion length (tokens)", (("candidate", 5),), None),
)


def _new_figure() -> tuple[Any, Any]:
    """The plot's figure and its 2x2 panels with titles and grids. The Agg canvas directly,
    not pyplot: no display and no global pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 7.5), dpi=100)
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.07, top=0.865, wspace=0.18, hspace=0.22)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2, sharex=True)
    for ax, (title, _, _) in zip(axes.flat, _PANELS):
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0][1].set_ylim(0, 1)  # win rate
    for ax in axes[1]:
        ax.set_xlabel("round")
    return figure, axes


def _save_atomically(figure: Any, path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from error
    temporary = Path(handle.name)
    try:
        with handle:
            figure.savefig(handle, format="png")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)  # NamedTemporaryFile makes it 0600; a plot is for reading
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise UserError(f"cannot write {path}: {error.strerror or error}") from error
        raise
    return path


# -- the lines of `flywheel status` ---------------------------------------------------------


def status_lines(store: Store, now: datetime | None = None) -> list[str]:
    """One line each: the current policy, unfinished rounds, and who holds the run lease.
    `now` is naive UTC (the store's time), for the heartbeat's age; default the clock."""
    from storage.queue import utc_now

    now = now or utc_now()
    lines = []
    _, policy = store.query(
        "SELECT checkpoint_id, path, role, round_id, promoted_at FROM checkpoints WHERE status = 'promoted' "
        "ORDER BY promoted_at DESC, checkpoint_id DESC LIMIT 1")
    if policy:
        checkpoint_id, checkpoint_path, role, round_id, promoted_at = policy[0]
        origin = "the reference model" if role == "reference" else f"candidate of round {round_id}"
        lines.append(f"policy: checkpoint {checkpoint_id} ({origin}) at {checkpoint_path}, "
                     f"promoted {format_value(promoted_at)}")
    else:
        lines.append("policy: none yet (no checkpoint is promoted)")
    _, unfinished = store.query("SELECT round_id, state FROM rounds WHERE state <> 'done' ORDER BY round_id")
    if unfinished:
        lines += [f"unfinished round: {round_id} (finished step: {state}); the next run resumes it"
                  for round_id, state in unfinished]
    else:
        lines.append("unfinished round: none")
    lines += _phase_lines(store)
    _, lease = store.query("SELECT holder, host, pid, ttl_seconds, heartbeat_at FROM run_lease ORDER BY lease_key")
    if lease:
        holder, host, pid, ttl_seconds, heartbeat_at = lease[0]
        silent = (now - heartbeat_at).total_seconds()
        stale = f"; stale (older than its {ttl_seconds:.0f} s ttl)" if silent > ttl_seconds else ""
        lines.append(f"run lease: held by {holder} (pid {pid} on {host}), last heartbeat "
                     f"{format_value(heartbeat_at)} UTC, {silent:.0f} s ago{stale}")
    else:
        lines.append("run lease: free (no flywheel process is running rounds)")
    return lines


def _phase_lines(store: Store) -> list[str]:
    """The latest round's phases with their seconds and peak GPU memory, and whether the
    sampler's engine slept through training (table round_phases)."""
    _, rows = store.query(
        "SELECT round_id, kind, name, detail, seconds, peak_gpu_bytes FROM round_phases "
        "WHERE round_id = (SELECT max(round_id) FROM round_phases) ORDER BY started_at, phase_id")
    if not rows:
        return []
    round_id = rows[0][0]
    phases = [f"{name} {seconds:.1f} s" + ("" if peak is None else f" {peak / 2**30:.1f} GiB")
              for _, kind, name, _, seconds, peak in rows if kind == "phase"]
    measured = any(peak is not None for *_, peak in rows)
    lines = [f"round {round_id} phases ({'seconds, peak GPU memory' if measured else 'seconds; no GPU'}): "
             + ", ".join(phases)]
    sleeps = [detail for _, kind, name, detail, _, _ in rows if kind == "sampler" and name == "sleep"]
    if sleeps:
        lines.append(f"round {round_id} sampler sleep: {sleeps[-1]}")
    return lines


def recent_promotions(store: Store, limit: int = PROMOTIONS_SHOWN) -> tuple[list[str], list[tuple]]:
    """The last `limit` rows of `promotions` (every promotion decision), newest first."""
    return store.query(
        "SELECT promotion_id AS id, strftime(decided_at, '%Y-%m-%d %H:%M:%S') AS decided_at, action, "
        "checkpoint_id AS checkpoint, round_id AS round, decided_by AS by, reason, "
        "policy_before, policy_after FROM promotions ORDER BY promotion_id DESC LIMIT ?", [limit])
