#!/usr/bin/env bash
# Build vm_images/debian12.qcow2: a Debian 12 (bookworm) guest for benchmarks.
# debootstrap minbase plus systemd (init), udev, dbus (for logind), procps and
# the generic kernel linux-image-amd64 (which has vmgenid; the cloud kernel
# has not), on an ext4 file system that fills the whole disk (no partition
# table: root=/dev/vda). Its kernel and initramfs are also written next to the
# image, <stem>-vmlinuz and <stem>-initrd.img, for direct kernel boot:
#   -kernel vm_images/debian12-vmlinuz -initrd vm_images/debian12-initrd.img
#   -append "root=/dev/vda rw console=ttyS0,115200 quiet loglevel=3
#            fsck.mode=skip systemd.show_status=false"
# (vm_images/debian12.conf.example has the rest). The guest: hostname deb12,
# a serial getty on ttyS0 ("deb12 login:", root / sqsim), bash as root's
# shell, ACPI power button -> systemd-logind powers off, udev makes
# /dev/virtio-ports/NAME for virtserialport devices (virtio_console is
# loaded on demand). Under QEMU 7.2 TCG it reaches its login prompt in
# 25-40 s. The disk is never booted by firmware: it has no boot loader.
#
# Exactly the packages the key names are installed: they are resolved from
# the host's apt lists (an install simulated on an empty system), downloaded
# with apt (hash-checked), put in a local repository, and debootstrap
# installs from it; the result is compared with that list.
# The build lands in the recipe-keyed image cache (scripts/image-cache.sh:
# ~/.cache/sqlite-sim/images/debian12-KEY/) and is copied from there; with
# the key already cached nothing is built. Needs root (debootstrap, chroot).
#
# Usage: scripts/build-debian-image.sh [--force] [OUTPUT.qcow2]
#   --force  build again even if the cache has this recipe
set -euo pipefail

force=0
out=""
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h|--help) sed -n '2,/^#   --force/p' "$0"; exit 0 ;;
        -*) echo "unknown option: $arg" >&2; exit 2 ;;
        *) out="$arg" ;;
    esac
done

script="$(realpath "$0")"
[ -n "$out" ] && out="$(realpath -m "$out")"
cd "$(dirname "$script")/.."
out="${out:-$PWD/vm_images/debian12.qcow2}"
stem="$(dirname "$out")/$(basename "$out" .qcow2)"
kout="$stem-vmlinuz"
iout="$stem-initrd.img"

# shellcheck source=scripts/image-cache.sh
. "$(dirname "$script")/image-cache.sh"

[ "$(id -u)" = 0 ] || { echo "build-debian-image: needs root (debootstrap, chroot)" >&2; exit 1; }

need=()
for pair in debootstrap:debootstrap mkfs.ext4:e2fsprogs qemu-img:qemu-utils \
            apt-ftparchive:apt-utils openssl:openssl; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
    ic_apt_lists
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# The guest's packages beyond Priority: required. usr-is-merged rather than
# usrmerge (which pulls in perl): debootstrap makes the merged /usr itself.
extra=(apt usr-is-merged systemd systemd-sysv udev dbus procps
       linux-image-amd64 initramfs-tools)
# Virtual size of the disk; only what is written takes space in the qcow2.
disk_size=4G
# Kernel modules for hardware a QEMU guest does not have, removed to halve
# the image: sound, cameras and TV, GPUs, wireless, Bluetooth, InfiniBand,
# staging, ISDN, industrial I/O.
prune_modules=(sound drivers/media drivers/gpu drivers/net/wireless
               net/wireless net/mac80211 drivers/bluetooth net/bluetooth
               drivers/infiniband drivers/staging drivers/isdn drivers/iio)

# --- The recipe's inputs: this script, the host tools, the exact packages. ---
ic_apt_lists
# An install into an empty system, simulated against the host's lists: every
# package and version the guest will have.
pkgs="$(apt-get -s -q -o Dir::State::status=/dev/null -o Debug::NoLocking=1 \
            -o APT::Install-Recommends=false -o APT::Install-Suggests=false \
            install '?priority(required)' "${extra[@]}" 2>/dev/null |
        awk '/^Inst / { v = $3; gsub(/[()]/, "", v); print $2 "=" v }' | LC_ALL=C sort)"
