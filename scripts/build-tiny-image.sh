#!/usr/bin/env bash
# Build vm_images/tiny.qcow2: a tiny busybox guest (Debian cloud kernel +
# busybox-static initramfs on a syslinux-booted FAT "superfloppy").
# Nothing is mounted: the FAT image is filled with mtools.
# The same kernel and initramfs are also written next to the image as
# <stem>-vmlinuz and <stem>-initrd.gz (vm_images/tiny-vmlinuz,
# vm_images/tiny-initrd.gz) for direct boot with -kernel/-initrd/-append.
# The build lands in the recipe-keyed image cache (scripts/image-cache.sh:
# ~/.cache/sqlite-sim/images/tiny-KEY/) and is copied from there; with the
# key already cached nothing is built.
# Kernel command line switches (direct boot with -append; the disk's syslinux
# APPEND sets none):
#   sqsim.login=1  getty/login on ttyS0 (root, password sqsim) instead of a
#                  root shell straight away.
#   sqsim.acpi=0   ignore ACPI power-button presses (QMP system_powerdown):
#                  no button driver, no watcher; the host has to quit QEMU.
#   sqsim.virtio=0 no virtio_console driver: no /dev/virtio-ports, as a guest
#                  without the supervisor's channel.
#   sqsim.shell=PATH  the login shell on ttyS0, e.g. /bin/bash (Debian's
#                  bash-static); root's shell in /etc/passwd too. Default
#                  /bin/sh (busybox ash).
# Always: the pvpanic driver is loaded, so a guest kernel panic is reported
# to QEMU (QMP GUEST_PANICKED) when the VM has -device pvpanic; and
# virtio_console (with virtio-pci), with /dev/virtio-ports/NAME links made
# for every named virtserialport before the prompt appears.
# /sbin/sqsim-reseed (scripts/guest/sqsim-reseed.c): `sqsim-reseed [@SECS] < SEED`
# adds the host's seed to the kernel's entropy and reseeds its CRNG at once,
# for VMs restored from one snapshot (warm start), which would otherwise
# share their CRNG state.
#
# Usage: scripts/build-tiny-image.sh [--force] [OUTPUT.qcow2]
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

# Resolve paths before changing directory so relative OUTPUT args work.
script="$(realpath "$0")"
[ -n "$out" ] && out="$(realpath -m "$out")"
cd "$(dirname "$script")/.."
out="${out:-$PWD/vm_images/tiny.qcow2}"
# Kernel and initramfs for direct boot: <dir>/<stem>-vmlinuz, -initrd.gz.
stem="$(dirname "$out")/$(basename "$out" .qcow2)"
kout="$stem-vmlinuz"
iout="$stem-initrd.gz"

# shellcheck source=scripts/image-cache.sh
. "$(dirname "$script")/image-cache.sh"

# Host tools; installed only when missing so the common case needs no root.
need=()
for pair in cpio:cpio syslinux:syslinux mcopy:mtools mkfs.vfat:dosfstools \
            xz:xz-utils qemu-img:qemu-utils gcc:gcc; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
[ -d /usr/lib/syslinux ] || need+=(syslinux-common)
# sqsim-reseed is built against the kernel's UAPI headers only (no libc).
[ -e /usr/include/linux/random.h ] || need+=(linux-libc-dev)
if [ "${#need[@]}" -gt 0 ]; then
    apt-get install -y --no-install-recommends "${need[@]}"
fi

# --- The recipe's inputs: this script, the host tools, the exact packages. ---
ic_apt_lists
kpkg="$(apt-cache depends linux-image-cloud-amd64 |
        sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1)"
[ -n "$kpkg" ] || { echo "cannot resolve cloud kernel package" >&2; exit 1; }
debs="$(ic_debs "$kpkg" busybox-static bash-static)"
# The guest helper compiled into the initramfs: its source is recipe text, and
# the compiler (gcc-12, cpp-12 on Debian 12), assembler/linker and kernel
# headers that turn it into bytes are tools.
reseed_c="$(dirname "$script")/guest/sqsim-reseed.c"
ccver="$(gcc -dumpversion)"
binutils_arch="binutils-$(gcc -dumpmachine | tr _ -)"
inputs="$(ic_recipe "$script" "$reseed_c"
          ic_tools cpio dosfstools gzip mtools qemu-utils syslinux syslinux-common xz-utils \
                   gcc-"$ccver" cpp-"$ccver" binutils "$binutils_arch" linux-libc-dev
          printf '%s\n' "$debs" | sed 's/^/deb /')"
