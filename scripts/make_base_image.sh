#!/usr/bin/env bash
# Make a local base image (minimal Debian with python3 + python3-venv) for machines that
# cannot pull python:3.11-slim from a registry.
#
# The Debian mirror and suite come from this machine's own apt configuration
# (/etc/apt/sources.list.d/*.sources in deb822 form, else `deb` lines in
# /etc/apt/sources.list*), so the rootfs is built from the same source the host uses.
#
# Usage: scripts/make_base_image.sh [TAG]
#   TAG defaults to vkernel-base:<suite>, e.g. vkernel-base:bookworm.
# Env: VKERNEL_BASE_MIRROR / VKERNEL_BASE_SUITE override what apt says.
# Progress goes to stderr; the image tag is printed on stdout (for build_image.sh).
# Does nothing but print the tag when the image already exists.
set -euo pipefail

log() { printf 'make_base_image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Print "URI SUITE KEYRING" of the first enabled `deb` source whose suite is a bare
# release name (not -updates, -security, -backports); KEYRING is "-" when unknown.
read_apt_source() {
    local f
    shopt -s nullglob
    for f in /etc/apt/sources.list.d/*.sources; do
        awk '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && enabled !~ /^(no|false)$/ && uris != "") {
                    n = split(suites, s, " ")
                    for (i = 1; i <= n; i++) if (s[i] !~ /[-\/]/) {
                        split(uris, u, " ")
                        print u[1], s[i], (signed ~ /^\// ? signed : "-")
                        found = 1; exit
                    }
                }
                types = ""; uris = ""; suites = ""; enabled = ""; signed = ""; last = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]/   { if (last == "uris") uris = uris " " $0; if (last == "suites") suites = suites " " $0; next }
            {
                key = tolower($0); sub(/:.*/, "", key)
                val = $0; sub(/^[^:]*:[ \t]*/, "", val)
                last = key
                if (key == "types") types = val
                else if (key == "uris") uris = val
                else if (key == "suites") suites = val
                else if (key == "enabled") enabled = tolower(val)
                else if (key == "signed-by") signed = val
            }
            END { if (!found) flush() }
        ' "$f" | head -n1
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        # deb [opts] URI SUITE COMPONENT...
        sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" \
            | awk '$1 == "deb" && $3 !~ /[-\/]/ { print $2, $3, "-"; exit }'
    done
}

src=$(read_apt_source | awk 'NF' | head -n1 || true)
mirror=${VKERNEL_BASE_MIRROR:-$(awk '{print $1}' <<<"$src")}
suite=${VKERNEL_BASE_SUITE:-$(awk '{print $2}' <<<"$src")}
keyring=$(awk '{print $3}' <<<"$src")
[[ -n $mirror && -n $suite ]] || die "no Debian 'deb' source found in /etc/apt (set VKERNEL_BASE_MIRROR and VKERNEL_BASE_SUITE)"
tag=${1:-vkernel-base:$suite}

if docker image inspect "$tag" >/dev/null 2>&1; then
    log "$tag already exists; nothing to do"
    echo "$tag"
    exit 0
fi

log "building $tag from $mirror $suite"
if ! command -v debootstrap >/dev/null 2>&1; then
    [[ $(id -u) -eq 0 ]] || die "debootstrap is missing and we are not root (apt-get install debootstrap)"
    log "installing debootstrap"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >&2
fi
[[ $(id -u) -eq 0 ]] || die "debootstrap needs root"

rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/vkernel-rootfs.XXXXXX")
trap 'rm -rf --one-file-system "$rootfs"' EXIT

args=(--variant=minbase "--include=python3,python3-venv" --components=main)
if [[ $keyring != "-" && -r $keyring ]]; then
    args+=(--keyring="$keyring")
fi
start=$SECONDS
debootstrap "${args[@]}" "$suite" "$rootfs" "$mirror" >&2 \
    || { tail -n 30 "$rootfs/debootstrap/debootstrap.log" >&2 2>/dev/null || true; die "debootstrap failed"; }
log "debootstrap took $((SECONDS - start))s"

# Keep the rootfs small: no package lists, caches, docs, man pages or logs.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/usr/share/locale/* "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/debootstrap
find "$rootfs" -xdev -name '*.pyc' -path '*/__pycache__/*' -delete
python=$(chroot "$rootfs" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
log "rootfs python3 is $python, size $(du -sh --one-file-system "$rootfs" | cut -f1)"

# /dev, /proc and /sys are provided by the container runtime.
tar -C "$rootfs" --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -c . \
    | docker import \
        -c 'ENV LANG=C.UTF-8' \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'CMD ["/bin/bash"]' \
        -c "LABEL org.opencontainers.image.description=\"Debian $suite minbase with python3 $python (vkernel local base)\"" \
        -m "debootstrap --variant=minbase $suite from $mirror" \
        - "$tag" >&2
log "imported $tag"
echo "$tag"
