"""Online versus offline DPO on the demo task, at equal label budget (issue 7).

    .venv/bin/python benchmarks/online_vs_offline.py [--rounds 6] [--seeds 0 1 2]
        [--prompts-per-round 768] [--label-budget 400] [--steps-per-round 16]
        [--noise 0.8] [--nll-weight 1.0] [--out-dir DIR] [--quick]

Two variants of the demo flywheel (`flywheel demo`'s config: rule judge, random pairing,
DPO + NLL, lr 3e-4, promotion by held-out accuracy), each run for `--rounds` rounds with
each seed:
- online: every round samples its pairs from the current (promoted) policy
  (`sample.source = "current"`, the flywheel's default);
- offline: every round samples its pairs from the initial (SFT) policy
  (`sample.source = "initial"`), so all the pairs it ever trains on are from the policy
  it started with.
The same label budget: every round of both labels exactly `--label-budget` pairs
(`pair.max_pairs_per_round`: a seeded random subset of the pairs the round's prompts
form; enough prompts are sampled that both always form more). The same training: exactly
`--steps-per-round` DPO steps of 32 preferences a round (`train.steps_per_round`),
however many of the labelled pairs have a winner. Everything else is the same too:
prompts per round, pairing, judge, evaluation and promotion gate. The script checks the
budgets from the store (labels and steps per run) and says so if they differ.

Accuracy is that of the policy the flywheel holds after each round (the promoted
checkpoint), at temperature 1, on the demo's 256 held-out sums x 4 samples; round 0 is
the initial policy. All flywheels start from the same cached policy, built by the demo's
recipe (`DemoPolicyConfig(seed=0, noise=--noise)`): by default a weaker one than the
demo's, right about 22 % of the time, not 44 %; `--noise 0.5` starts from the demo's own.
The seed goes into `FlywheelConfig.seed` (which prompts each round draws, sampling,
pairing, the budget's subset, training order and the evaluation samples). One vLLM engine
is shared by every flywheel in the process.

Prints a table per run and the means per round, and writes a markdown table and a PNG
(docs/online_vs_offline_noise<NOISE>.md and .png; with --quick, into the output
directory). A killed run resumes: rerun with the same --out-dir and finished rounds are
not run again.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {"online": "current", "offline": "initial"}
# The initial policy's share of near-miss SFT answers. The demo's policy has 0.5 (right
# about 44 % of the time at temperature 1); by default this experiment starts from a weaker
# one (right about 22 %), where labels spent on the initial policy's samples are mostly ties.
DEFAULT_NOISE = 0.8


@dataclass
class Run:
    variant: str
    seed: int
    accuracy: list[float] = field(default_factory=list)  # held policy, after round 0..R
    candidate_accuracy: list[float] = field(default_factory=list)  # round 1..R, before the gate
    preferences_per_round: list[int] = field(default_factory=list)  # labels with a winner, round 1..R
    kl: float = 0.0  # the final held policy's KL to the initial policy, on held-out prompts
    labels: int = 0
    preferences: int = 0
    steps: int = 0
    promoted: int = 0
    seconds: float = 0.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_config(workdir: Path, policy_config, cache: Path, seed: int, source: str, prompts_per_round: int,
                label_budget: int, steps_per_round: int, nll_weight: float, memory_share: float):
    """`flywheel demo`'s config with the flywheel seed, the sample source, the label budget
    and fixed steps per round, and the shared engine's memory share (every flywheel's engine
    settings must match the shared engine's)."""
    from flywheel.examples.addition import demo_flywheel_config

    config = demo_flywheel_config(workdir, policy_config, cache, log, nll_weight=nll_weight, seed=seed, source=source,
                                  prompts_per_round=prompts_per_round, gpu_memory_utilization=memory_share)
    return replace(config, pair=replace(config.pair, max_pairs_per_round=label_budget),
                   train=replace(config.train, epochs=1, steps_per_round=steps_per_round))


