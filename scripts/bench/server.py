"""One sqlite-sim deployment: a temp dir with its own database and run dir, the processes
started on it (`all`, or `api` plus `agents`) on a kernel-chosen port, stopped with SIGTERM;
and the supervisor's own trace of each request's system lines."""

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

from . import common, pg
from .common import BIN, CONFIGS, IMAGES, log, parse_ts
from .http import Api
from .procstat import proc_alive

# The keys of warm start (issue 11). Issue 6's figures measure cold boots, so their servers
# get copies of the configs without them: no template is built behind their backs, and every
# request boots as those figures expect.
WARM_KEYS = re.compile(r"(?m)^\s*(WARM|WARM_POOL|WARM_WAIT|PREPARE)\s*=.*\n?")


def shipped_configs():
    """{name: text} of the shipped vm_configs/*.conf."""
    out = {}
    for name in sorted(os.listdir(CONFIGS)):
        if name.endswith(".conf"):
            with open(os.path.join(CONFIGS, name)) as f:
                out[name[:-5]] = f.read()
    return out


def cold_configs():
    """The shipped configs with the warm-start keys removed."""
    return {n: WARM_KEYS.sub("", t) for n, t in shipped_configs().items()}


def set_key(text, key, value):
    """`text` with `KEY="value"` set (replaced where it is, else appended)."""
    line = f'{key}="{value}"'
    if re.search(rf"(?m)^\s*{key}\s*=", text):
        return re.sub(rf"(?m)^\s*{key}\s*=.*$", line, text)
    return text.rstrip("\n") + "\n" + line + "\n"


POOL_VM = "tiny-pool"
# The pool keeper says when a clone is restored and in the pool (at DEBUG).
POOL_TRACE = "sqlite_sim::agent::pool=debug"
POOL_READY = re.compile(r'^(\S+Z)\s+DEBUG\s.*pool clone ready vm="?([^" ]+)"? ms=(\d+)', re.M)


def warm_tiny_configs(pool=1):
    """The shipped `tiny` (its config says WARM="on"; set here should it ever not) and, with
    `pool`, `tiny-pool`: the same guest and keys plus IMAGE and WARM_POOL. {name: text}."""
    tiny = shipped_configs()["tiny"]
    if not re.search(r'(?m)^\s*WARM\s*=\s*["\']?on', tiny):
        tiny = set_key(tiny, "WARM", "on")
    out = {"tiny": tiny}
    if pool:
        out[POOL_VM] = set_key(set_key(tiny, "IMAGE", "tiny.qcow2"), "WARM_POOL", str(pool))
    return out


# The supervisor's own trace of each system line, with the instant it was produced; used
# because merged log rows only carry their first line's timestamp. Costs a few lines per run.
TRACE_RUNS = "warn,sqlite_sim::run=info,sqlite_sim::agent::run=info"
RUN_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT[\d:.]+Z)\s+INFO\s.*?request=([0-9a-f-]{36})"
                      r".*?sqlite_sim::run: (.*)$")