key="$(printf '%s\n' "$inputs" | ic_key)"
stamp="$(dirname "$out")/.$(basename "$stem").cache-key"
files=("disk.qcow2:$out" "vmlinuz:$kout" "initrd.gz:$iout")
if [ "$force" = 0 ] && ic_current "$stamp" "tiny-$key" "${files[@]}"; then
    echo "up to date: $out $kout $iout (tiny-$key; use --force to rebuild)"
    exit 0
fi

# build_tiny DIR: build disk.qcow2, vmlinuz and initrd.gz into DIR. Run by
# ic_ensure in a subshell (its trap is its own); the body is not indented so
# the here-documents below read as the files they write.
build_tiny() {
dest="$1"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# apt-get download drops privileges to _apt, which needs to write here.
chmod 755 "$tmp"
chown _apt "$tmp" 2>/dev/null || true

# --- Fetch kernel, busybox and bash from the Debian archive (not host state). ---
(cd "$tmp" && apt-get download -q "$kpkg" busybox-static bash-static)
ic_check_debs "$debs" "$tmp"
dpkg -x "$tmp/${kpkg}"_*.deb "$tmp/kernel"
dpkg -x "$tmp"/busybox-static_*.deb "$tmp/bb"
dpkg -x "$tmp"/bash-static_*.deb "$tmp/bash"
kver="${kpkg#linux-image-}"
vmlinuz="$tmp/kernel/boot/vmlinuz-$kver"
moddir="$tmp/kernel/lib/modules/$kver/kernel/drivers"

# --- Initramfs tree. ---
root="$tmp/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc,lib/modules}
chmod 1777 "$root/tmp"
chmod 700 "$root/root"
cp "$tmp/bb/bin/busybox" "$root/bin/busybox"
# Symlink every applet (like `busybox --install -s`, but into our tree).
for app in $("$root/bin/busybox" --list-full); do
    [ -e "$root/$app" ] || ln -s /bin/busybox "$root/$app"
done
# Debian's statically linked bash, for sqsim.shell=/bin/bash.
cp "$tmp/bash/bin/bash-static" "$root/bin/bash"

# /sbin/sqsim-reseed: seed and reseed the kernel CRNG (see its source). No
# libc, so about 2 KB instead of a ~680 KB static glibc binary; with
# -nostdlib anything the compiler would want from a libc is a link error.
# Reproducible as is: no timestamps or paths end up in a stripped binary.
gcc -Os -s -static -no-pie -nostdlib -ffreestanding -fno-stack-protector \
    -fno-tree-loop-distribute-patterns -fno-asynchronous-unwind-tables \
    -Wl,-z,noseparate-code -Wall -Wextra -Werror \
    -o "$root/sbin/sqsim-reseed" "$reseed_c"
# Smoke test on the host, stopping before any ioctl: no seed -> refusal.
msg="$("$root/sbin/sqsim-reseed" </dev/null 2>&1)" && {
    echo "sqsim-reseed accepted an empty seed" >&2; exit 1; }
[ "$msg" = "sqsim-reseed: no seed on stdin: expected 32 to 512 bytes" ] || {
    echo "sqsim-reseed smoke test: unexpected output: $msg" >&2; exit 1; }

# Kernel modules for /init, as /lib/modules/NAME.ko, each listed after those
# it depends on (checked below; /init loads them in this order per group).
# Power button support: evdev to read events + the ACPI button driver.
# Panic reporting: pvpanic core, then its ACPI/platform driver (QEMU0001,
# what the ISA "-device pvpanic" shows up as) and its PCI driver
# ("-device pvpanic-pci").
# virtio-serial ports (-device virtio-serial-pci + virtserialport): the
# cloud kernel has virtio, virtio-pci and virtio_console all as modules.
# virtio_console's depends= names only virtio and virtio_ring; virtio_pci is
# the PCI transport that makes the device appear on the virtio bus at all.
# Those after "optional:" may be missing (e.g. built in); /init loads what
# is there.
# Busybox insmod may not handle compressed modules, so decompress here.
loaded=" "
opt=0
for m in input/evdev acpi/button \
         virtio/virtio_ring virtio/virtio virtio/virtio_pci_modern_dev \
         virtio/virtio_pci_legacy_dev virtio/virtio_pci char/virtio_console \
         optional: misc/pvpanic/pvpanic \
         misc/pvpanic/pvpanic-mmio misc/pvpanic/pvpanic-pci; do
    [ "$m" = optional: ] && { opt=1; continue; }
    ko="$root/lib/modules/${m##*/}.ko"
    if [ -e "$moddir/$m.ko.xz" ]; then
        xz -dc "$moddir/$m.ko.xz" >"$ko"
    elif [ -e "$moddir/$m.ko" ]; then
        cp "$moddir/$m.ko" "$ko"
    elif [ "$opt" = 1 ]; then
        echo "note: $kpkg has no module $m (built in or not at all)" >&2
        continue
    else
        echo "missing kernel module $m in $kpkg" >&2; exit 1
    fi
    # insmod does no dependency resolution: check that every module this
    # one depends on (modinfo "depends=") is loaded before it.
    deps="$(tr '\0' '\n' <"$ko" | sed -n 's/^depends=//p' | tr , ' ')"
    for d in $deps; do
        case "$loaded" in *" $(echo "$d" | tr - _) "*) ;; *)
            echo "module $m needs $d, which is not loaded before it" >&2
            exit 1 ;;
        esac
    done
    loaded="$loaded$(echo "${m##*/}" | tr - _) "
done

# The kernel opens /dev/console before running /init; without the node it
# warns on the console. Needs root (we are root anyway for apt/dpkg use).
mknod -m 600 "$root/dev/console" c 5 1

# /init rewrites root's shell here when sqsim.shell= names another one.
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf '/bin/sh\n/bin/ash\n/bin/bash\n' >"$root/etc/shells"
printf 'root:x:0:\n' >"$root/etc/group"
# Root password "sqsim" for the sqsim.login=1 console login. A fixed salt
# (and fixed last-change day) keeps the build reproducible.
hash="$("$root/bin/busybox" mkpasswd -m sha512 -S sqsimtinysalt sqsim)"
# shellcheck disable=SC2016 # the literal $6$ prefix of a SHA-512 crypt hash
case "$hash" in '$6$sqsimtinysalt$'?*) ;; *) echo "mkpasswd failed" >&2; exit 1 ;; esac
printf 'root:%s:10957:0:99999:7:::\n' "$hash" >"$root/etc/shadow"
chmod 600 "$root/etc/shadow"
printf 'tiny\n' >"$root/etc/hostname"
cat >"$root/etc/profile" <<'EOF'
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
export HOME=/root
# ash and bash both abbreviate $HOME to ~, so this reads "root@tiny:~# ".
export PS1='root@tiny:\w# '
cd "$HOME"
EOF