def run_flywheel(config, rounds: int, sampler) -> None:
    from flywheel.rounds import Flywheel
    from storage import tables as store_tables

    flywheel = Flywheel(config, log=log, sampler=sampler)
    try:
        flywheel.initialise()
        for _ in range(rounds - flywheel.store.read(store_tables.count, "rounds", "state = 'done'")):
            flywheel.run_round()
    finally:
        flywheel.close()


def read_run(database: Path, variant: str, seed: int, rounds: int) -> Run:
    import duckdb

    with duckdb.connect(str(database), read_only=True) as conn:
        rows = conn.execute(
            "SELECT labels, preferences, train_steps, incumbent_accuracy, candidate_accuracy, promoted, "
            "kl_to_reference "
            "FROM round_summary WHERE state = 'done' ORDER BY round_id LIMIT ?", [rounds]).fetchall()
    if len(rows) < rounds:
        raise RuntimeError(f"{database}: {len(rows)} finished rounds, expected {rounds}")
    run = Run(variant, seed)
    held = rows[0][3]
    run.accuracy.append(held)
    for round_id, (labels, preferences, steps, incumbent, candidate, promoted, kl) in enumerate(rows, start=1):
        if candidate is None:  # no preference to train on: the budgets cannot be equal
            raise RuntimeError(f"{database}: round {round_id} trained no candidate ({preferences} preferences)")
        run.labels += labels
        run.preferences += preferences
        run.preferences_per_round.append(preferences)
        run.steps += steps
        run.promoted += bool(promoted)
        run.candidate_accuracy.append(candidate)
        if promoted:
            held = candidate
            run.kl = kl
        run.accuracy.append(held)
    return run


def mean(values) -> float:
    return statistics.fmean(values)


def spread(values) -> str:
    return f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""


