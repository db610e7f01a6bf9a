#!/usr/bin/env bash
# A private PostgreSQL cluster for the tests: Debian's postgresql package (installed if
# missing), initdb + pg_ctl on a private directory, port and socket directory, trust auth for
# local connections only. initdb and pg_ctl refuse to run as root, so they run as `postgres`.
# Usage: scripts/postgres.sh start|stop|restart|url|status|init (init: the data directory only)
# Env: SQLITE_SIM_TEST_PG_DIR (default /tmp/sqlite-sim-pg-$PORT), SQLITE_SIM_TEST_PG_PORT (default 55432),
# SQLITE_SIM_TEST_PG_LISTEN (default none: socket only) an address to listen on over TCP as well,
# trusting clients on its subnets (tests/netns.rs runs one inside a network namespace).
set -euo pipefail
cd "$(dirname "$0")/.."

port="${SQLITE_SIM_TEST_PG_PORT:-55432}"
dir="${SQLITE_SIM_TEST_PG_DIR:-/tmp/sqlite-sim-pg-$port}"
data="$dir/data"
sock="$dir/sock"
listen="${SQLITE_SIM_TEST_PG_LISTEN:-}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

bindir() {
    local d
    d="$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null |
        sort -V | tail -1)"
    [ -n "$d" ] && [ -x "$d/initdb" ] && echo "$d"
}

install_pg() {
    if bindir >/dev/null; then return; fi
    echo "postgres: installing Debian's postgresql package" >&2
    as_root apt-get update -qq
    # Debian 12's postgresql (15): the distribution's version, like QEMU in setup.sh.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        postgresql >/dev/null
}

# Runs a PostgreSQL tool as the cluster's owner (root may not own a cluster).
as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# The socket directory as the host: the form libpq and tokio-postgres both read.
url() {
    if [ -n "$listen" ]; then
        echo "postgres://postgres@$listen:$port/postgres"
    else
        echo "postgres://postgres@/postgres?host=$sock&port=$port"
    fi
}

init() {
    install_pg
    local bin
    bin="$(bindir)"
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
    as_owner mkdir -p "$sock"
    if [ ! -f "$data/PG_VERSION" ]; then
        as_owner "$bin/initdb" -D "$data" -U postgres --auth=trust --no-instructions \
            -E UTF8 --locale=C >/dev/null
        if [ -n "$listen" ]; then
            # Only hosts on the listening address's own subnets (a test's namespaces).
            echo "host all all samenet trust" | as_owner tee -a "$data/pg_hba.conf" >/dev/null
        fi
    fi
}

start() {
    init
    local bin
    bin="$(bindir)"
    if as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        url
        return
    fi
    # No TCP listener unless one is asked for: only the private socket directory, so nothing
    # outside the machine reaches the trust-authenticated cluster. fsync off: a test cluster,
    # thrown away.
    as_owner "$bin/pg_ctl" -D "$data" -l "$dir/log" -w -t 60 \
        -o "-p $port -k $sock -c listen_addresses='$listen' -c fsync=off -c max_connections=300" \
        start >/dev/null
    url
}

case "${1:-}" in
    start) start ;;
    init) init ;;
    stop)
        if bin="$(bindir)" && [ -f "$data/PG_VERSION" ]; then
            as_owner "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
        fi
        ;;
    restart)
        bin="$(bindir)"
        as_owner "$bin/pg_ctl" -D "$data" -m fast -w restart >/dev/null
        ;;
    status)
        bin="$(bindir)"
        as_owner "$bin/pg_ctl" -D "$data" status
        ;;
    url) url ;;
    *) sed -n '2,8p' "$0" >&2; exit 2 ;;
esac
