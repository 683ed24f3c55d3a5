"""The report on a real store, filled through the store's own methods: the per-round table,
its markdown, the PNG of the curves, and `flywheel status` (no vLLM, no model)."""

import os
from datetime import timedelta

import pytest

from cli.main import main
from flywheel.report import markdown_table, plot_rounds, recent_promotions, round_table, status_lines
from storage.lease import RunLease, take_lease
from storage.queue import utc_now
from storage.records import Completion, Evaluation, Label, Pair, StepMetrics, TrainStep
from storage.store import Store
from storage import tables

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOT_SIZE = (750, 1100)  # rows, columns: 11 x 7.5 inches at 100 dpi

# Per evaluated round: (held-out accuracy, incumbent accuracy, win rate, KL, mean length,
# final train loss, promoted). Round 3 is started and sampled, never evaluated.
ROUNDS = [
    (0.6131, 0.451, 0.5624, 0.01234, 3.37, 0.6489, True),
    (0.5800, 0.6131, 0.4811, 0.03456, 4.0, 0.6011, False),
]


@pytest.fixture(autouse=True)
def _restore_environment(monkeypatch):
    # main() sets these with setdefault; set them first so monkeypatch restores them after.
    for name, value in (("VLLM_LOGGING_LEVEL", "WARNING"), ("PREFECT_LOGGING_LEVEL", "WARNING"),
                        ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("TOKENIZERS_PARALLELISM", "false")):
        monkeypatch.setenv(name, os.environ.get(name, value))


def _completion(prompt_id, checkpoint_id, index, text, round_id, purpose="train"):
    return Completion(prompt_id, checkpoint_id, purpose, index, text, [1, 2], [3] * (index + 1),
                      -1.0, "stop", {"temperature": 1.0}, round_id=round_id)


def _round(store, policy, reference, evaluated, accuracy=True, kl=True):
    """One round through the store's steps: sample, pair, label, train, evaluate, promote.
    `evaluated` is a row of ROUNDS, or None for a round that stops after sampling."""
    with store.transaction() as tx:
        round_id = tables.start_round(tx, policy, reference, seed=7, config={})
        (prompt_id,) = tables.add_prompts(tx, [f"prompt of round {round_id}"], "train")
        ids = tables.add_completions(tx, [_completion(prompt_id, policy, i, t, round_id) for i, t in enumerate("wxyz")])
        tables.finish_step(tx, round_id, "sampled")
    if evaluated is None:
        return round_id, None
    acc, incumbent_acc, win, kl_value, length, final_loss, promoted = evaluated
    with store.transaction() as tx:
        pair_ids = tables.add_pairs(tx, [Pair(round_id, prompt_id, ids[0], ids[1], "random"),
                                 Pair(round_id, prompt_id, ids[2], ids[3], "random")])
        tables.finish_step(tx, round_id, "paired")
        tables.claim_round_judge(tx, round_id, "rule", "1")
        tables.add_labels(tx, [Label(pair_ids[0], "a", "rule", "1"), Label(pair_ids[1], "tie", "rule", "1")])
        tables.finish_step(tx, round_id, "labelled")
        candidate = tables.add_checkpoint(tx, f"/ckpt/round-{round_id}", "candidate", "candidate",
                                      parent_checkpoint_id=policy, round_id=round_id)
        tables.add_train_steps(tx, [TrainStep(round_id, candidate, StepMetrics(step, loss, 0.1, -0.1, 0.2, 0.5, 1.0,
                                                                       1e-4, 1, 100.0, pair_ids=(pair_ids[0],)))
                            for step, loss in ((1, 0.69), (2, final_loss))])
        tables.finish_step(tx, round_id, "trained", candidate_checkpoint_id=candidate)
        tables.add_evaluation(tx, Evaluation(round_id, candidate, policy, num_prompts=8, num_samples=32,
                                     accuracy=acc if accuracy else None,
                                     incumbent_accuracy=incumbent_acc if accuracy else None,
                                     win_rate=win, mean_length=length, kl_to_reference=kl_value if kl else None))
        tables.finish_step(tx, round_id, "evaluated")
    with store.transaction() as tx:
        tables.set_checkpoint_status(tx, candidate, "promoted" if promoted else "rejected")
        tables.record_promotion(tx, candidate, "promote" if promoted else "reject", "gate", "accuracy | margin",
                            round_id, policy_before=policy)
        tables.finish_step(tx, round_id, "done")
    return round_id, candidate