cat >"$root/init" <<'EOF'
#!/bin/sh
# PID 1 of the tiny guest.
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts
exec </dev/console >/dev/console 2>&1
# Keep kernel chatter off the console after boot (clean for the supervisor).
echo 1 >/proc/sys/kernel/printk
hostname -F /etc/hostname
# Kernel panic -> pvpanic device -> QMP GUEST_PANICKED (if the VM has one).
# Core module first: insmod does not resolve dependencies.
for m in pvpanic pvpanic-mmio pvpanic-pci; do
    [ -e /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko
done
# virtio-serial (in dependency order). The ports show up asynchronously;
# /dev/virtio-ports/ is filled just before the shell starts, below.
# "sqsim.virtio=0" leaves the console driver out: a guest without the
# supervisor's channel, as older or smaller guests are.
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev \
         virtio_pci virtio_console; do
    case " $(cat /proc/cmdline) " in
        *" sqsim.virtio=0 "*) [ "$m" = virtio_console ] && continue ;;
    esac
    insmod /lib/modules/$m.ko
done

# Kernel command line: "sqsim.login=1" log in first; "sqsim.acpi=0"
# ignore the power button; "sqsim.shell=PATH" the login shell.
login=0
acpi=1
shell=/bin/sh
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        sqsim.login=1) login=1 ;;
        sqsim.acpi=0) acpi=0 ;;
        sqsim.shell=?*) shell="${arg#sqsim.shell=}" ;;
    esac
