#!/usr/bin/env bash
# Build a Debian bookworm base image from Debian packages, for hosts that cannot pull images.
#
# Produces localhost/marble-base (python3 3.11 + venv + CA certificates), usable as the
# Dockerfile's BASE_IMAGE. Needs root, podman and debootstrap (apt-get install -y podman runc
# debootstrap). Idempotent: does nothing if the image already exists, unless --force.
#
#   docker/build-base.sh [--force] [--image NAME] [--mirror URL]
set -euo pipefail

image="${MARBLE_BASE_IMAGE:-localhost/marble-base}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite="bookworm"
force=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --force) force=1 ;;
        --image) image="$2"; shift ;;
        --mirror) mirror="$2"; shift ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "build-base.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

if [[ $force -eq 0 ]] && podman image exists "$image"; then
    echo "build-base.sh: $image already exists (use --force to rebuild)"
    exit 0
fi
for tool in podman debootstrap; do
    command -v "$tool" >/dev/null || { echo "build-base.sh: $tool not found" >&2; exit 1; }
done

rootfs="$(mktemp -d /var/tmp/marble-base.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT

start=$SECONDS
echo "build-base.sh: debootstrap $suite into $rootfs from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$suite" "$rootfs" "$mirror"
# Package caches and lists are dead weight in an image.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*

tar -C "$rootfs" -c . | podman import \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$image"
echo "build-base.sh: built $image in $((SECONDS - start)) s"
podman image ls "$image"
