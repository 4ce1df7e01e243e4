#!/usr/bin/env bash
# Build the vkernel image (daemon + clients): `make image`.
#
# 1. Pick the base image: $BASE_IMAGE if set; else python:3.11-slim if it is present locally;
#    else the local Debian base made by scripts/make_base_image.sh (no registry needed).
# 2. Prepare the wheelhouse on the host (the host's pip reaches PyPI, the build does not):
#    .build/wheels/project/ the vkernel wheel, .build/wheels/deps/ every runtime dependency as
#    binary wheels for the base image's Python version, libc and machine.
# 3. docker build --build-arg BASE_IMAGE=... -t $VKERNEL_IMAGE (default vkernel:latest); the
#    dependency stage is also tagged <name>:deps (vkernel:deps) to keep its cache.
#
# Re-running is cheap: the dependency download is skipped while pyproject.toml and the base
# image's Python are unchanged, the project wheel is reproducible, and docker's layer cache
# does the rest.
set -euo pipefail

cd "$(dirname "$0")/.."
log() { printf 'build_image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

IMAGE=${VKERNEL_IMAGE:-vkernel:latest}
WHEELS=.build/wheels
start=$SECONDS

command -v docker >/dev/null 2>&1 || die "docker is not installed"
docker info >/dev/null 2>&1 || die "cannot reach the docker engine"

# --- 1. base image -------------------------------------------------------------------------
if [[ -n ${BASE_IMAGE:-} ]]; then
    base=$BASE_IMAGE
elif docker image inspect python:3.11-slim >/dev/null 2>&1; then
    base=python:3.11-slim
else
    base=$(bash scripts/make_base_image.sh)
fi
log "base image: $base"
if ! docker image inspect "$base" >/dev/null 2>&1; then
    docker pull "$base" >&2 || die "base image $base is not available"
fi

# The wheels must match the interpreter and libc inside the base image, not the host's.
read -r pyver machine glibc < <(docker run --rm --network none --entrypoint python3 "$base" -c '
import os, platform, sys
libc = os.confstr("CS_GNU_LIBC_VERSION") or "glibc 2.17"
print("%d.%d" % sys.version_info[:2], platform.machine(), libc.split()[-1])
') || die "cannot run python3 in $base"
log "base python $pyver, $machine, glibc $glibc"
glibc_minor=${glibc#*.}
glibc_minor=${glibc_minor%%.*}
platforms=()
for ((m = glibc_minor; m >= 17; m--)); do
    platforms+=(--platform "manylinux_2_${m}_${machine}")
done
platforms+=(--platform "manylinux2014_${machine}")

# --- 2. wheelhouse -------------------------------------------------------------------------
if [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    log "no .venv: creating it with 'make venv'"
    make venv >&2
    PY=.venv/bin/python
fi
pip=("$PY" -m pip --disable-pip-version-check)

mkdir -p "$WHEELS"
# The project wheel (hatchling builds reproducibly, so unchanged sources give the same bytes).
rm -rf "$WHEELS/project.new"
"${pip[@]}" wheel -q --no-deps . -w "$WHEELS/project.new" >&2
rm -rf "$WHEELS/project"
mv "$WHEELS/project.new" "$WHEELS/project"
wheel=$(ls "$WHEELS"/project/vkernel-*.whl)

# The runtime dependencies, resolved from the wheel's own metadata and downloaded again only
# when its Requires-Dist or the target interpreter changes (`make clean` forces a refresh).
requires=$("$PY" -c '
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    lines = z.read(meta).decode().splitlines()
print("\n".join(sorted(l for l in lines if l.startswith("Requires-Dist:") and "extra ==" not in l)))
' "$wheel")
stamp_want=$( { echo "$requires"; echo "$pyver ${platforms[*]}"; } | sha256sum | cut -d' ' -f1)
if [[ ! -f $WHEELS/deps/.stamp || $(cat "$WHEELS/deps/.stamp") != "$stamp_want" ]]; then
    log "downloading runtime dependencies for cp${pyver/./} $machine"
    rm -rf "$WHEELS/deps.new"
    "${pip[@]}" download -q --only-binary=:all: --dest "$WHEELS/deps.new" \
        --implementation cp --python-version "$pyver" --abi "cp${pyver/./}" "${platforms[@]}" \
        "$wheel" >&2
    rm -f "$WHEELS"/deps.new/vkernel-*.whl
    echo "$stamp_want" >"$WHEELS/deps.new/.stamp"
    rm -rf "$WHEELS/deps"
    mv "$WHEELS/deps.new" "$WHEELS/deps"
else
    log "runtime dependencies up to date"
fi
log "wheelhouse: $(find "$WHEELS/deps" -name "*.whl" | wc -l) dependency wheels, $(basename "$wheel")"

# --- 3. docker build -----------------------------------------------------------------------
# The classic builder unless buildx is installed (docker 20.10 engine, no buildx here).
if [[ -z ${DOCKER_BUILDKIT:-} ]] && ! docker buildx version >/dev/null 2>&1; then
    export DOCKER_BUILDKIT=0
fi
previous=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
# The deps stage is tagged too (<name>:deps), so that `docker image prune` does not throw
# away its cache: it is the slow part of the build.
repo=$IMAGE
[[ ${IMAGE##*/} == *:* ]] && repo=${IMAGE%:*}
: >.build/docker-build.log
for target in deps final; do
    args=(--build-arg BASE_IMAGE="$base")
    if [[ $target == deps ]]; then
        args+=(--target deps -t "$repo:deps")
    else
        args+=(-t "$IMAGE")
    fi
    if ! docker build "${args[@]}" . >>.build/docker-build.log 2>&1; then
        tail -n 40 .build/docker-build.log >&2
        die "docker build failed (full log: .build/docker-build.log)"
    fi
done
# The image this build replaced, now untagged: remove it (kept if a container still uses it).
current=$(docker image inspect -f '{{.Id}}' "$IMAGE")
if [[ -n $previous && $previous != "$current" ]] \
    && [[ -z $(docker image inspect -f '{{join .RepoTags ","}}' "$previous" 2>/dev/null) ]]; then
    docker rmi "$previous" >/dev/null 2>&1 || true
fi
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
log "built $IMAGE ($((size / 1000000)) MB) in $((SECONDS - start))s"
