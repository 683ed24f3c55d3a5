#!/usr/bin/env bash
# Set up on first use, then run the demo flywheel. Extra arguments go to `flywheel demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/flywheel demo "$@"
