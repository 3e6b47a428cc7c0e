#!/usr/bin/env bash
# Dry build of deploy/docker/Dockerfile's Python layer, without Docker: in a fresh virtual
# environment, install torch as the Dockerfile does, then a regular (non-editable) install of a
# copy of exactly what the Dockerfile COPYs (read from the Dockerfile itself), then run the
# Dockerfile's own checks (`fedmeta --help`, the imports) from outside the source tree.
#
#   scripts/check-docker-python-layer.sh            # torch==2.13.0 as pip is configured here
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/check-docker-python-layer.sh
#
# Several minutes and a few GB of downloads on a fresh machine, so not part of the test suite.
# Exits non-zero on the first failure; prints the wall time of each step.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
DOCKERFILE=deploy/docker/Dockerfile
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fedmeta-layer.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

step() { printf '%s: %s\n' "$(date +%T)" "$*"; }
start=$SECONDS

torch_version="$(sed -n 's/^ARG TORCH_VERSION=//p' "$DOCKERFILE")"
[ -n "$torch_version" ] || { echo "no ARG TORCH_VERSION in $DOCKERFILE" >&2; exit 1; }

# The build context: every `COPY SRC DEST` of the build stage (not COPY --from), as the Dockerfile
# names it; a path the Dockerfile copies but the checkout lacks fails here as it would in Docker.
step "copying the build context named by $DOCKERFILE"
mkdir -p "$WORK/src"
mapfile -t copies < <(sed -n 's/^COPY \([^-][^ ]*\( [^ ]*\)*\) [^ ]*$/\1/p' "$DOCKERFILE")
[ "${#copies[@]}" -gt 0 ] || { echo "no COPY lines found in $DOCKERFILE" >&2; exit 1; }
for line in "${copies[@]}"; do
    for src in $line; do
        [ -e "$src" ] || { echo "$DOCKERFILE copies $src, which is not in the checkout" >&2; exit 1; }
        cp -a "$src" "$WORK/src/"
    done
done
find "$WORK/src" \( -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf {} +
# Only the Dockerfile and compose file of deploy/docker reach the image (.dockerignore).
find "$WORK/src/deploy/docker" -mindepth 1 ! -name Dockerfile ! -name docker-compose.yml -exec rm -rf {} +

step "creating a fresh virtual environment with $("$PYTHON" --version)"
"$PYTHON" -m venv "$WORK/venv"
PIP=("$WORK/venv/bin/pip" install --no-cache-dir --disable-pip-version-check --quiet)

t=$SECONDS
step "installing torch==$torch_version${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
"${PIP[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$torch_version"
torch_s=$((SECONDS - t))

t=$SECONDS
step "installing fedmeta from the copy (pip install .)"
(cd "$WORK/src" && "${PIP[@]}" .)
fedmeta_s=$((SECONDS - t))

step "checking the installed command from outside the source tree"
cd "$WORK"
"$WORK/venv/bin/fedmeta" --help > /dev/null
"$WORK/venv/bin/python" -c "import torch, flwr, fedmeta.deploy.site, fedmeta.server.app, fedmeta.client.app"
"$WORK/venv/bin/python" - "$ROOT" <<'EOF'
import sys
from pathlib import Path

import fedmeta.cli
import torch

root = Path(sys.argv[1])
where = Path(fedmeta.cli.__file__).resolve()
assert root not in where.parents, f"fedmeta imported from the checkout ({where}), not the install"
print(f"fedmeta from {where.parent.parent}; torch {torch.__version__}")
EOF
for sub in "coordinator start --help" "site start --help" "run --help"; do
    # shellcheck disable=SC2086
    "$WORK/venv/bin/fedmeta" $sub > /dev/null
done
step "ok: torch ${torch_s} s, fedmeta and its dependencies ${fedmeta_s} s, total $((SECONDS - start)) s"
