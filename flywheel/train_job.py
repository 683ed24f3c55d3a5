"""One DPO training run as a job on disk, so that `accelerate launch` can run it in N processes.

    accelerate launch --multi_gpu --num_processes N -m flywheel.train_job JOB_DIR

`JOB_DIR/job.json` holds the policy path, output directory, seed, training config, the
triples (token ids) and the cached reference log-probs. Every process runs the same
`flywheel.training.train_dpo` on its share of each batch; the first writes the checkpoint
and `JOB_DIR/metrics.json`. `--multi_gpu` starts one process per GPU on a GPU host, and
processes that share the CPU (gloo) where there is none.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from flywheel.config import TrainConfig
from flywheel.errors import UserError
from storage.records import PreferenceTriple, StepMetrics


def write_job(job_dir: Path, policy_path: Path, reference_logps, triples: Sequence[PreferenceTriple],
              config: TrainConfig, output_dir: Path, seed: int) -> Path:
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "job.json").write_text(json.dumps({
        "policy_path": str(policy_path), "output_dir": str(output_dir), "seed": seed, "config": asdict(config),
        "triples": [asdict(t) for t in triples],
        "reference_chosen": reference_logps.chosen.tolist(), "reference_rejected": reference_logps.rejected.tolist(),
    }))
    return job_dir


def run_job(job_dir: Path) -> None:
    """What each launched process runs."""
    import torch
    from accelerate import PartialState

    from flywheel.training import ReferenceLogps, train_dpo

    job = json.loads((job_dir / "job.json").read_text())
    reference = ReferenceLogps(torch.tensor(job["reference_chosen"]), torch.tensor(job["reference_rejected"]))
    metrics = train_dpo(Path(job["policy_path"]), reference, [PreferenceTriple(**t) for t in job["triples"]],
                        TrainConfig(**job["config"]), Path(job["output_dir"]), job["seed"])
    state = PartialState()
    if state.is_main_process:
        (job_dir / "metrics.json").write_text(json.dumps(
            {"processes": state.num_processes, "steps": [asdict(m) for m in metrics]}))


def launch(job_dir: Path, num_processes: int) -> list[StepMetrics]:
    """Run the job under `accelerate launch` with `num_processes` processes; its metrics."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "flywheel.train_job", str(job_dir)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise UserError(f"training under accelerate launch ({num_processes} processes) failed:\n{tail}")
    result = json.loads((job_dir / "metrics.json").read_text())
    if result["processes"] != num_processes:
        raise UserError(f"accelerate launch ran {result['processes']} training processes, not {num_processes}")
    return [StepMetrics(**{**m, "pair_ids": tuple(m["pair_ids"])}) for m in result["steps"]]


if __name__ == "__main__":
    run_job(Path(sys.argv[1]))
