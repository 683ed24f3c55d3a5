"""Cost that grows as the work grows (issue 24): where the flywheel stops scaling linearly.

    .venv/bin/python benchmarks/scaling.py [--parts rounds pairing store queue]
        [--sizes 512 2048 8192] [--samples 4 8 16] [--history 10 100 1000]
        [--queues 1000 10000 100000] [--labelled-share 0.9] [--labels-per-annotator 100] [--out-dir DIR]
        [--docs-dir DIR] [--quick]

Four measurements on the demo model (`flywheel demo`'s policy and config), each against
the smallest size of the same run:
- rounds: one round at each of `--sizes` prompts a round (n = 4 samples each), every step
  (sample, pair, label, train, evaluate, promote) timed by calling the `Flywheel` method
  that runs it, as `flywheel run` does (without Prefect). Per prompt, and the exponent k
  of a least-squares fit time ~ size^k (1: linear). One vLLM engine serves every round
  (its start is not a round's), and a warm-up round of 64 prompts runs first, so the
  first measured round does not pay the process's first calls.
- pairing: 512 prompts sampled with n = `--samples`, then (the engine closed) the pair
  step of each strategy (`random`, `all`, `best_vs_worst`), the median of 3 runs each on a
  fresh copy of that database: per completion, and the pairs formed. `all` forms
  n(n-1)/2 pairs a prompt: quadratic in n by definition.
- store: a database holding 10, 100 and 1,000 rounds, each a copy of one real demo
  round's rows (the rounds part's round of the smallest size: its completions with their
  real token ids, pairs, labels, reference log-probs, train steps, evaluation,
  checkpoint, promotion and phases), renumbered as the store numbers them. Bytes on disk per
  completion next to its raw token-id bytes (4 bytes an id, prompt and completion ids,
  as each completion row holds them), the bytes of each column of `completions` (that
  column alone in a new database, less an empty one), and the time of `round_summary`,
  `flywheel status` (its function, in this process) and one round's `preferences`.
- queue: 1k, 10k and 100k pairs queued for people (`flywheel label enqueue`'s write),
  and 100k of which 90% are labelled already (`--labelled-share`), `flywheel label serve`
  in its own process, and 4 annotators over HTTP on loopback, each in its own thread,
  labelling as fast as they can, then waiting 0.2-0.8 s between labels: the latency of
  `POST /api/next`, of the label's `POST`, and of both, p50 and p99.

Prints the tables, writes them as markdown to `OUT_DIR/scaling.md` (for
docs/benchmarks.md), and draws them log-log in `scaling.png` in `--docs-dir` (default
docs/; the out dir with --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # label_server and queue_data, shared with the tests

STEPS = ("sample", "pair", "label", "train", "evaluate", "promote")
STRATEGIES = ("random", "all", "best_vs_worst")
ANNOTATORS = 4
# A step's time per prompt at the largest size may be this much its time at the smallest.
LINEAR_LIMIT = 1.2
QUEUE_P99_LIMIT_S = 0.1
WARM_UP_PROMPTS = 64


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def exponent(sizes: list[float], seconds: list[float]) -> float:
    """k of the least-squares line log t = k log s + c: 1 is linear, 2 quadratic."""
    xs, ys = [math.log(s) for s in sizes], [math.log(max(t, 1e-9)) for t in seconds]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


# -- rounds --------------------------------------------------------------------------------


def demo_config(workdir: Path, cache: Path, prompts: int, n: int, memory_share: float, train_prompts: int):
    """`flywheel demo`'s config, `prompts` a round and `n` samples each, with `train_prompts`
    distinct training prompts on disk (the demo writes 4096)."""
    from flywheel.examples.addition import DemoPolicyConfig, demo_flywheel_config, write_demo_prompts

    policy = DemoPolicyConfig()
    config = demo_flywheel_config(workdir, policy, cache, log, prompts_per_round=prompts, n=n,
                                  gpu_memory_utilization=memory_share)
    write_demo_prompts(workdir / "prompts", policy, train_prompts)
    return config


def timed_round(config, sampler) -> dict:
    """One round of `config`'s flywheel, each step timed; its rows counted."""
    from flywheel.rounds import Flywheel
    from storage import tables

    flywheel = Flywheel(config, log=log, sampler=sampler)
    try:
        flywheel.initialise()
        round_id = flywheel.begin_round()
        seconds = {}
        for step in STEPS:
            started = time.perf_counter()
            getattr(flywheel, step)(round_id)
            seconds[step] = time.perf_counter() - started
        with flywheel.store.transaction() as tx:
            counts = {
                "completions": tables.count(tx, "completions", "round_id = ? AND purpose = 'train'", [round_id]),
                "pairs": tables.count(tx, "pairs", "round_id = ?", [round_id]),
                "preferences": tables.count_preferences(tx, round_id),
                "dpo steps": tables.count(tx, "train_steps", "round_id = ?", [round_id]),
            }
    finally:
        flywheel.close()
    return {"seconds": seconds, **counts}


