#!/usr/bin/env bash
# The compose test (`make test-containers`): the daemon in a container, serving over TCP with
# a bearer token and over a UNIX socket in a shared volume; the demo client over TCP and vkctl
# over the socket, each in its own container; then a graceful stop of the daemon.
#
# Fails unless: the daemon becomes healthy, both clients exit 0, TCP without the token is
# refused, and `compose stop` (SIGTERM) makes the daemon exit 0 within its stop_grace_period
# while a client holds a health Watch stream, which must see NOT_SERVING.
# On failure the logs of the stack are printed.
# The stack is always torn down (down -v --remove-orphans).
#
# Env: VKERNEL_IMAGE (default vkernel:latest; built with scripts/build_image.sh if missing,
# or always when VKERNEL_BUILD=1), CLIENT_TIMEOUT (seconds to wait for the clients, 300).
set -euo pipefail

cd "$(dirname "$0")/.."
export VKERNEL_IMAGE=${VKERNEL_IMAGE:-vkernel:latest}
CLIENT_TIMEOUT=${CLIENT_TIMEOUT:-300}
project=vkct$$
start=$SECONDS

log() { printf 'test_containers: %s\n' "$*" >&2; }

if command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
else
    log "error: neither docker-compose nor 'docker compose' is installed"
    exit 1
fi
compose+=(-p "$project" -f docker-compose.yml)

if [[ ${VKERNEL_BUILD:-0} == 1 ]] || ! docker image inspect "$VKERNEL_IMAGE" >/dev/null 2>&1; then
    bash scripts/build_image.sh
fi

# A fresh token, in a folder mounted read-only into the daemon and the TCP client. The
# containers run as uid 10001: give the file to that uid when we can, else make it readable.
secrets=$(mktemp -d "${TMPDIR:-/tmp}/vkct-secrets.XXXXXX")
chmod 0755 "$secrets"
python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$secrets/token"
if [[ $(id -u) -eq 0 ]]; then
    chown 10001:10001 "$secrets/token"
    chmod 0400 "$secrets/token"
else
    chmod 0444 "$secrets/token"
fi
export VKERNEL_SECRETS_DIR=$secrets

failures=()
passed=0
ok() {
    passed=$((passed + 1))
    log "ok: $*"
}
fail() {
    failures+=("$*")
    log "FAIL: $*"
}

cid() { # container id of a service of this project (stopped ones too; v1 and v2 alike)
    docker ps -aq --filter "label=com.docker.compose.project=$project" \
        --filter "label=com.docker.compose.service=$1" | head -n1
}

cleanup() {
    local rc=$?
    if ((rc != 0 || ${#failures[@]} > 0)); then
        log "logs of the stack:"
        "${compose[@]}" logs --no-color --timestamps >&2 2>&1 || true
        local d
        d=$(cid vkernel)
        if [[ -n $d ]]; then
            log "daemon state: $(docker inspect -f '{{.State.Status}} exit={{.State.ExitCode}} health={{if .State.Health}}{{.State.Health.Status}}{{end}}' "$d" 2>&1)"
            log "last health probes:"
            docker inspect -f '{{if .State.Health}}{{range .State.Health.Log}}    exit {{.ExitCode}}: {{.Output}}{{end}}{{end}}' "$d" >&2 2>&1 || true
        fi
    fi
    "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
    rm -rf "$secrets"
    log "finished in $((SECONDS - start))s"
    echo "containers: $passed passed, ${#failures[@]} failed"
}
trap cleanup EXIT

log "starting project $project (image $VKERNEL_IMAGE)"
# Starts the daemon, waits until its healthcheck passes, then starts both clients.
if ! "${compose[@]}" up -d; then
    fail "compose up: the daemon did not become healthy or a container did not start"
    exit 1
fi
ok "daemon healthy after $((SECONDS - start))s"

for svc in demo vkctl; do
    id=$(cid "$svc")
    if [[ -z $id ]]; then
        fail "$svc: no container"
        continue
    fi
    if ! code=$(timeout "$CLIENT_TIMEOUT" docker wait "$id"); then
        fail "$svc: still running after ${CLIENT_TIMEOUT}s"
        continue
    fi
    log "$svc output (last lines):"
    docker logs --tail 25 "$id" 2>&1 | sed 's/^/    /' >&2
    if [[ $code == 0 ]]; then
        ok "$svc exited 0"
    else
        fail "$svc exited $code"
    fi
done

# TCP without the token must be refused (the health service alone is open).
if out=$("${compose[@]}" run --rm --no-deps -T demo vkctl --addr tcp://vkernel:50051 info 2>&1); then
    fail "vkctl over TCP without a token succeeded: $out"
elif grep -q UNAUTHENTICATED <<<"$out"; then
    ok "TCP without a token refused (UNAUTHENTICATED)"
else
    fail "vkctl over TCP without a token failed, but not with UNAUTHENTICATED: $out"
fi

# A client that holds a stream open across the stop: a standard health Watch (no token
# needed). It must see SERVING, then NOT_SERVING once the daemon starts shutting down, and
# the daemon must still exit 0 within its stop_grace_period.
watcher='
import sys
import grpc
from grpc_health.v1 import health_pb2 as pb, health_pb2_grpc as rpc
seen = []
with grpc.insecure_channel("vkernel:50051") as channel:
    try:
        for r in rpc.HealthStub(channel).Watch(pb.HealthCheckRequest(service=""), timeout=120):
            seen.append(pb.HealthCheckResponse.ServingStatus.Name(r.status))
            print(seen[-1], flush=True)
    except grpc.RpcError as e:
        print("stream ended:", e.code().name, flush=True)
sys.exit(0 if seen[:1] == ["SERVING"] and "NOT_SERVING" in seen else 1)
'
"${compose[@]}" run -d --no-deps -T --label vkct.role=watcher demo python -c "$watcher" >/dev/null
watcher_id=$(docker ps -aq --filter "label=com.docker.compose.project=$project" --filter label=vkct.role=watcher)
for _ in $(seq 50); do
    docker logs "$watcher_id" 2>&1 | grep -q SERVING && break
    sleep 0.2
done

daemon=$(cid vkernel)
state=$(docker inspect -f '{{.State.Status}}' "$daemon")
if [[ $state != running ]]; then
    fail "daemon is $state before the stop (exit code $(docker inspect -f '{{.State.ExitCode}}' "$daemon"))"
else
    # SIGTERM through tini; compose waits stop_grace_period (15s) before SIGKILL.
    t0=$SECONDS
    "${compose[@]}" stop vkernel >/dev/null 2>&1 || true
    code=$(docker inspect -f '{{.State.ExitCode}}' "$daemon")
    if [[ $code == 0 ]]; then
        ok "daemon stopped cleanly on SIGTERM in $((SECONDS - t0))s, with a client stream open"
    else
        fail "daemon exit code $code after SIGTERM (137: killed after the grace period; 143: no SIGTERM handler)"
    fi
    code=$(timeout 20 docker wait "$watcher_id" || echo timeout)
    seen=$(docker logs "$watcher_id" 2>&1 | paste -sd' ' -)
    if [[ $code == 0 ]]; then
        ok "the health watcher saw the shutdown: $seen"
    else
        fail "the health watcher exited $code: $seen"
    fi
fi

((${#failures[@]} == 0))