case "$pkgs" in *linux-image-amd64=*) ;; *)
    echo "cannot resolve the guest's packages from the apt lists" >&2; exit 1 ;;
esac
# shellcheck disable=SC2086 # one word per package
debs="$(ic_debs $pkgs)"
inputs="$(ic_recipe "$script"
          ic_tools apt apt-utils debootstrap e2fsprogs qemu-utils
          printf '%s\n' "$debs" | sed 's/^/deb /')"
key="$(printf '%s\n' "$inputs" | ic_key)"
stamp="$(dirname "$out")/.$(basename "$stem").cache-key"
files=("disk.qcow2:$out" "vmlinuz:$kout" "initrd.img:$iout")
if [ "$force" = 0 ] && ic_current "$stamp" "debian12-$key" "${files[@]}"; then
    echo "up to date: $out $kout $iout (debian12-$key; use --force to rebuild)"
    exit 0
fi

# build_debian DIR: build disk.qcow2, vmlinuz and initrd.img into DIR.
build_debian() {
    local dest="$1" repo root k
    tmp="$(mktemp -d)"
    chmod 755 "$tmp" # apt-get download runs as _apt
    trap 'for m in "$tmp"/root/proc "$tmp"/root/sys "$tmp"/root/dev/pts; do
              mountpoint -q "$m" && umount -l "$m"; done; rm -rf "$tmp"' EXIT
    repo="$tmp/repo"
    root="$tmp/root"

    # --- The packages, as a local repository for debootstrap. ---
    mkdir -p "$repo/pool" "$repo/dists/bookworm/main/binary-amd64"
    chown _apt "$repo/pool"
    # shellcheck disable=SC2086
    (cd "$repo/pool" && apt-get download -q $pkgs >/dev/null)
    ic_check_debs "$debs" "$repo/pool"
    (cd "$repo" && apt-ftparchive packages pool >dists/bookworm/main/binary-amd64/Packages)
    gzip -9kn "$repo/dists/bookworm/main/binary-amd64/Packages"
    apt-ftparchive -o APT::FTPArchive::Release::Suite=bookworm \
        -o APT::FTPArchive::Release::Codename=bookworm \
        -o APT::FTPArchive::Release::Architectures=amd64 \
        -o APT::FTPArchive::Release::Components=main \
        release "$repo/dists/bookworm" >"$tmp/Release"
    mv "$tmp/Release" "$repo/dists/bookworm/Release"

    # --- The root file system. ---
    # --no-check-gpg: the repository is unsigned, but every .deb in it was
    # checked above against the signed lists of the host's apt.
    echo "debootstrap: $(printf '%s\n' "$pkgs" | wc -l) packages"
    debootstrap --variant=minbase --no-check-gpg --arch=amd64 \
        --include="$(printf '%s\n' "${extra[@]}" | paste -sd,)" \
        bookworm "$root" "file://$repo" >"$tmp/debootstrap.log" 2>&1 || {
        tail -n 30 "$tmp/debootstrap.log" >&2; exit 1; }
    # shellcheck disable=SC2016 # dpkg-query's own ${field} syntax
    if [ "$(chroot "$root" dpkg-query -W -f '${Package}=${Version}\n' | LC_ALL=C sort)" != "$pkgs" ]; then
        echo "the guest's packages differ from those its key was computed from" >&2
        exit 1
    fi

    printf 'deb12\n' >"$root/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\tdeb12\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' \
        >"$root/etc/hosts"
    printf '/dev/vda\t/\text4\trw,noatime,errors=remount-ro\t0\t1\n' >"$root/etc/fstab"
    cat >"$root/etc/apt/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
    : >"$root/etc/resolv.conf"
    # Root password "sqsim"; a fixed salt keeps the build reproducible.
    chroot "$root" usermod -p "$(openssl passwd -6 -salt sqsimdeb12 sqsim)" root
    [ "$(chroot "$root" getent passwd root | cut -d: -f7)" = /bin/bash ]
    # No motd or last-login lines after logging in.
    : >"$root/etc/motd"
    touch "$root/root/.hushlogin"
    # Each boot makes its own machine id (empty file: not a "first boot").
    : >"$root/etc/machine-id"
    rm -f "$root/var/lib/dbus/machine-id"
    # The power button: logind's default, stated so it cannot drift.
    mkdir -p "$root/etc/systemd/logind.conf.d"
    printf '[Login]\nHandlePowerKey=poweroff\nPowerKeyIgnoreInhibited=yes\n' \
        >"$root/etc/systemd/logind.conf.d/sqsim.conf"
    # No periodic jobs in a throwaway guest: they would only steal CPU from
    # the benchmark; nor early module loads nothing here uses (each is a
    # process start, slow under TCG; the modules still load on demand). The
    # serial getty comes from console=ttyS0 (systemd's getty generator);
    # there is no screen for getty@tty1.
    for u in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
             e2scrub_all.timer e2scrub_reap.service fstrim.timer getty@tty1.service \
             systemd-pstore.service modprobe@efi_pstore.service modprobe@drm.service \
             modprobe@dm_mod.service modprobe@loop.service; do
        ln -sfn /dev/null "$root/etc/systemd/system/$u"
    done
    # The journal in RAM: the disk is an overlay thrown away after each run.
    mkdir -p "$root/etc/systemd/journald.conf.d"
    printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n' \
        >"$root/etc/systemd/journald.conf.d/sqsim.conf"

    # A small initramfs: just what mounts root=/dev/vda (virtio-blk, ext4).
    # FSTYPE: the chroot cannot probe /dev/vda, so name its file system.
    printf 'MODULES=list\nCOMPRESS=gzip\nFSTYPE=ext4\n' >"$root/etc/initramfs-tools/conf.d/sqsim"
    printf 'RESUME=none\n' >"$root/etc/initramfs-tools/conf.d/resume"
    printf 'virtio_pci\nvirtio_blk\next4\ncrc32c_generic\n' >>"$root/etc/initramfs-tools/modules"
    k="$(basename "$root"/lib/modules/*)"
    for m in "${prune_modules[@]}"; do
        rm -rf "$root/lib/modules/$k/kernel/$m"
    done
    mount -t proc proc "$root/proc"
    chroot "$root" depmod "$k"
    chroot "$root" update-initramfs -u -k "$k" >/dev/null
    umount "$root/proc"

    # Space: no package caches, lists, documentation or translations.
    rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
        "$root"/usr/share/locale/* "$root"/var/log/*.log "$root"/var/cache/debconf/*-old \
        "$root"/tmp/* "$root"/var/tmp/*

    cp "$root/boot/vmlinuz-$k" "$dest/vmlinuz"
    cp "$root/boot/initrd.img-$k" "$dest/initrd.img"
    # ext4 filled from the tree, nothing mounted. Inode tables and journal
    # are written now (not lazily by the guest, which would cost it CPU);
    # their zeros take no space in the qcow2.
    truncate -s "$disk_size" "$tmp/disk.img"
    mkfs.ext4 -q -L deb12 -U 5a5a5a5a-0de0-4b12-9a5a-5a5a5a5a5a5a \
        -E lazy_itable_init=0,lazy_journal_init=0,hash_seed=5a5a5a5a-0de0-4b12-9a5a-000000000000 \
        -d "$root" "$tmp/disk.img"
    qemu-img convert -f raw -O qcow2 "$tmp/disk.img" "$dest/disk.qcow2"
    echo "built debian12 (kernel $k, $(printf '%s\n' "$pkgs" | wc -l) packages) into $dest"
}

ic_ensure debian12 "$key" "$inputs" "$force" build_debian
ic_install "$IC_ENTRY" "$stamp" "${files[@]}"
ic_unlock
echo "installed $out $kout $iout from $IC_ENTRY"
