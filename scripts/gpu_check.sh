#!/usr/bin/env bash
# The prepared GPU check: two flywheel rounds of a random-init model of Qwen2-0.5B's shape
# on one GPU (vLLM sleeping through training, bf16 training), in at most 8 minutes. Prints
# sampling and DPO tokens/s, MFU, peak GPU memory by phase and the sampler log-prob gap,
# and writes them to gpu_round.json. Needs a GPU host; scripts/setup.sh installs the 'gpu'
# extra there. Extra arguments go to benchmarks/gpu_round.py.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
timeout 480 .venv/bin/python benchmarks/gpu_round.py --json gpu_round.json "$@"
