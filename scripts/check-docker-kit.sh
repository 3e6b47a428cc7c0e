#!/usr/bin/env bash
# End-to-end check of deploy/docker with a running Docker engine: build the image, then follow
# the steps written at the top of docker-compose.yml (provision, coordinator copy, node.yaml
# edits, ownership), start a coordinator and three sites, run a short experiment through
# `docker compose exec`, revoke a site from inside the coordinator container, check that the
# Fleet port is published on 127.0.0.1 only, and remove everything it created.
#
#   sudo scripts/check-docker-kit.sh
#
# Needs root (the demo's files are handed to UID 10001), a Docker engine, `docker compose` or
# `docker-compose`, and fedmeta installed in .venv (scripts/setup.sh) to provision. Build options
# pass through: PYTHON_IMAGE (another python:3.11 base), TORCH_INDEX_URL (another torch index),
# BUILD_NETWORK (e.g. host). About 15 minutes on 2 cores when nothing is cached: not in the
# test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
KIT=deploy/docker
IMAGE=fedmeta:0.1.0
FEDMETA="$ROOT/.venv/bin/fedmeta"

if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
step() { printf '%s: %s\n' "$(date +%T)" "$*"; }
fail() { echo "check-docker-kit: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "run as root (the demo's files are chowned to 10001)"
docker info >/dev/null 2>&1 || fail "no Docker engine answers (docker info)"
"${COMPOSE[@]}" version >/dev/null 2>&1 || fail "neither \`docker compose\` nor docker-compose found"
[ -x "$FEDMETA" ] || fail "$FEDMETA missing: run scripts/setup.sh"
for f in pki coordinator-pki secrets consortium.yaml; do
    [ ! -e "$KIT/$f" ] || fail "$KIT/$f exists: this check makes its own and removes it after"
done

cleanup() {
    (cd "$ROOT/$KIT" && "${COMPOSE[@]}" down -v >/dev/null 2>&1 || true)
    rm -rf "${ROOT:?}/$KIT/pki" "$ROOT/$KIT/coordinator-pki" "$ROOT/$KIT/secrets" "$ROOT/$KIT/consortium.yaml"
}
trap cleanup EXIT
start=$SECONDS

step "building $IMAGE"
build=(docker build -f "$KIT/Dockerfile" -t "$IMAGE")
[ -z "${PYTHON_IMAGE:-}" ] || build+=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE")
[ -z "${TORCH_INDEX_URL:-}" ] || build+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
[ -z "${BUILD_NETWORK:-}" ] || build+=(--network "$BUILD_NETWORK")
t=$SECONDS
"${build[@]}" . >/dev/null
build_s=$((SECONDS - t))
docker run --rm --network none "$IMAGE" --help >/dev/null
[ "$(docker run --rm --network none --entrypoint id "$IMAGE" -u)" = 10001 ] || fail "image user is not 10001"

cd "$KIT"
step "provisioning as docker-compose.yml says (steps 1-4)"
cat > consortium.yaml <<'EOF'
consortium: compose-check
coordinator:
  host: coordinator
sites:
  - {name: site-0, partition_id: 0}
  - {name: site-1, partition_id: 1}
  - {name: site-2, partition_id: 2}
EOF
install -d -m 0700 secrets
(umask 077; head -c 24 /dev/urandom | base64 > secrets/ca-passphrase
 head -c 24 /dev/urandom | base64 > secrets/coordinator-passphrase)
"$FEDMETA" provision --consortium consortium.yaml --out pki --site-keys \
    --ca-passphrase-file secrets/ca-passphrase --passphrase-file secrets/coordinator-passphrase >/dev/null
install -d -m 0700 coordinator-pki
cp -a pki/registry.json pki/coordinator coordinator-pki/
for s in 0 1 2; do
    node=pki/sites/site-$s/node.yaml
    sed -i 's#^state: state$#state: /var/lib/fedmeta/site#' "$node"
    grep -qx 'state: /var/lib/fedmeta/site' "$node" || fail "$node: no 'state: state' line to change"
    echo 'key_passphrase_file: /run/secrets/key_passphrase' >> "$node"
done
chown -R 10001:10001 coordinator-pki pki/sites pki/passphrases secrets/coordinator-passphrase

step "starting the coordinator and three sites"
"${COMPOSE[@]}" up -d --no-build >/dev/null 2>&1
healthy() { docker inspect --format '{{.State.Health.Status}}' "$("${COMPOSE[@]}" ps -q "$1")"; }
for service in coordinator site-0 site-1 site-2; do
    for _ in $(seq 1 60); do [ "$(healthy "$service")" = healthy ] && break; sleep 3; done
    [ "$(healthy "$service")" = healthy ] || { "${COMPOSE[@]}" logs --tail 40 "$service"; fail "$service not healthy"; }
done
published="$(docker port "$("${COMPOSE[@]}" ps -q coordinator)" 9092/tcp)"
[ "$published" = "127.0.0.1:9092" ] || fail "Fleet port published on '$published', expected 127.0.0.1:9092 only"

step "running an experiment through the coordinator container"
t=$SECONDS
"${COMPOSE[@]}" exec -T coordinator fedmeta run --deployment /pki --state /var/lib/fedmeta \
    --config heart-maml --set rounds=2 eval.adapt_steps=5 tasks.meta_batch=4 --name check \
    --no-stream --timeout 600 || fail "the run did not complete"
run_s=$((SECONDS - t))
"${COMPOSE[@]}" exec -T coordinator test -s /var/lib/fedmeta/runs/check/summary.json \
    || fail "no summary.json in the run folder"

step "revoking site-2 from inside the coordinator container"
"${COMPOSE[@]}" exec -T coordinator fedmeta coordinator revoke --deployment /pki \
    --state /var/lib/fedmeta --site site-2 --reason "kit check"
grep -q '"site-2"' coordinator-pki/revocations.json || fail "revocations.json does not name site-2"
[ ! -e coordinator-pki/coordinator/authorized/site-2.pub ] || fail "authorized/site-2.pub not deleted"
"${COMPOSE[@]}" exec -T coordinator fedmeta coordinator nodes --deployment /pki --state /var/lib/fedmeta \
    | grep '"name": "site-2"' | grep -q '"status": "unregistered"' || fail "site-2 still registered"

step "ok: build ${build_s} s, run ${run_s} s, total $((SECONDS - start)) s"