def build_store(path, accuracy=True, kl=True):
    """Two evaluated rounds (the first promoted) and a third stopped after sampling."""
    store = Store.create(path)
    with store.transaction() as tx:
        reference = tables.add_checkpoint(tx, "/models/sft", "reference", "promoted")
    policy = reference
    candidates = []
    for evaluated in ROUNDS:
        _, candidate = _round(store, policy, reference, evaluated, accuracy, kl)
        candidates.append(candidate)
        if evaluated[-1]:
            policy = candidate
    _round(store, policy, reference, None)
    return store, reference, candidates


def as_dicts(columns, rows):
    return [dict(zip(columns, row)) for row in rows]


def test_round_table_shows_what_was_stored(tmp_path):
    store, _, _ = build_store(tmp_path / "fw.duckdb")
    columns, rows = round_table(store)
    assert columns == ["round", "state", "pairs", "preferences", "train_loss", "incumbent_acc", "heldout_acc",
                       "win_rate", "kl", "mean_len", "promoted"]
    table = as_dicts(columns, rows)
    assert [r["round"] for r in table] == [1, 2, 3]
    assert [r["state"] for r in table] == ["done", "done", "sampled"]
    for row, (acc, incumbent_acc, win, kl, length, loss, promoted) in zip(table, ROUNDS):
        assert (row["pairs"], row["preferences"]) == (2, 1)
        assert row["heldout_acc"] == round(acc, 3) and row["incumbent_acc"] == round(incumbent_acc, 3)
        assert row["win_rate"] == round(win, 3)
        assert row["kl"] == round(kl, 4)
        assert row["train_loss"] == round(loss, 4)
        assert row["mean_len"] == round(length, 1)
        assert row["promoted"] is promoted
    # The round still running has nothing measured and no promotion decision yet.
    assert table[2] == dict.fromkeys(columns) | {"round": 3, "state": "sampled", "pairs": 0, "preferences": 0}


def test_round_table_with_no_verifier_and_no_kl(tmp_path):
    store, _, _ = build_store(tmp_path / "fw.duckdb", accuracy=False, kl=False)
    table = as_dicts(*round_table(store))
    assert all(r["heldout_acc"] is None and r["incumbent_acc"] is None and r["kl"] is None for r in table)
    assert [r["win_rate"] for r in table] == [0.562, 0.481, None]


def test_markdown_table(tmp_path):
    store, _, _ = build_store(tmp_path / "fw.duckdb")
    columns, rows = round_table(store)
    lines = markdown_table(columns, rows).splitlines()
    assert lines[0] == "| " + " | ".join(columns) + " |"
    assert lines[1] == "| " + " | ".join(["---"] * len(columns)) + " |"
    assert len(lines) == 2 + 3
    assert lines[2].startswith("| 1 | done | 2 | 1 | 0.6489 | 0.451 | 0.613 | 0.562 | 0.0123 | 3.4 | yes |")
    assert lines[3].endswith("| no |")
    assert lines[4] == "| 3 | sampled | 0 | 0 |  |  |  |  |  |  |  |"  # None is an empty cell
    escaped = markdown_table(["a|b", "c"], [("x | y", None), ("two\nlines", True)]).splitlines()
    assert escaped[0] == "| a\\|b | c |"
    assert escaped[2:] == ["| x \\| y |  |", "| two lines | yes |"]
    assert markdown_table(["a"], []).splitlines() == ["| a |", "| --- |"]


def _read_png(path):
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return matplotlib.image.imread(path)