done
if [ ! -x "$shell" ] || [ -d "$shell" ]; then
    echo "tiny: sqsim.shell=$shell is not an executable; using /bin/sh"
    shell=/bin/sh
fi
# root's shell as everything else sees it ($SHELL, sqsim-login, /etc/passwd).
printf 'root:x:0:0:root:/root:%s\n' "$shell" >/etc/passwd

# ttyS1 is a raw side channel for the host: no echo, no \n -> \r\n.
[ -e /dev/ttyS1 ] && stty -F /dev/ttyS1 115200 raw -echo

# ACPI power button -> immediate poweroff (busybox acpid did not work).
# With sqsim.acpi=0 no button driver is loaded, so nothing sees a press.
if [ "$acpi" = 1 ]; then
    insmod /lib/modules/evdev.ko
    insmod /lib/modules/button.ko
    # Find its evdev node (sysfs entry and devtmpfs node appear
    # asynchronously).
    pwr=""
    for _ in $(seq 50); do
        for ev in /sys/class/input/event*; do
            if [ "$(cat "$ev/device/name" 2>/dev/null)" = "Power Button" ] &&
               [ -c "/dev/input/${ev##*/}" ]; then
                pwr=/dev/input/${ev##*/}
                break 2
            fi
        done
        sleep 0.1
    done
    if [ -n "$pwr" ]; then
        # Open it here, before the shell prompt appears: evdev only queues
        # events for open clients, so a press right after the prompt must not
        # be lost. The watcher then blocks until exactly one event arrives.
        exec 3<"$pwr"
        (dd of=/dev/null bs=24 count=1 <&3 2>/dev/null; poweroff -f) &
        exec 3<&-
    else
        echo "tiny: no power button found"
    fi
fi

# /dev/virtio-ports/NAME for each named virtio-serial port, as udev would
# make them, before the prompt: wait (only if there is a virtio-serial
# device) until the ports and their names have stopped changing.
vs=0
for d in /sys/bus/virtio/devices/*; do
    [ "$(cat "$d/device" 2>/dev/null)" = 0x0003 ] && vs=1
done
if [ "$vs" = 1 ]; then
    last=""
    same=0
    for i in $(seq 150); do
        now="$(ls /sys/class/virtio-ports 2>/dev/null | tr '\n' ' ')"
        now="$now/$(cat /sys/class/virtio-ports/*/name 2>/dev/null | tr '\n' ' ')"
        if [ "$now" = "$last" ]; then same=$((same + 1)); else same=0; fi
        last="$now"
        # Stable for 10 looks (~0.2 s) with a port, or with none after 1 s.
        if [ "$same" -ge 10 ] && { [ "$now" != / ] || [ "$i" -ge 50 ]; }; then
            break
        fi
        sleep 0.02
    done
    sqsim-vports
fi

# Login shell on the serial console, with ttyS0 as controlling tty
# (needed for job control, Ctrl-C and stty).
export SHELL="$shell"
while :; do
    if [ "$login" = 1 ]; then
        # getty makes ttyS0 the controlling tty of a new session, prints
        # "tiny login: " and execs /sbin/sqsim-login with the name, which
        # asks "Password: " (no echo) and execs root's shell from
        # /etc/passwd as a login shell, like the branch below.
        setsid getty -L -l /sbin/sqsim-login 115200 ttyS0 \
            </dev/ttyS0 >/dev/ttyS0 2>&1
    else
        setsid cttyhack "$shell" -l </dev/ttyS0 >/dev/ttyS0 2>&1
    fi
    sleep 0.2
