#!/usr/bin/env bash
# Boot a VM by hand with the same QEMU arguments the agent uses, console on this terminal.
# Usage: scripts/qemu_runner.sh NAME [TIMEOUT_SECONDS]   (Ctrl-A X quits QEMU's stdio console)
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n '3p' "$0"; exit 2; }
bin=target/release/sqlite-sim
[ -x "$bin" ] || cargo build --release --locked
exec "$bin" console "$1" --timeout "${2:-300}"