@pytest.mark.parametrize("accuracy", [True, False], ids=["verifier", "no-verifier"])
def test_plot_rounds_writes_a_png_atomically(tmp_path, accuracy):
    store, _, _ = build_store(tmp_path / "fw.duckdb", accuracy=accuracy, kl=accuracy)
    plots = tmp_path / "plots"
    path = plot_rounds(store, plots / "rounds.png")
    assert path == plots / "rounds.png"
    image = _read_png(path)
    assert image.shape[:2] == PLOT_SIZE and image.std() > 0.01  # something is drawn
    assert sorted(p.name for p in plots.iterdir()) == ["rounds.png"]  # no temporary file left
    assert plot_rounds(store, path) == path  # overwriting works too
    assert sorted(p.name for p in plots.iterdir()) == ["rounds.png"]


def test_plot_rounds_with_no_evaluated_round(tmp_path):
    store = Store.create(tmp_path / "fw.duckdb")
    empty = _read_png(plot_rounds(store, tmp_path / "empty.png"))
    assert empty.shape[:2] == PLOT_SIZE
    with store.transaction() as tx:
        reference = tables.add_checkpoint(tx, "/models/sft", "reference", "promoted")
    _round(store, reference, reference, None)  # round 1 stopped before evaluating
    assert _read_png(plot_rounds(store, tmp_path / "one.png")).shape[:2] == PLOT_SIZE


def test_a_plot_drawn_after_others_is_the_one_drawn_first(tmp_path):
    """Each call draws its own figure: nothing of an earlier plot (its lines, texts, legend,
    y range, x ticks of more than 15 rounds, or 'no evaluated rounds' state) may show in
    the next one."""
    from flywheel.report import plot_round_table

    columns, _ = round_table(Store.create(tmp_path / "empty.duckdb"))

    def table(rounds, verifier=True, scale=1.0):
        return columns, [(r, "done", 8, 6, 0.5, 0.4 if verifier else None, 0.4 + 0.01 * r if verifier else None,
                          0.5 + 0.01 * (r % 3), 0.01 * r * scale if verifier else None, 3.0 * scale + r % 2,
                          r % 2 == 0) for r in range(1, rounds + 1)]

    tables = {"narrow": table(3), "wide": table(20, verifier=False, scale=100.0), "empty": (columns, [])}
    fresh = {}
    for name, rows in tables.items():
        fresh[name] = _read_png(plot_round_table(rows, tmp_path / f"fresh-{name}.png"))
    assert not (fresh["narrow"] == fresh["wide"]).all()
    for name in ("narrow", "wide", "empty", "narrow", "empty", "wide", "narrow"):
        redrawn = _read_png(plot_round_table(tables[name], tmp_path / "redrawn.png"))
        assert (redrawn == fresh[name]).all(), f"{name} redrawn differs from {name} drawn fresh"


