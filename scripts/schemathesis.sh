#!/usr/bin/env bash
# Fuzzes the REST API against the OpenAPI document it serves, with Schemathesis: every check and
# every phase (examples, coverage, fuzzing, stateful), against `sqlite-sim api` on a free port
# with a fresh database. Two runs: without a token, and with SQLITE_SIM_API_TOKEN set (the
# document then requires it, and 401 answers appear). Exits non-zero on any failure.
#
# Schemathesis is installed, pinned, in a virtualenv outside the repository, reused across runs.
# SCHEMATHESIS_MAX_EXAMPLES (default 40) bounds the cases per operation and phase;
# SCHEMATHESIS_SEED replays a run (each run prints its seed). scripts/schemathesis_hooks.py keeps
# the positive cases of POST /requests to the one rule its schema cannot state, and drops
# "negative" cases whose body is valid after all (a Schemathesis false positive).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

st_version=4.32.5
venv="${XDG_CACHE_HOME:-$HOME/.cache}/sqlite-sim/venv-schemathesis-$st_version"
# The marker is written last, so an interrupted install is redone rather than half-used.
if [ ! -e "$venv/.installed" ]; then
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        echo "schemathesis: installing python3-venv (apt)"
        as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            python3-venv >/dev/null
    fi
    echo "schemathesis: installing schemathesis $st_version into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$st_version"
    touch "$venv/.installed"
fi

cargo build --locked -q
bin="${CARGO_TARGET_DIR:-$repo/target}/debug/sqlite-sim"
case "$bin" in /*) ;; *) bin="$repo/$bin" ;; esac

work="$(mktemp -d /tmp/sqlite-sim-st.XXXXXX)"
server=""
stop_server() {
    if [ -n "$server" ]; then
        kill "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
        server=""
    fi
}
trap 'stop_server; rm -rf "$work"' EXIT

# run NAME [TOKEN]
run() {
    local label="$1" token="${2:-}" dir="$work/$1"
    mkdir -p "$dir"
    # A clean environment and working directory: no .env or SQLITE_SIM_* of the caller applies.
    local envs=(PATH="$PATH" HOME="$HOME"
        SQLITE_SIM_DB_PATH="$dir/sim.db" SQLITE_SIM_RUN_DIR="$dir/run"
        SQLITE_SIM_API_HOST=127.0.0.1 SQLITE_SIM_API_PORT=0
        SQLITE_SIM_VM_CONFIG_DIR="$repo/vm_configs" SQLITE_SIM_VM_IMAGES_DIR="$repo/vm_images")
    if [ -n "$token" ]; then envs+=(SQLITE_SIM_API_TOKEN="$token"); fi
    # Created here, so it can be read before the background process has opened it.
    : >"$dir/server.log"
    (cd "$dir" && exec env -i "${envs[@]}" "$bin" api) 2>>"$dir/server.log" &
    server=$!
    local addr=""
    for _ in $(seq 200); do
        addr="$(sed -n 's/.*API listening addr=\([0-9.:]*\).*/\1/p' "$dir/server.log")"
        [ -n "$addr" ] && break
        kill -0 "$server" 2>/dev/null || break
        sleep 0.1
    done
    if [ -z "$addr" ]; then
        echo "schemathesis: the server did not start; its log:" >&2
        cat "$dir/server.log" >&2
        return 1
    fi
    local phases="examples,coverage,fuzzing,stateful"
    local args=(run "http://$addr/openapi.json" --checks all --phases "$phases"
        --max-examples "${SCHEMATHESIS_MAX_EXAMPLES:-40}"
        --generation-database none --no-color)
    if [ -n "${SCHEMATHESIS_SEED:-}" ]; then args+=(--seed "$SCHEMATHESIS_SEED"); fi
    if [ -n "$token" ]; then args+=(-H "Authorization: Bearer $token"); fi
    echo "schemathesis: $label, against $addr"
    local status=0
    # The hooks keep positive cases to a rule JSON Schema cannot state (no destination twice).
    (cd "$dir" && SCHEMATHESIS_HOOKS="$repo/scripts/schemathesis_hooks.py" \
        "$venv/bin/st" --config-file "$repo/scripts/schemathesis.toml" "${args[@]}") ||
        status=$?
    stop_server
    if [ "$status" != 0 ]; then
        echo "schemathesis: $label failed (exit $status); the server's log:" >&2
        tail -n 50 "$dir/server.log" >&2
    fi
    return "$status"
}

run no-token
run token "st-$RANDOM-$RANDOM"
echo "schemathesis: no failures"