def listening_port(pid):
    """The TCP port a process listens on, from /proc (the API logs it only at INFO)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A" and parts[9] in inodes:
                return int(parts[1].rsplit(":", 1)[1], 16)
    return None


class Server:
    """One sqlite-sim deployment: a temp dir with its database and run dir, and the processes
    (`all`, or `api` plus `agents`) started on it."""

    def __init__(self, env=None, label="server", trace_runs=True, configs=None, trace=None,
                 engine="sqlite"):
        """`configs`: {name: text} for its config directory (default: `cold_configs()`);
        `trace`: extra RUST_LOG directives (e.g. the pool keeper's debug lines); `engine`:
        `sqlite` (its file in the temp dir) or `postgres` (a database of its own in the
        cluster of scripts/postgres.sh, dropped by stop())."""
        self.root = tempfile.mkdtemp(prefix="bsim-", dir="/tmp")
        self.run_dir = os.path.join(self.root, "run")
        self.db = os.path.join(self.root, "bench.db")
        assert len(self.run_dir) <= 40, self.run_dir
        self.label = label
        self.procs = []
        self.api = None
        self.main_pid = None
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("SQLITE_SIM_") and k != "RUST_LOG"}
        self.env.update({
            "SQLITE_SIM_DB_PATH": self.db,
            "SQLITE_SIM_RUN_DIR": self.run_dir,
            "SQLITE_SIM_API_HOST": "127.0.0.1",
            "SQLITE_SIM_API_PORT": "0",
            "SQLITE_SIM_VM_IMAGES_DIR": IMAGES,
            "SQLITE_SIM_VM_CONFIG_DIR": CONFIGS,
            "SQLITE_SIM_ACCEL": "tcg",
            "SQLITE_SIM_LOG_LEVEL": "WARN",
        })
        if trace_runs:
            self.env["RUST_LOG"] = TRACE_RUNS + (f",{trace}" if trace else "")
        self.config_dir = os.path.join(self.root, "configs")
        self.env["SQLITE_SIM_VM_CONFIG_DIR"] = self.config_dir
        os.makedirs(self.config_dir)
        for name, text in (cold_configs() if configs is None else configs).items():
            self.write_config(name, text)
        self.engine = engine
        self.pg_db = None
        if engine == "postgres":
            self.pg_db, self.env["SQLITE_SIM_DATABASE_URL"] = pg.create_db()
        self.env.update(env or {})
        common.SERVERS.append(self)

    def write_config(self, name, text):
        """Adds (or replaces) `name`'s config; agents see it at their next pass."""
        tmp = os.path.join(self.config_dir, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.rename(tmp, os.path.join(self.config_dir, f"{name}.conf"))

    def log_text(self):
        """Everything the server's processes logged so far."""
        out = []
        for p in self.procs:
            try:
                with open(p.log_path, errors="replace") as f:
                    out.append(f.read())
            except OSError:
                pass
        return "".join(out)

    def template(self, vm):
        """(dir, meta) of `vm`'s ready template in this server's run dir, or None."""
        root = os.path.join(self.run_dir, "templates")
        try:
            names = sorted(os.listdir(root))
        except OSError:
            return None
        for n in names:
            key = n[len(vm) + 1:]
            if n.startswith(vm + "-") and len(key) == 16:
                try:
                    with open(os.path.join(root, n, "meta.json")) as f:
                        return os.path.join(root, n), json.load(f)
                except (OSError, ValueError):
                    continue
        return None

    def wait_template(self, vm, timeout=300):
        """Waits until `vm`'s template is ready (its meta.json exists); (dir, meta)."""
        deadline = time.monotonic() + timeout
        while True:
            t = self.template(vm)
            if t is not None:
                return t
            failed = re.search(r"template build failed.*", self.log_text())
            if failed:
                raise RuntimeError(f"{self.label}: {vm}'s {failed.group(0)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label}: no template of {vm} after {timeout} s")
            time.sleep(0.1)

    def pool_ready(self, vm=POOL_VM):
        """[(epoch, restore ms)] of every clone of `vm` the pool keeper restored so far."""
        return [(parse_ts(m.group(1)), int(m.group(3)))
                for m in POOL_READY.finditer(self.log_text()) if m.group(2) == vm]

    def wait_pool(self, restored, vm=POOL_VM, timeout=120):
        """Waits until the keeper has restored `restored` clones of `vm` in all (so the pool is
        full again after `restored - size` takes) and a pool directory exists."""
        deadline = time.monotonic() + timeout
        while len(self.pool_ready(vm)) < restored or not self.pool_dirs():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label}: the pool of {vm} did not refill in "
                                   f"{timeout} s ({len(self.pool_ready(vm))} of {restored})")
            time.sleep(0.02)

    def pool_dirs(self):
        """The pool's clone directories (`RUN_DIR/pool-<pid>-<n>`)."""
        try:
            return sorted(n for n in os.listdir(self.run_dir) if n.startswith("pool-"))
        except OSError:
            return []

    def run_lines(self, uuid):
        out = []
        for p in self.procs:
            try:
                with open(p.log_path, errors="replace") as f:
                    for line in f:
                        m = RUN_LINE.match(line.rstrip("\n"))
                        if m and m.group(2) == uuid:
                            out.append((parse_ts(m.group(1)), m.group(3)))
            except OSError:
                pass
        return out

    def spawn(self, mode, extra_env=None):
        env = dict(self.env)
        env.update(extra_env or {})
        log_path = os.path.join(self.root, f"{mode}-{len(self.procs)}.log")
        with open(log_path, "wb") as logf:
            p = subprocess.Popen([BIN, mode], cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=logf, start_new_session=True)
        p.log_path = log_path
        self.procs.append(p)
        if mode in ("all", "api"):
            self.main_pid = p.pid
            self.api = self._connect(p)
        return p

    def _connect(self, p):
        deadline = time.monotonic() + 30
        port = None
        while port is None:
            if p.poll() is not None:
                raise RuntimeError(f"{self.label}: server exited ({p.returncode}): "
                                   + open(p.log_path, errors="replace").read()[-2000:])
            try:
                text = open(p.log_path, errors="replace").read()
            except OSError:
                text = ""
            m = re.search(r"API listening addr=[\d.]+:(\d+)", text)
            port = int(m.group(1)) if m else listening_port(p.pid)
            if port is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.label}: no listening port after 30 s")
                time.sleep(0.02)
        api = Api("127.0.0.1", port)
        while True:
            try:
                st, _ = api.call("GET", "/health", timeout=2)
                if st == 200:
                    return api
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label}: /health not OK after 30 s")
            time.sleep(0.02)

    def qemu_pids(self):
        """PIDs of this server's live QEMU processes (from the pidfiles in its run dir)."""
        pids = []
        try:
            names = os.listdir(self.run_dir)
        except OSError:
            return pids
        for n in names:
            try:
                with open(os.path.join(self.run_dir, n, "qemu.pid")) as f:
                    pid = int(f.read().strip())
            except (OSError, ValueError):
                continue
            if proc_alive(pid):
                pids.append(pid)
        return pids

    def qemu_pid(self, uuid):
        """PID of one request's QEMU, from its pidfile (None if there is none)."""
        try:
            with open(os.path.join(self.run_dir, uuid, "qemu.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def stop(self):
        if self.api is not None:
            self.api.close()
        # Agents before the API, each with SIGTERM and a generous wait (VMs are shut down).
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    log(f"{self.label}: pid {p.pid} ignored SIGTERM for 120 s; SIGKILL")
                    p.kill()
                    p.wait()
        self.procs = []
        if self.pg_db is not None:
            pg.drop_db(self.pg_db)
            self.pg_db = None
        shutil.rmtree(self.root, ignore_errors=True)
        if self in common.SERVERS:
            common.SERVERS.remove(self)


def concurrent_server(c, label, configs=None, trace=None):
    """An `all` server for `c` concurrent VMs (as many agents), with BOOT_TIMEOUT raised to
    300 s in its copy of the configs (default: `cold_configs()`): 8 TCG guests on 2 cores boot
    slowly."""
    configs = cold_configs() if configs is None else configs
    srv = Server(label=label, env={
        "SQLITE_SIM_MAX_CONCURRENT_VMS": str(c),
        "SQLITE_SIM_AGENT_COUNT": str(c),
    }, configs={n: set_key(t, "BOOT_TIMEOUT", "300") for n, t in configs.items()},
        trace=trace)
    srv.spawn("all")
    return srv


# ----------------------------------------------------------------------------------------
# When each system line of a request was produced


def line_times(srv, uuid, sys_logs):
    """[(epoch, line)] for every system line of a request: from the server's trace when
    available, else from the log rows (exact for a row's first line only)."""
    lines = srv.run_lines(uuid)
    if lines:
        return lines
    out = []
    for e in sys_logs:
        t = parse_ts(e["timestamp"])
        out.extend((t, line) for line in e["output"].splitlines())
    return out


def first_ts(lines, prefix):
    return next((t for t, line in lines if line.startswith(prefix)), None)
