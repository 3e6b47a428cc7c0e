#!/usr/bin/env bash
# mypy over every fedmeta package. The repository's folders become `fedmeta.*` only when installed
# (package-dir mapping), which mypy cannot follow through the editable install; so the packages
# are linked under a temporary `fedmeta/` and checked from there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
farm="$(mktemp -d)"
trap 'rm -rf "$farm"' EXIT
mkdir -p "$farm/fedmeta"
for d in common sitecore protocol server client deploy cli bench configs; do
    ln -s "$root/$d" "$farm/fedmeta/$d"
done
ln -s "$root/api/__init__.py" "$farm/fedmeta/__init__.py"
cd "$farm"
packages=()
for p in common sitecore protocol server client deploy cli bench; do packages+=(-p "fedmeta.$p"); done
exec "$root/.venv/bin/mypy" --config-file "$root/pyproject.toml" "${packages[@]}"