done
EOF
chmod 755 "$root/init"

# Password check for getty (sqsim.login=1). Not busybox login: it prints
# "Password: " before turning echo off, so a password sent as soon as the
# prompt appears can be echoed on the console. Here echo goes off first.
cat >"$root/sbin/sqsim-login" <<'EOF'
#!/bin/sh
# Called by getty as: sqsim-login -- USERNAME (stdio and ctty: ttyS0).
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
[ "$1" = "--" ] && shift
user="$1"
stty -echo
printf 'Password: '
IFS= read -r pw
stty echo
echo
# Only root can log in: compare with its sha512 hash ($6$SALT$DIGEST).
IFS=: read -r _ hash _ </etc/shadow
salt="${hash#\$6\$}"
salt="${salt%%\$*}"
if [ "$user" = root ] &&
   [ "$(printf '%s\n' "$pw" | mkpasswd -P 0 -m sha512 -S "$salt")" = "$hash" ]; then
    # Same environment and shell as without login: root's shell from
    # /etc/passwd (which /init set from sqsim.shell=), as a login shell.
    shell="$(sed -n 's/^root:[^:]*:[^:]*:[^:]*:[^:]*:[^:]*://p' /etc/passwd)"
    [ -x "$shell" ] || shell=/bin/sh
    export HOME=/root SHELL="$shell" USER=root LOGNAME=root
    cd /root
    exec "$shell" -l
fi
echo "Login incorrect"
# getty is respawned by /init and prompts "tiny login: " again.
exit 1
EOF
chmod 755 "$root/sbin/sqsim-login"

# The /dev/virtio-ports/NAME -> ../vportNpM links udev would make. /init
# runs it once the ports have settled; run it again after hot-adding a port.
cat >"$root/sbin/sqsim-vports" <<'EOF'
#!/bin/sh
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/vport*; do
    name="$(cat "$p/name" 2>/dev/null)" || continue
    case "$name" in ""|.|..|*/*) continue ;; esac
    ln -sfn "../${p##*/}" "/dev/virtio-ports/$name"
done
# Drop links to ports that are gone.
for l in /dev/virtio-ports/*; do
    [ -L "$l" ] && [ ! -e "$l" ] && rm -f "$l"
done
exit 0
EOF
chmod 755 "$root/sbin/sqsim-vports"

# Deterministic newc archive: sorted names, fixed mtimes, uid/gid 0.
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -9 -n >"$tmp/initrd.gz"

# --- Boot disk: FAT superfloppy with syslinux, filled via mtools. ---
cat >"$tmp/syslinux.cfg" <<'EOF'
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL vmlinuz
  APPEND initrd=initrd.gz console=ttyS0,115200 quiet
EOF
cp "$vmlinuz" "$tmp/vmlinuz"
touch -d '2000-01-01 00:00:00 UTC' "$tmp/vmlinuz" "$tmp/initrd.gz" "$tmp/syslinux.cfg"
img="$tmp/disk.img"
truncate -s 64M "$img"
# --invariant: fixed volume id and dates, for reproducible images.
mkfs.vfat -n TINY --invariant "$img" >/dev/null
export MTOOLS_SKIP_CHECK=1
# syslinux writes ldlinux.* through mtools, which stamps them with this date.
export SOURCE_DATE_EPOCH=946684800
syslinux --install "$img"
mcopy -m -i "$img" "$tmp/vmlinuz" "$tmp/initrd.gz" "$tmp/syslinux.cfg" ::/

cp "$tmp/vmlinuz" "$dest/vmlinuz"
cp "$tmp/initrd.gz" "$dest/initrd.gz"
qemu-img convert -f raw -O qcow2 "$img" "$dest/disk.qcow2"
echo "built tiny (kernel $kver) into $dest"
}

ic_ensure tiny "$key" "$inputs" "$force" build_tiny
ic_install "$IC_ENTRY" "$stamp" "${files[@]}"
ic_unlock
echo "installed $out $kout $iout from $IC_ENTRY"
