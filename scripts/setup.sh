#!/usr/bin/env bash
# Set up fedmeta in ./.venv: create the virtual environment if there is none, install the CPU
# build of torch first when no torch is installed (a GPU site installs its CUDA build of torch
# into .venv before running this), then fedmeta with its test extras. Safe to run again: it only
# reinstalls when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch==2.13.0 (CPU build)"
    "$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi

stamp=.venv/.fedmeta-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c "import fedmeta.cli.main" >/dev/null 2>&1; then
    echo "setup: installing fedmeta and its dependencies (about a minute on first run)"
    "$PY" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
    echo "$want" > "$stamp"
fi
echo "setup: ready ($("$PY" -c 'import torch, flwr; print(f"torch {torch.__version__}, flwr {flwr.__version__}")'))"