def tables(runs: list[Run], rounds: int) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The per-run table, the means per round and their difference, as text cells."""
    heads = [f"r{r}" for r in range(rounds + 1)]
    per_run = (["variant", "seed", *heads, "labels", "preferences", "DPO steps", "promoted", "KL"],
               [[run.variant, str(run.seed), *(f"{a:.3f}" for a in run.accuracy), str(run.labels),
                 str(run.preferences), str(run.steps), f"{run.promoted}/{rounds}", f"{run.kl:.3f}"]
                for run in runs])
    by_variant = {v: [run for run in runs if run.variant == v] for v in VARIANTS}
    means_rows = []
    for variant, group in by_variant.items():
        means_rows.append([variant, *(f"{mean(r.accuracy[i] for r in group):.3f}" for i in range(rounds + 1)),
                           f"{mean(r.labels for r in group):.0f}", f"{mean(r.preferences for r in group):.0f}",
                           f"{mean(r.steps for r in group):.0f}", f"{mean(r.kl for r in group):.3f}"])
    online = sorted(by_variant["online"], key=lambda r: r.seed)
    offline = sorted(by_variant["offline"], key=lambda r: r.seed)
    means_rows.append(["online - offline",
                       *(f"{mean(r.accuracy[i] for r in online) - mean(r.accuracy[i] for r in offline):+.3f}"
                         for i in range(rounds + 1)),
                       f"{mean(r.labels for r in online) - mean(r.labels for r in offline):+.0f}",
                       f"{mean(r.preferences for r in online) - mean(r.preferences for r in offline):+.0f}",
                       f"{mean(r.steps for r in online) - mean(r.steps for r in offline):+.0f}",
                       f"{mean(r.kl for r in online) - mean(r.kl for r in offline):+.3f}"])
    # Both variants of a seed share the initial policy and evaluation seeds: the standard
    # error of the mean of the per-seed (paired) differences says how much of it is noise.
    differences = [[on.accuracy[i] - off.accuracy[i] for on, off in zip(online, offline)] for i in range(rounds + 1)]
    means_rows.append(["standard error of that", *(f"{statistics.stdev(d) / math.sqrt(len(d)):.3f}"
                                                   if len(d) > 1 else "-" for d in differences), "", "", "", ""])
    means = (["mean of seeds", *heads, "labels", "preferences", "DPO steps", "KL"], means_rows)
    candidate_rows = [[variant, *(f"{mean(r.candidate_accuracy[i] for r in group):.3f}"
                                  f"{spread([r.candidate_accuracy[i] for r in group])}" for i in range(rounds))]
                      for variant, group in by_variant.items()]
    candidates = (["candidate accuracy (before the gate)", *heads[1:]], candidate_rows)
    return {"runs": per_run, "means": means, "candidates": candidates}


def unequal_budgets(runs: list[Run], rounds: int, label_budget: int, steps_per_round: int) -> list[str]:
    """Runs whose labels or DPO steps are not the budget (a round that formed fewer pairs
    than the budget, or had no preference to train on)."""
    return [f"{run.variant} seed {run.seed}: {run.labels} labels and {run.steps} DPO steps "
            f"(budget {rounds * label_budget} and {rounds * steps_per_round})"
            for run in runs if (run.labels, run.steps) != (rounds * label_budget, rounds * steps_per_round)]


def text_table(columns: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
             for cells in [columns, *rows]]
    return "\n".join(lines)


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    align = [":---"] + ["---:"] * (len(columns) - 1)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [columns, align, *rows])


def machine() -> str:
    import torch
    import vllm

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, {memory:.0f} GiB RAM, "
            f"Python {platform.python_version()}, torch {torch.__version__}, vLLM {vllm.__version__}")


def plot(runs: list[Run], rounds: int, noise: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"online": "tab:blue", "offline": "tab:orange"}
    x = list(range(rounds + 1))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant, colour in colours.items():
        group = [run for run in runs if run.variant == variant]
        for run in group:
            axes[0].plot(x, run.accuracy, color=colour, alpha=0.35, linewidth=0.9)
        axes[0].plot(x, [mean(r.accuracy[i] for r in group) for i in x], color=colour, linewidth=2.4,
                     marker="o", label=f"{variant} (mean of {len(group)} seed{'s' if len(group) > 1 else ''})")
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("held-out accuracy at temperature 1")
    axes[0].set_title("policy held after each round (thin: one seed)")
    axes[0].set_xticks(x)
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    rounds_x = x[1:]
    for variant, colour in colours.items():
        group = [run for run in runs if run.variant == variant]
        for run in group:
            axes[1].plot(rounds_x, run.preferences_per_round, color=colour, alpha=0.35, linewidth=0.9)
        axes[1].plot(rounds_x, [mean(r.preferences_per_round[i - 1] for r in group) for i in rounds_x],
                     color=colour, linewidth=2.4, marker="o", label=variant)
    axes[1].set_xlabel("round")
    axes[1].set_ylabel("labelled pairs with a winner")
    axes[1].set_title("decisive labels out of the same label budget")
    axes[1].set_xticks(rounds_x)
    axes[1].grid(alpha=0.3)
    axes[1].legend()
    figure.suptitle(f"Online vs offline DPO on the demo task (initial policy: noise {noise}), "
                    "at equal label budget and DPO steps")
    figure.tight_layout()
    temporary = path.with_suffix(".tmp.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    temporary.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Online vs offline DPO on the demo task at equal label budget and DPO steps: the same demo "
        "flywheel sampling each round's pairs from the current policy (online) or from the initial one (offline).")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per flywheel (default: 6; 2 with --quick)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="flywheel seeds, one online and one offline flywheel each "
                        "(default: 0 1 2; 0 with --quick)")
    parser.add_argument("--prompts-per-round", type=int, default=None,
                        help="train prompts sampled per round, 4 completions each; enough that every round forms "
                        "more pairs than the label budget (default: 768; 192 with --quick)")
    parser.add_argument("--label-budget", type=int, default=None,
                        help="pairs labelled per round, in both variants (default: 400; 96 with --quick)")
    parser.add_argument("--steps-per-round", type=int, default=None,
                        help="DPO steps of 32 preferences per round, in both variants (default: 16; 6 with --quick)")
    parser.add_argument("--noise", type=float, default=DEFAULT_NOISE,
                        help="share of near-miss answers in the initial policy's SFT data, so about 1 - noise "
                        "of its samples are right (default: %(default)s; the demo's policy has 0.5)")
    parser.add_argument("--nll-weight", type=float, default=1.0,
                        help="weight of the chosen answers' NLL term added to the DPO loss; 0 is pure DPO "
                        "(default: %(default)s, the demo's)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where the flywheels' workdirs go; rerun with the same one to resume "
                        "(default: a new temporary directory)")
    parser.add_argument("--docs-dir", type=Path, default=None,
                        help="where online_vs_offline.md and .png go (default: docs/; the out dir with --quick)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.15,
                        help="vLLM's share of GPU memory (on CPU: of RAM) for its one engine (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="a development run: 2 rounds of 192 prompts, 96 labels and 6 steps, seed 0")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 6)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    prompts_per_round = args.prompts_per_round or (192 if args.quick else 768)
    label_budget = args.label_budget or (96 if args.quick else 400)
    steps_per_round = args.steps_per_round or (6 if args.quick else 16)
    if not 0 <= args.noise < 1:
        parser.error(f"--noise must be in [0, 1), got {args.noise}")
    for name, value in (("--rounds", rounds), ("--prompts-per-round", prompts_per_round),
                        ("--label-budget", label_budget), ("--steps-per-round", steps_per_round)):
        if value < 1:
            parser.error(f"{name} must be at least 1, got {value}")
    out_dir = (args.out_dir or Path(tempfile.mkdtemp(prefix="online-vs-offline-"))).resolve()
    docs_dir = (args.docs_dir or (out_dir if args.quick else ROOT / "docs")).resolve()
    quiet_libraries()

    from flywheel.examples.addition import DemoPolicyConfig, build_demo_policy
    from flywheel.sampling import VLLMSampler

    started = time.monotonic()
    policy_config = DemoPolicyConfig(seed=0, noise=args.noise)
    cache = Path(os.environ.get("FLYWHEEL_CACHE", Path.home() / ".cache" / "flywheel"))
    reference = build_demo_policy(cache, policy_config, log=log)
    log(f"policy {reference}; {rounds} rounds x {prompts_per_round} prompts, {label_budget} labels and "
        f"{steps_per_round} DPO steps a round, seeds {seeds}; flywheels in {out_dir}")
    runs = []
    sampler = None
    try:
        for seed in seeds:
            for variant, source in VARIANTS.items():
                workdir = out_dir / f"noise{args.noise}-{variant}-seed{seed}"
                config = make_config(workdir, policy_config, cache, seed, source, prompts_per_round,
                                     label_budget, steps_per_round, args.nll_weight, args.gpu_memory_utilization)
                # One engine for all flywheels: its start costs ~40 s on CPU.
                sampler = sampler or VLLMSampler(config.sample, seed=0)
                log(f"== {variant}, seed {seed} ({workdir})")
                begun = time.monotonic()
                run_flywheel(config, rounds, sampler)
                run = read_run(config.database, variant, seed, rounds)
                run.seconds = time.monotonic() - begun
                runs.append(run)
                log(f"== {variant}, seed {seed}: accuracy {' '.join(f'{a:.3f}' for a in run.accuracy)}, "
                    f"{run.labels} labels, {run.steps} DPO steps, {run.seconds:.0f} s")
    finally:
        if sampler is not None:
            sampler.close()
    elapsed = time.monotonic() - started

    command = " ".join(["benchmarks/online_vs_offline.py", *(argv if argv is not None else sys.argv[1:])]).strip()
    parts = tables(runs, rounds)
    unequal = unequal_budgets(runs, rounds, label_budget, steps_per_round)
    print(f"\nOnline vs offline DPO on the demo task: {rounds} rounds x {prompts_per_round} prompts "
          f"(4 samples each), {label_budget} labels and {steps_per_round} DPO steps a round, "
          f"seeds {' '.join(map(str, seeds))}")
    print("Held-out accuracy (temperature 1) of the policy held after each round; r0 is the initial policy.\n")
    print(text_table(*parts["runs"]))
    print()
    print(text_table(*parts["means"]))
    print()
    print(text_table(*parts["candidates"]))
    print("\nbudgets: " + ("UNEQUAL: " + "; ".join(unequal) if unequal else
                           f"every run labelled {rounds * label_budget} pairs and took {rounds * steps_per_round} "
                           "DPO steps"))
    print(f"ran in {elapsed / 60:.1f} min; flywheels in {out_dir}")

    docs_dir.mkdir(parents=True, exist_ok=True)
    markdown = docs_dir / f"online_vs_offline_noise{args.noise}.md"
    png = markdown.with_suffix(".png")
    plot(runs, rounds, args.noise, png)
    markdown.write_text(render_markdown(parts, rounds, prompts_per_round, label_budget, steps_per_round, seeds,
                                        args.noise, args.nll_weight, command, elapsed, unequal, png.name))
    print(f"wrote {markdown} and {png}")
    return 0


def render_markdown(parts, rounds, prompts_per_round, label_budget, steps_per_round, seeds, noise, nll_weight,
                    command, elapsed, unequal, png_name) -> str:
    today = datetime.date.today().isoformat()
    budgets = ("**The budgets differed:** " + "; ".join(unequal) + "." if unequal else
               f"Checked from the stores: every run labelled {rounds * label_budget} pairs and took "
               f"{rounds * steps_per_round} DPO steps.")
    return f"""# Online versus offline DPO on the demo task, at equal label budget (initial policy: noise {noise})

