#!/usr/bin/env bash
# Prepare a fresh Debian 12 machine: QEMU 7.2 and the image tools from apt, then the demo guest
# image and the dashboard's bundle. Idempotent: does nothing that is already done. Used by run.sh and test.sh.
# Images come from the recipe-keyed cache (~/.cache/sqlite-sim/images, see vm_images/README.md):
# with it warm, a fresh clone's setup copies them and takes seconds.
# Usage: scripts/setup.sh [--debian]   (--debian: also the Debian 12 benchmark guest)
set -euo pipefail
cd "$(dirname "$0")/.."

debian=0
for arg in "$@"; do
    case "$arg" in
        --debian) debian=1 ;;
        *) sed -n '2,6p' "$0" >&2; exit 2 ;;
    esac
done

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

updated=0
apt_update_once() {
    if [ "$updated" = 0 ]; then
        as_root apt-get update -qq
        updated=1
    fi
}

missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
for pair in cpio:cpio syslinux:syslinux mcopy:mtools mkfs.vfat:dosfstools xz:xz-utils; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
[ -d /usr/lib/syslinux ] || missing+=(syslinux-common)

if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt_update_once
    pkgs=("${missing[@]}")
    if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]]; then
        # Debian 12's QEMU is 7.2; a newer preinstalled qemu-utils (backports) conflicts with it.
        # Pin qemu-utils to the same version in the same call so qemu-img stays installed.
        v="$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')"
        pkgs+=("qemu-utils=$v")
        if dpkg -s qemu-block-extra >/dev/null 2>&1; then pkgs+=("qemu-block-extra=$v"); fi
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        --allow-downgrades "${pkgs[@]}" >/dev/null
fi
command -v qemu-img >/dev/null || {
    apt_update_once
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null
}

# Up to date, copied from the cache, or built (the script refreshes the apt lists when they are
# more than a day old, so the cache key follows the archive's current kernel).
scripts/build-tiny-image.sh
images=vm_images/tiny.qcow2
if [ "$debian" = 1 ]; then
    scripts/build-debian-image.sh
    images="$images vm_images/debian12.qcow2"
fi

# The web dashboard's bundle (served at /ui/), into ${CARGO_TARGET_DIR:-target}/ui; skipped when
# its sources are unchanged.
scripts/build-ui.sh

echo "setup: $(qemu-system-x86_64 --version | head -n1); $images ready"
