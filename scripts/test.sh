#!/usr/bin/env bash
# The whole test suite: set-up as run.sh does, formatting and lints, then unit, fixture and
# real-QEMU tests. VM tests run under TCG, at most SQLITE_SIM_TEST_VMS at once (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
# Real-QEMU tests boot guests under TCG: bound how many run at once on this 2-core machine.
export SQLITE_SIM_TEST_VMS="${SQLITE_SIM_TEST_VMS:-2}"
cargo test --locked --all-targets -- --test-threads="${TEST_THREADS:-4}"