Reproduce: `.venv/bin/python {command}` ({elapsed / 60:.1f} min, {today}, on {machine()}).

The demo flywheel (`flywheel demo`'s config: rule judge, random pairing, DPO with an NLL
term of weight {nll_weight}, lr 3e-4, promotion by held-out accuracy) for {rounds} rounds, seeds
{', '.join(map(str, seeds))}, one flywheel per variant and seed, all starting from the same
initial policy, the demo's recipe with {noise:.0%} of its SFT answers near misses
(`DemoPolicyConfig(seed=0, noise={noise})`; the demo's own policy has noise 0.5):

- **online**: each round samples its pairs from the current (promoted) policy
  (`sample.source: current`);
- **offline**: each round samples its pairs from the initial policy
  (`sample.source: initial`), so every pair it trains on comes from the policy it started with.

Equal budgets: each round samples {prompts_per_round} prompts x 4 completions, forms pairs of
distinct answers, and labels a seeded random {label_budget} of them
(`pair.max_pairs_per_round: {label_budget}`); then trains exactly {steps_per_round} DPO steps of 32
preferences (`train.steps_per_round: {steps_per_round}`), whatever share of the labels had a
winner. {budgets}

Accuracy: the policy each flywheel holds after the round (the last promoted checkpoint)
at temperature 1 on 256 held-out sums x 4 samples; r0 is the initial policy. Preferences:
labels with a winner (the rest are ties: both answers wrong); KL: the final policy's KL to
the initial policy on held-out prompts (nats per completion). Both variants of a seed start
from the same policy and are evaluated with the same seeds, so their r0 difference is
only vLLM's run-to-run noise (its CPU sampling is not bit-for-bit repeatable): a yardstick
for the other differences, as is the standard error of the mean of the per-seed
(paired) differences.

## Each run

{markdown_table(*parts["runs"])}

## Means over seeds

{markdown_table(*parts["means"])}

Candidates' own accuracy, before the promotion gate (mean ± standard deviation over seeds):

{markdown_table(*parts["candidates"])}

![held-out accuracy per round, online vs offline]({png_name})
"""


if __name__ == "__main__":
    sys.exit(main())