def bench_rounds(out: Path, cache: Path, sizes: list[int], memory_share: float, sampler_box: list) -> list[dict]:
    from flywheel.sampling import VLLMSampler

    results = []
    for label, size in [("warm-up", WARM_UP_PROMPTS), *((None, s) for s in sizes)]:
        config = demo_config(out / f"round-{label or size}", cache, size, 4, memory_share, max(sizes))
        if not sampler_box:
            sampler_box.append(VLLMSampler(config.sample, seed=0))
        log(f"== round of {size} prompts{' (warm-up, not counted)' if label else ''}")
        result = timed_round(config, sampler_box[0])
        log("   " + "  ".join(f"{step} {t:.2f}s" for step, t in result["seconds"].items()))
        if not label:
            results.append({"prompts": size, "database": config.database, **result})
    return results


def rounds_table(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    sizes = [r["prompts"] for r in results]
    columns = ["step", *(f"{s} prompts: s" for s in sizes), *(f"ms/prompt at {s}" for s in sizes),
               f"{sizes[-1]} / {sizes[0]} per prompt", "exponent k", "within 1.2x"]
    rows = []
    for step in (*STEPS, "round"):
        seconds = [sum(r["seconds"].values()) if step == "round" else r["seconds"][step] for r in results]
        per_prompt = [t / s for t, s in zip(seconds, sizes)]
        ratio = per_prompt[-1] / per_prompt[0]
        rows.append([step, *(f"{t:.2f}" for t in seconds), *(f"{1000 * p:.3f}" for p in per_prompt),
                     f"{ratio:.2f}x", f"{exponent(sizes, seconds):.2f}", "yes" if ratio <= LINEAR_LIMIT else "NO"])
    for what in ("completions", "pairs", "preferences", "dpo steps"):
        rows.append([f"({what})", *(str(r[what]) for r in results), *([""] * (len(sizes) + 3))])
    return columns, rows


# -- pairing -------------------------------------------------------------------------------


def bench_pairing(out: Path, cache: Path, samples: list[int], memory_share: float, sampler_box: list,
                  prompts: int, repeat: int) -> list[dict]:
    """Sample `prompts` prompts with each n, close the engine (so it takes no CPU), then time
    each strategy's pair step `repeat` times, each on a fresh copy of the sampled database."""
    from flywheel.rounds import Flywheel
    from flywheel.sampling import VLLMSampler

    sampled = []
    for n in samples:
        config = demo_config(out / f"pairing-n{n}", cache, prompts, n, memory_share, prompts)
        if not sampler_box:
            sampler_box.append(VLLMSampler(replace(config.sample, n=4), seed=0))
        flywheel = Flywheel(config, log=log, sampler=sampler_box[0])
        try:
            flywheel.initialise()
            round_id = flywheel.begin_round()
            sampled.append((n, config, round_id, flywheel.sample(round_id)))
        finally:
            flywheel.close()
    sampler_box.pop().close()
    results = []
    for n, config, round_id, completions in sampled:
        for strategy in STRATEGIES:
            times = []
            for attempt in range(repeat):
                workdir = out / f"pairing-n{n}-{strategy}-{attempt}"
                workdir.mkdir(parents=True, exist_ok=True)
                shutil.copy(config.database, workdir / config.database.name)
                copy = replace(config, workdir=workdir, pair=replace(config.pair, strategy=strategy))
                flywheel = Flywheel(copy, log=log, sampler=NO_SAMPLER)
                try:
                    started = time.perf_counter()
                    pairs = flywheel.pair(round_id)
                    times.append(time.perf_counter() - started)
                finally:
                    flywheel.close()
            results.append({"n": n, "strategy": strategy, "completions": completions, "pairs": pairs,
                            "seconds": statistics.median(times)})
            log(f"   n={n} {strategy}: {pairs} pairs in {results[-1]['seconds']:.3f}s (median of {repeat})")
    return results


class _NoSampler:
    """What a Flywheel that only pairs holds for a sampler (the engine is closed by then)."""

    def take_events(self) -> list:
        return []

    def close(self) -> None:
        pass


NO_SAMPLER = _NoSampler()


def pairing_table(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    samples = sorted({r["n"] for r in results})
    columns = ["strategy", *(f"n={n}: pairs" for n in samples), *(f"n={n}: ms" for n in samples),
               *(f"us/completion n={n}" for n in samples), f"n={samples[-1]} / n={samples[0]} per completion",
               "exponent k (time ~ n^k)"]
    rows = []
    for strategy in STRATEGIES:
        mine = sorted((r for r in results if r["strategy"] == strategy), key=lambda r: r["n"])
        per_completion = [r["seconds"] / r["completions"] for r in mine]
        note = " (n(n-1)/2 pairs a prompt: quadratic by definition)" if strategy == "all" else ""
        rows.append([strategy + note, *(str(r["pairs"]) for r in mine), *(f"{1000 * r['seconds']:.0f}" for r in mine),
                     *(f"{1e6 * p:.1f}" for p in per_completion), f"{per_completion[-1] / per_completion[0]:.2f}x",
                     f"{exponent(samples, [r['seconds'] for r in mine]):.2f}"])
    return columns, rows


# -- the store against history -------------------------------------------------------------

# Per table: the rows of the source round to copy, and its id columns by what they number.
# Each copy k (1, 2, ...) adds k times the source's largest id of that kind, so copies never
# collide; the reference checkpoint (and the prompts) are shared, as in a real flywheel.
COPIED_TABLES = {
    "rounds": ("round_id = 1", {"round_id": "round", "policy_checkpoint_id": "checkpoint",
                                "reference_checkpoint_id": "checkpoint", "candidate_checkpoint_id": "checkpoint"}),
    "checkpoints": ("round_id = 1", {"checkpoint_id": "checkpoint", "parent_checkpoint_id": "checkpoint",
                                     "round_id": "round"}),
    # A round's own eval samples are the candidate's: the incumbent's are reused from its own round.
    "completions": ("round_id = 1 AND (purpose = 'train' OR checkpoint_id <> $reference)",
                    {"completion_id": "completion", "round_id": "round", "checkpoint_id": "checkpoint"}),
    "pairs": ("round_id = 1", {"pair_id": "pair", "round_id": "round", "completion_a_id": "completion",
                               "completion_b_id": "completion"}),
    "labels": ("true", {"label_id": "label", "pair_id": "pair"}),
    "judge_failures": ("true", {"failure_id": "failure", "pair_id": "pair"}),
    "completion_scores": ("true", {"completion_id": "completion"}),
    "reference_logps": ("true", {"completion_id": "completion", "checkpoint_id": "checkpoint"}),
    "train_pairs": ("true", {"checkpoint_id": "checkpoint", "pair_id": "pair"}),
    "train_steps": ("round_id = 1", {"round_id": "round", "checkpoint_id": "checkpoint"}),
    "evals": ("round_id = 1", {"eval_id": "eval", "round_id": "round", "checkpoint_id": "checkpoint",
                               "incumbent_checkpoint_id": "checkpoint"}),
    "promotions": ("round_id = 1", {"promotion_id": "promotion", "checkpoint_id": "checkpoint", "round_id": "round",
                                    "policy_before": "checkpoint", "policy_after": "checkpoint"}),
    "round_phases": ("round_id = 1", {"phase_id": "phase", "round_id": "round"}),
}
STORE_QUERIES = ("round_summary", "flywheel status", "one round's preferences")
ID_OF = {"round": ("rounds", "round_id"), "checkpoint": ("checkpoints", "checkpoint_id"),
         "completion": ("completions", "completion_id"), "pair": ("pairs", "pair_id"), "label": ("labels", "label_id"),
         "failure": ("judge_failures", "failure_id"), "eval": ("evals", "eval_id"),
         "promotion": ("promotions", "promotion_id"), "phase": ("round_phases", "phase_id")}


def table_columns(conn, table: str) -> list[str]:
    return [row[0] for row in conn.execute(
        "SELECT column_name FROM duckdb_columns() WHERE table_name = ? ORDER BY column_index", [table]).fetchall()]


def history_database(source: Path, path: Path, rounds: int) -> None:
    """A copy of `source` (a database of one finished round) holding `rounds` copies of that round."""
    import duckdb

    shutil.copy(source, path)
    with duckdb.connect(str(path)) as conn:
        assert conn.execute("SELECT count(*) FROM rounds").fetchone()[0] == 1, "the source must hold one round"
        reference = conn.execute("SELECT checkpoint_id FROM checkpoints WHERE role = 'reference'").fetchone()[0]
        step = {kind: conn.execute(f"SELECT coalesce(max({column}), 0) FROM {table}").fetchone()[0]
                for kind, (table, column) in ID_OF.items()}
        step["checkpoint"] -= 1  # the reference is not copied
        conn.execute("BEGIN")
        for table, (where, id_columns) in COPIED_TABLES.items():
            columns = table_columns(conn, table)
            values = []
            for column in columns:
                kind = id_columns.get(column)
                if kind is None:
                    values.append(column)
                elif kind == "checkpoint":
                    values.append(f"CASE WHEN {column} = {reference} THEN {column} "
                                  f"ELSE {column} + k * {step['checkpoint']} END")
                else:
                    values.append(f"{column} + k * {step[kind]}")
            # Copy after copy, each in the source's order, as rounds land one after another.
            conn.execute(f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(values)} "
                         f"FROM {table}, range(1, ?) AS copies(k) WHERE {where.replace('$reference', str(reference))} "
                         f"ORDER BY k, {table}.rowid", [rounds])
        conn.execute("COMMIT")
        conn.execute("CHECKPOINT")


def column_bytes(path: Path, table: str, scratch: Path) -> dict[str, int]:
    """Bytes on disk of each column of `table`: a fresh database holding that column alone,
    less an empty database."""
    import duckdb

    def size_with(select: str | None) -> int:
        target = scratch / "column.duckdb"
        target.unlink(missing_ok=True)
        with duckdb.connect(str(target)) as conn:
            if select is not None:
                conn.execute(f"ATTACH '{path}' AS source (READ_ONLY)")
                conn.execute(f"CREATE TABLE c AS SELECT {select} FROM source.{table}")
                conn.execute("DETACH source")
            conn.execute("CHECKPOINT")
        size = target.stat().st_size
        target.unlink()
        return size

    empty = size_with(None)
    with duckdb.connect(str(path), read_only=True) as conn:
        columns = table_columns(conn, table)
    return {column: size_with(column) - empty for column in columns}


def time_call(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_store(out: Path, source: Path, history: list[int], repeat: int) -> list[dict]:
    import duckdb

    from cli.main import main as flywheel_cli
    from storage.store import Store

    results = []
    for rounds in history:
        path = out / f"history-{rounds}.duckdb"
        path.unlink(missing_ok=True)
        started = time.perf_counter()
        history_database(source, path, rounds)
        built = time.perf_counter() - started
        with duckdb.connect(str(path), read_only=True) as conn:
            completions, raw = conn.execute(
                "SELECT count(*), sum(4 * (len(prompt_token_ids) + len(token_ids))) FROM completions").fetchone()
            pairs = conn.execute("SELECT count(*) FROM pairs").fetchone()[0]
            middle = conn.execute("SELECT round_id FROM rounds ORDER BY round_id LIMIT 1 OFFSET ?",
                                  [rounds // 2]).fetchone()[0]
        store = Store.open(path)

        def status() -> None:
            with contextlib.redirect_stdout(io.StringIO()):
                flywheel_cli(["status", "--db", str(path)])

        result = {
            "rounds": rounds, "completions": completions, "pairs": pairs, "file bytes": path.stat().st_size,
            "raw token bytes": raw, "built s": built,
            "round_summary": time_call(lambda: store.query("SELECT * FROM round_summary"), repeat),
            "flywheel status": time_call(status, repeat),
            "one round's preferences": time_call(
                lambda: store.query("SELECT * FROM preferences WHERE round_id = ?", [middle]), repeat),
        }
        results.append(result)
        log(f"   {rounds} rounds: {completions} completions, {result['file bytes'] / 2**20:.1f} MiB, "
            + ", ".join(f"{q} {1000 * result[q]:.0f} ms" for q in STORE_QUERIES))
    results[-1]["column bytes"] = column_bytes(out / f"history-{history[-1]}.duckdb", "completions", out)
    return results



def store_tables(results: list[dict]) -> list[tuple[list[str], list[list[str]]]]:
    columns = ["rounds in the file", "completions", "pairs", "MiB on disk", "bytes / completion",
               "raw token-id bytes / completion", "ratio", *(f"{q}, ms" for q in STORE_QUERIES)]
    rows = [[str(r["rounds"]), f"{r['completions']:,}", f"{r['pairs']:,}", f"{r['file bytes'] / 2**20:.1f}",
             f"{r['file bytes'] / r['completions']:.0f}", f"{r['raw token bytes'] / r['completions']:.0f}",
             f"{r['file bytes'] / r['raw token bytes']:.2f}x", *(f"{1000 * r[q]:.0f}" for q in STORE_QUERIES)]
            for r in results]
    last = results[-1]
    by_column = sorted(last["column bytes"].items(), key=lambda item: -item[1])
    column_rows = [[name, f"{size / last['completions']:.1f}", f"{100 * size / sum(last['column bytes'].values()):.0f}%"]
                   for name, size in by_column]
    return [(columns, rows), (["column of completions", "bytes / completion", "share"], column_rows)]


# -- the labelling queue ---------------------------------------------------------------------


def queued_database(path: Path, pairs: int, labelled: int = 0) -> list[str]:
    """A store with one round of `pairs` pairs queued for people, one label each
    (`tests/queue_data.round_with_pairs`), the first `labelled` of them labelled already
    (people's labels, as `flywheel label import` brings them), and ANNOTATORS annotators;
    returns their tokens."""
    from judges.human import HUMAN_JUDGE_NAME, new_annotator
    from queue_data import round_with_pairs
    from storage import queue, tables
    from storage.records import Label
    from storage.store import Store

    store = Store.create(path)
    round_id = round_with_pairs(store, pairs)
    tokens = [new_annotator(store, f"annotator{i}") for i in range(ANNOTATORS)]
    with store.transaction() as tx:
        queue.request_labels(tx, round_id, judge_version="1", labels_per_pair=1, lease_seconds=600,
                             now=queue.utc_now())
        first = [row[0] for row in tx.execute("SELECT pair_id FROM label_queue ORDER BY pair_id LIMIT ?",
                                              [labelled]).fetchall()]
        tables.add_labels(tx, [Label(pair_id, "a", HUMAN_JUDGE_NAME, "1", annotator=f"annotator{i % ANNOTATORS}")
                               for i, pair_id in enumerate(first)])
    return tokens


def label(url: str, token: str, labels: int, think_s: tuple[float, float], latencies: dict[str, list[float]],
          seed: int) -> None:
    """`labels` times: lease the next pair, label it, then wait a random think time."""
    import random

    import httpx

    rng = random.Random(seed)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        for _ in range(labels):
            started = time.perf_counter()
            response = client.post("/api/next")
            response.raise_for_status()
            lease = response.json()["lease"]
            leased = time.perf_counter()
            client.post(f"/api/pairs/{lease['pair_id']}/label",
                        json={"lease_id": lease["lease_id"], "choice": "left"}).raise_for_status()
            done = time.perf_counter()
            latencies["next"].append(leased - started)
            latencies["label"].append(done - leased)
            latencies["next + label"].append(done - started)
            time.sleep(rng.uniform(*think_s))


# How the 4 annotators label: as fast as they can (the server's capacity), and with a
# think time between labels (8 labels a second in all, faster than 4 people read).
PACES = {"as fast as possible": (0.0, 0.0), "0.2-0.8 s between labels": (0.2, 0.8)}
LATENCIES = ("next", "label", "next + label")


def bench_queue(out: Path, queues: list[int], labelled_share: float, labels_per_client: int) -> list[dict]:
    """Each queue length with nothing labelled yet, and the longest with `labelled_share`
    of its pairs labelled already."""
    # The clients are threads of this process, which holds torch and vLLM after the other
    # parts: Python's collector then walked that heap in the middle of their requests
    # (next p99 142 ms at 1k pairs, against 90 ms in a process that ran the queue part
    # alone). Frozen, it is left alone.
    gc.collect()
    gc.freeze()
    results = []
    states = [(pairs, 0) for pairs in queues]
    if labelled_share > 0:
        states.append((queues[-1], round(labelled_share * queues[-1])))
    for pairs, labelled in states:
        path = out / f"queue-{pairs}-{labelled}.duckdb"
        path.unlink(missing_ok=True)
        for suffix in (".wal", ".waiting"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        tokens = queued_database(path, pairs, labelled)
        from label_server import labelling_server

        with labelling_server(path) as url:
            label(url, tokens[0], 5, (0.0, 0.0), {k: [] for k in LATENCIES}, seed=0)  # the server's first calls
            for pace, think_s in PACES.items():
                latencies: dict[str, list[float]] = {k: [] for k in LATENCIES}
                clients = [threading.Thread(target=label, args=(url, token, labels_per_client, think_s, latencies, i))
                           for i, token in enumerate(tokens)]
                started = time.perf_counter()
                for client in clients:
                    client.start()
                for client in clients:
                    client.join()
                elapsed = time.perf_counter() - started
                expected = ANNOTATORS * labels_per_client
                if len(latencies["next"]) != expected:
                    raise RuntimeError(f"{expected - len(latencies['next'])} labels failed (see the errors above)")
                result = {"pairs": pairs, "labelled": labelled, "pace": pace, "labels per second": expected / elapsed,
                          **{f"{what} p{q}": percentile(values, q / 100)
                             for what, values in latencies.items() for q in (50, 99)}}
                results.append(result)
                log(f"   {pairs} queued, {labelled} labelled, {pace}: " + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in result.items()
                                                          if k.endswith(("p50", "p99"))))
    return results


def queue_table(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    columns = ["pairs queued", "labelled before", "4 annotators label",
               *(f"{k} p{q}, ms" for k in LATENCIES for q in (50, 99)), "labels / s (all 4)",
               "p99 of each request < 100 ms"]
    rows = [[f"{r['pairs']:,}", f"{r['labelled']:,}", r["pace"], *(f"{1000 * r[f'{k} p{q}']:.0f}" for k in LATENCIES for q in (50, 99)),
             f"{r['labels per second']:.0f}",
             "yes" if max(r["next p99"], r["label p99"]) < QUEUE_P99_LIMIT_S else "NO"]
            for r in results]
    return columns, rows


# -- the report ------------------------------------------------------------------------------


def plot(rounds, pairing, store, queue_results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p, results in (("rounds", rounds), ("pairing", pairing), ("store", store),
                                   ("queue", queue_results)) if results]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        axis.set_xscale("log")
        axis.set_yscale("log")
        if panel == "rounds":
            sizes = [r["prompts"] for r in rounds]
            for step in STEPS:
                axis.plot(sizes, [r["seconds"][step] for r in rounds], "o-", label=step)
            axis.plot(sizes, [rounds[0]["seconds"]["sample"] * s / sizes[0] for s in sizes], "k:", label="linear")
            axis.set(xlabel="prompts a round (n = 4)", ylabel="seconds", title="round steps")
        elif panel == "pairing":
            for strategy in STRATEGIES:
                mine = sorted((r for r in pairing if r["strategy"] == strategy), key=lambda r: r["n"])
                axis.plot([r["n"] for r in mine], [r["seconds"] for r in mine], "o-", label=strategy)
            axis.set(xlabel="samples per prompt n (512 prompts)", ylabel="seconds of the pair step", title="pairing")
        elif panel == "store":
            for query in STORE_QUERIES:
                axis.plot([r["rounds"] for r in store], [1000 * r[query] for r in store], "o-", label=query)
            axis.set(xlabel="rounds in the file", ylabel="ms", title="queries against history")
        else:
            for pace in PACES:
                mine = [r for r in queue_results if r["pace"] == pace and not r["labelled"]]
                labelled = [r for r in queue_results if r["pace"] == pace and r["labelled"]]
                for q, style in ((50, "o-"), (99, "s--")):
                    line, = axis.plot([r["pairs"] for r in mine], [1000 * r[f"next + label p{q}"] for r in mine],
                                      style, label=f"p{q}, {pace}")
                    axis.plot([r["pairs"] for r in labelled], [1000 * r[f"next + label p{q}"] for r in labelled],
                              "x", color=line.get_color(), markersize=9)
            axis.axhline(1000 * QUEUE_P99_LIMIT_S, color="grey", linewidth=0.8)
            axis.set(xlabel="pairs queued (x: 90% labelled before)", ylabel="ms, next + label",
                     title="labelling queue, 4 annotators")
        axis.legend(fontsize=7)
        axis.grid(True, which="both", linewidth=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def text_table(columns: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Where the flywheel's cost stops growing linearly: round steps "
                                     "against prompts a round, pairing against samples per prompt, the store "
                                     "against rounds kept, the labelling queue against its length.")
    parser.add_argument("--parts", nargs="+", choices=("rounds", "pairing", "store", "queue"),
                        default=["rounds", "pairing", "store", "queue"], help="what to measure (default: all)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="prompts a round (default: 512 2048 8192; 128 512 with --quick)")
    parser.add_argument("--samples", type=int, nargs="+", default=None,
                        help="samples per prompt for pairing (default: 4 8 16; 4 8 with --quick)")
    parser.add_argument("--history", type=int, nargs="+", default=None,
                        help="rounds kept in the file (default: 10 100 1000; 10 100 with --quick)")
    parser.add_argument("--queues", type=int, nargs="+", default=None,
                        help="pairs queued for people (default: 1000 10000 100000; 1000 10000 with --quick)")
    parser.add_argument("--labelled-share", type=float, default=0.9,
                        help="also measure the longest queue with this share of its pairs labelled before "
                        "(default: %(default)s; 0: not)")
    parser.add_argument("--labels-per-annotator", type=int, default=None,
                        help="labels each of the 4 annotators gives per measurement (default: 100; 20 with --quick)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each store query, median (default: 5)")
    parser.add_argument("--out-dir", type=Path, default=None, help="where databases go (default: a temporary one)")
    parser.add_argument("--docs-dir", type=Path, default=None,
                        help="where scaling.png goes (default: docs/; the out dir with --quick)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.15,
                        help="vLLM's share of GPU memory (on CPU: of RAM) (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a development run on small sizes")
    args = parser.parse_args(argv)
    sizes = sorted(args.sizes or ([128, 512] if args.quick else [512, 2048, 8192]))
    samples = sorted(args.samples or ([4, 8] if args.quick else [4, 8, 16]))
    history = sorted(args.history or ([10, 100] if args.quick else [10, 100, 1000]))
    queues = sorted(args.queues or ([1000, 10000] if args.quick else [1000, 10000, 100000]))
    labels_per_annotator = args.labels_per_annotator or (20 if args.quick else 100)
    for name, values in (("--sizes", sizes), ("--samples", samples), ("--history", history), ("--queues", queues)):
        if len(values) < 2 or values[0] < 1:
            parser.error(f"{name} needs at least two sizes, each at least 1")
    if not 0 <= args.labelled_share < 1:
        parser.error(f"--labelled-share must be at least 0 and below 1, got {args.labelled_share}")
    from flywheel.examples.addition import DemoPolicyConfig, split_operands

    available = len(split_operands(DemoPolicyConfig())[0])
    if max(sizes) > available:
        parser.error(f"--sizes: the demo has {available} training prompts, fewer than {max(sizes)}")
    if "store" in args.parts and "rounds" not in args.parts:
        parser.error("the store part copies the rounds part's round of the smallest size: measure rounds too")
    out = (args.out_dir or Path(tempfile.mkdtemp(prefix="scaling-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    docs = (args.docs_dir or (out if args.quick else ROOT / "docs")).resolve()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cache = Path(os.environ.get("FLYWHEEL_CACHE", Path.home() / ".cache" / "flywheel"))
    started = time.monotonic()
    log(f"databases in {out}")

    rounds = pairing = store = queue_results = []
    sampler_box: list = []
    try:
        if "rounds" in args.parts:
            rounds = bench_rounds(out, cache, sizes, args.gpu_memory_utilization, sampler_box)
        if "pairing" in args.parts:
            log("== pairing")
            pairing = bench_pairing(out, cache, samples, args.gpu_memory_utilization, sampler_box, prompts=512,
                                    repeat=3)
    finally:
        if sampler_box:
            sampler_box[0].close()
    if "store" in args.parts:
        log("== the store against history")
        store = bench_store(out, rounds[0]["database"], history, args.repeat)
    if "queue" in args.parts:
        log("== the labelling queue")
        queue_results = bench_queue(out, queues, args.labelled_share, labels_per_annotator)
    elapsed = time.monotonic() - started

    sections = []
    if rounds:
        sections.append(("Round steps against prompts a round (n = 4), one round each", [rounds_table(rounds)]))
    if pairing:
        sections.append(("The pair step against samples per prompt (512 prompts)", [pairing_table(pairing)]))
    if store:
        sections.append(("The store against rounds kept (copies of the first size's round)", store_tables(store)))
    if queue_results:
        sections.append(("The labelling queue: POST /api/next, then the label's POST, 4 annotators over HTTP",
                         [queue_table(queue_results)]))
    command = " ".join(["benchmarks/scaling.py", *(argv if argv is not None else sys.argv[1:])]).strip()
    for title, tables in sections:
        print(f"\n{title}")
        for columns, rows in tables:
            print(text_table(columns, rows) + "\n")
    docs.mkdir(parents=True, exist_ok=True)
    plot(rounds, pairing, store, queue_results, docs / "scaling.png")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    body = [f"`{command}`, {time.strftime('%Y-%m-%d')}, {machine}, {elapsed / 60:.1f} min", ""]
    for title, tables in sections:
        body += [f"{title}:", ""]
        for columns, rows in tables:
            body += [markdown_table(columns, rows), ""]
    (out / "scaling.md").write_text("\n".join(body))
    log(f"wrote {out / 'scaling.md'} and {docs / 'scaling.png'} in {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
