#!/usr/bin/env bash
# Install what is missing, build the demo image and the release binary, start `sqlite-sim all`.
# The demo VM (vm_configs/tiny.conf) runs under TCG: KVM is not used even where /dev/kvm exists.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked
port="${SQLITE_SIM_API_PORT:-8000}"
host="${SQLITE_SIM_API_HOST:-127.0.0.1}"
cat <<MSG

sqlite-sim is starting on http://$host:$port — try:

  curl -s -X POST http://$host:$port/requests -H 'Content-Type: application/json' \\
       -d '{"vm_name":"tiny","commands":"echo Hello World && uname -a","timeout":300}'
  curl -s http://$host:$port/requests/<uuid>
  curl -s http://$host:$port/requests/<uuid>/logs

or open the dashboard: http://$host:$port/ui/

MSG
exec target/release/sqlite-sim all