def test_a_crash_while_plotting_keeps_the_old_png(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    store, _, _ = build_store(tmp_path / "fw.duckdb")
    plots = tmp_path / "plots"
    path = plot_rounds(store, plots / "rounds.png")
    before = path.read_bytes()

    def half_then_crash(self, file, **kwargs):
        file.write(PNG_SIGNATURE + b"half")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(Figure, "savefig", half_then_crash)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        plot_rounds(store, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in plots.iterdir()) == ["rounds.png"]


def test_status_lines_and_promotions(tmp_path):
    store, reference, (first, second) = build_store(tmp_path / "fw.duckdb")
    now = utc_now()
    lines = status_lines(store, now=now)
    assert lines[0].startswith(f"policy: checkpoint {first} (candidate of round 1) at /ckpt/round-1")
    assert lines[1].startswith("unfinished round: 3 (finished step: sampled)")
    assert lines[2] == "run lease: free (no flywheel process is running rounds)"
    with store.transaction() as tx:
        take_lease(tx, RunLease("runner-1", "gpu-host", 4242, 60.0, now - timedelta(seconds=200),
                                now - timedelta(seconds=90)))
    lease_line = status_lines(store, now=now)[2]
    assert "held by runner-1 (pid 4242 on gpu-host)" in lease_line and "90 s ago" in lease_line
    assert "stale" in lease_line
    columns, rows = recent_promotions(store)
    table = as_dicts(columns, rows)
    assert [(r["action"], r["checkpoint"], r["round"]) for r in table] == [("reject", second, 2), ("promote", first, 1)]
    assert table[1]["policy_before"] == reference and table[1]["policy_after"] == first


def _table_rounds(output):
    """Round numbers of the rows of the printed round table."""
    from storage.records import ROUND_STATES

    rounds = []
    for line in output.splitlines():
        cells = [c for c in line.replace("│", " ").replace("|", " ").split()]
        if len(cells) >= 2 and cells[0].isdigit() and cells[1] in ROUND_STATES:
            rounds.append(int(cells[0]))
    return rounds


def test_status_command(tmp_path, capsys):
    database = tmp_path / "fw.duckdb"
    _, _, (first, _) = build_store(database)
    plot = tmp_path / "out" / "rounds.png"
    assert main(["status", "--db", str(database), "--plot", str(plot)]) == 0
    out, err = capsys.readouterr()
    assert "flywheel rounds" in out
    assert _table_rounds(out) == [1, 2, 3]
    assert f"policy: checkpoint {first} (candidate of round 1) at /ckpt/round-1" in out
    assert "unfinished round: 3 (finished step: sampled)" in out
    assert "run lease: free" in out
    assert "last promotion decisions" in out and "reject" in out
    assert str(plot) in err
    assert _read_png(plot).shape[:2] == PLOT_SIZE


def test_status_prints_the_latest_rounds_and_says_how_many_it_left_out(tmp_path, capsys):
    from cli.main import ROUNDS_SHOWN

    database = tmp_path / "fw.duckdb"
    store, reference, _ = build_store(database)  # rounds 1-3
    for _ in range(ROUNDS_SHOWN):
        _round(store, reference, reference, None)
    total = ROUNDS_SHOWN + 3
    assert main(["status", "--db", str(database)]) == 0
    out, _ = capsys.readouterr()
    assert _table_rounds(out) == list(range(4, total + 1))
    assert "(3 earlier rounds not shown: flywheel status" in out and "--all-rounds" in out
    assert main(["status", "--db", str(database), "--all-rounds"]) == 0
    out, _ = capsys.readouterr()
    assert _table_rounds(out) == list(range(1, total + 1)) and "earlier round" not in out


def test_status_of_a_new_database(tmp_path, capsys):
    database = tmp_path / "fw.duckdb"
    Store.create(database)
    assert main(["status", "--db", str(database)]) == 0
    out, _ = capsys.readouterr()
    assert _table_rounds(out) == []
    assert "policy: none yet" in out and "unfinished round: none" in out
    assert "last promotion decisions" not in out


def test_status_of_a_missing_database(tmp_path, capsys):
    missing = tmp_path / "nope.duckdb"
    assert main(["status", "--db", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip().splitlines() == [f"flywheel: error: no flywheel database at {missing}"]
    assert not missing.exists()


def test_plot_to_a_path_that_cannot_be_written(tmp_path):
    from flywheel.errors import UserError

    store = Store.create(tmp_path / "fw.duckdb")
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(UserError, match="cannot write"):
        plot_rounds(store, tmp_path / "a-file" / "rounds.png")


def test_status_shows_the_latest_rounds_phases_with_their_gpu_memory(tmp_path):
    from storage import tables
    from storage.records import RoundPhase

    store, _, _ = build_store(tmp_path / "fw.duckdb")
    start = utc_now()
    rows = [RoundPhase(1, "phase", "sample", None, start, 3.0, None),
            RoundPhase(2, "phase", "sample", None, start, 2.04, 30 * 2**30),
            RoundPhase(2, "sampler", "sleep", "level 1: weights offloaded to host memory, KV cache freed",
                       start + timedelta(seconds=2), 0.5, None),
            RoundPhase(2, "phase", "train", None, start + timedelta(seconds=3), 10.0, 52.5 * 2**30)]
    with store.transaction() as tx:
        tables.add_round_phases(tx, rows)
    lines = status_lines(store)
    assert "round 2 phases (seconds, peak GPU memory): sample 2.0 s 30.0 GiB, train 10.0 s 52.5 GiB" in lines
    assert "round 2 sampler sleep: level 1: weights offloaded to host memory, KV cache freed" in lines
