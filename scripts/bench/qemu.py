"""Plain QEMU driven the way the agent drives it (overlay, `-S`, QMP, the console socket), for
the raw baseline of figure 1, and `qemu-img create` of an overlay."""

import json
import os
import re
import select
import shutil
import socket
import subprocess
import tempfile
import time

from . import common
from .common import CONFIGS, QEMU_IMG

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def prompt_regex():
    """The tiny VM's PROMPT, read from its config (the same regex the agent uses)."""
    with open(os.path.join(CONFIGS, "tiny.conf")) as f:
        for line in f:
            m = re.match(r'\s*PROMPT\s*=\s*"(.*)"\s*$', line)
            if m:
                return re.compile((m.group(1) + "$").encode())
    return re.compile(rb"[#$] $")


def parse_starting_line(line):
    """(qemu, accel, argv) from the agent's `starting QEMU (accel) ARGS` system line."""
    m = re.match(r"starting (\S+) \((\w+)\) (.*)$", line)
    if not m:
        raise RuntimeError(f"cannot parse: {line}")
    return m.group(1), m.group(2), m.group(3).split(" ")


def make_overlay(base_image, path):
    """A qcow2 overlay on `base_image`, made as the agent makes it."""
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base_image,
                    path], check=True, stdin=subprocess.DEVNULL)


def connect_unix(path, deadline):
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


class Qmp:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.next_id = 0

    def read_msg(self, deadline):
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("QMP")
            r, _, _ = select.select([self.sock], [], [], left)
            if r:
                d = self.sock.recv(65536)
                if not d:
                    raise EOFError("QMP closed")
                self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, cmd, deadline):
        self.next_id += 1
        self.sock.sendall(json.dumps({"execute": cmd, "id": self.next_id}).encode() + b"\n")
        while True:
            m = self.read_msg(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"QMP {cmd}: {m['error']}")
                return m


def _drain(socks, timeout):
    """Reads whatever is ready on `socks` within `timeout`; {sock: bytes}."""
    out = {}
    r, _, _ = select.select(socks, [], [], max(0.0, timeout))
    for s in r:
        try:
            out[s] = s.recv(65536)
        except OSError:
            out[s] = b""
    return out


class _Console:
    """The console socket, and the stderr port if the VM has one, which must be drained too (a
    chardev nobody reads stalls the guest). `who` names the run in errors."""

    def __init__(self, con, err=None, who="raw"):
        self.con, self.err, self.who = con, err, who
        self.buf = b""
        self.first_byte_at = None

    def socks(self):
        return [self.con] + ([self.err] if self.err is not None else [])

    def until(self, done, deadline, what):
        """Reads the console into `buf` until `done(buf)`; returns `buf`."""
        while not done(self.buf):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.who}: no {what}")
            got = _drain(self.socks(), left)
            if self.con in got:
                if not got[self.con]:
                    raise EOFError(f"{self.who}: console closed")
                if self.first_byte_at is None:
                    self.first_byte_at = time.time()
                self.buf += got[self.con]
        return self.buf

    def until_prompt(self, prompt_re, deadline):
        return self.until(lambda b: prompt_re.search(ANSI.sub(b"", b[-512:])), deadline,
                          "prompt")

    def step(self, line, deadline, n):
        """Types `line` followed by a marker command and waits for the marker's output; the
        seconds it took. The typed text holds `$((n))`, so only the output matches."""
        self.buf = b""
        marker = f"QM{n}QM".encode()
        t0 = time.time()
        cmd = (line + "; " if line else "") + f"echo QM$(({n}))QM\n"
        self.con.sendall(cmd.encode())
        # A clone's shell has the session set-up's `stty -echo -opost`: "\n", not "\r\n".
        self.until(lambda b: re.search(re.escape(marker) + rb"\r?\n", b), deadline,
                   f"marker {n}")
        return time.time() - t0

    def close(self):
        for s in self.socks():
            s.close()


def _spawn(qemu, args, d):
    """QEMU with `args` in run directory `d`, stderr to `d`/qemu.stderr (`_end` stops it)."""
    with open(os.path.join(d, "qemu.stderr"), "wb") as errf:
        p = subprocess.Popen([qemu] + args, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=errf, start_new_session=True)
    common.CHILDREN.append(p)
    return p


def _qmp(d, deadline):
    """The QMP connection of the QEMU in `d`, its handshake done."""
    qmp = Qmp(connect_unix(os.path.join(d, "qmp.sock"), deadline))
    qmp.read_msg(deadline)  # greeting
    qmp.execute("qmp_capabilities", deadline)
    return qmp


def _powerdown(p, qmp, con, deadline):
    """`system_powerdown`, draining the console and QMP until QEMU exits; then closes them."""
    qmp.execute("system_powerdown", deadline)
    while p.poll() is None:
        _drain(con.socks() + [qmp.sock], 0.002)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{con.who}: QEMU did not exit")
    con.close()
    qmp.sock.close()
    if p.returncode != 0:
        raise RuntimeError(f"raw QEMU exited {p.returncode}")


def _end(p, d):
    """Kills QEMU if it still runs and removes its run directory."""
    if p is not None:
        if p.poll() is None:
            p.kill()
            p.wait()
        if p in common.CHILDREN:
            common.CHILDREN.remove(p)
    shutil.rmtree(d, ignore_errors=True)


def raw_run(qemu, args_template, src_dir, base_image, prompt_re):
    """Plain QEMU with the agent's arguments: overlay, spawn (-S), QMP handshake, console,
    cont, wait for the prompt, type `echo hi`, wait for `hi`, system_powerdown, wait for exit.
    Returns the phases' durations in seconds."""
    d = tempfile.mkdtemp(prefix="braw-", dir="/tmp")
    args = [a.replace(src_dir, d) for a in args_template]
    p = None
    try:
        t0 = time.time()
        deadline = time.monotonic() + 300
        make_overlay(base_image, os.path.join(d, "disk.qcow2"))
        t_overlay = time.time()
        p = _spawn(qemu, args, d)
        qmp = _qmp(d, deadline)
        con = _Console(connect_unix(os.path.join(d, "console.sock"), deadline),
                       who="raw baseline")
        qmp.execute("cont", deadline)
        t_cont = time.time()
        con.until_prompt(prompt_re, deadline)
        t_prompt = time.time()
        con.buf = b""
        con.con.sendall(b"echo hi\n")
        con.until(lambda b: b"\nhi\r\n" in b, deadline, "output")
        t_hi = time.time()
        # Keep draining console and QMP while the guest powers off.
        _powerdown(p, qmp, con, deadline)
        t_end = time.time()
        return {
            "total": t_end - t0,
            "overlay": t_overlay - t0,
            "launch": t_cont - t_overlay,
            "boot": t_prompt - t_cont,
            "run": t_hi - t_prompt,
            "shutdown": t_end - t_hi,
        }
    finally:
        _end(p, d)


# ----------------------------------------------------------------------------------------
# A clone restored by hand: where a warm start's time goes (figure 9's profile)


def guest_steps(now=None):
    """(label, shell line) a warm job's guest side runs, as single steps: the clone set-up
    (RNG seed, clock), the upload and run (base64, a fresh sh, rm), a builtin for contrast.
    Run twice in one guest, the second pass shows the same work once TCG has translated it."""
    now = int(now or time.time())
    seed = "".join(f"\\{b:03o}" for b in os.urandom(64))
    return [
        ("shell builtin (`echo`)", "echo hi >/dev/null"),
        ("`sqsim-reseed` (64-byte seed)", f"printf '{seed}' | sqsim-reseed"),
        ("`date -u -s` (busybox applet)", f"date -u -s @{now} >/dev/null"),
        ("`base64 -d` (busybox applet)", "echo aGkK | base64 -d >/dev/null"),
        ("`/bin/busybox sh` running a script", "/bin/busybox sh -c 'echo hi' >/dev/null"),
        ("`rm -f`", "rm -f /tmp/none"),
    ]


def _qemu_stat(pid):
    """(cpu seconds, minor page faults) of a live process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])
    except (OSError, IndexError, ValueError):
        return None, None


def raw_probe(qemu, argv, src_dir, base_image, prompt_re, state=None):
    """Plain QEMU with the agent's argv (`src_dir` in it replaced by a fresh directory): an
    overlay on `base_image`, spawn, QMP; with `state`, `migrate-incoming` of that state file
    (a clone: `argv` must be a clone's, `-incoming defer`); `cont`; a cold guest boots to its
    prompt, a clone answers a first line; then `guest_steps()` twice, one step at a time, and
    `system_powerdown` until QEMU exits. Returns [(phase, seconds, QEMU CPU seconds, QEMU minor
    page faults)] in order (CPU and faults are None for phases without a QEMU)."""
    d = tempfile.mkdtemp(prefix="braw-", dir="/tmp")
    args = [a.replace(src_dir, d) for a in argv]
    p = None
    out = []
    last = {"t": time.time(), "cpu": None, "flt": None}

    def mark(label, since=None):
        now = time.time()
        cpu, flt = _qemu_stat(p.pid) if p is not None else (None, None)
        dc = None if cpu is None or last["cpu"] is None else cpu - last["cpu"]
        df = None if flt is None or last["flt"] is None else flt - last["flt"]
        out.append((label, now - (last["t"] if since is None else since), dc, df))
        last.update(t=now, cpu=cpu, flt=flt)

    try:
        deadline = time.monotonic() + 300
        make_overlay(base_image, os.path.join(d, "disk.qcow2"))
        mark("overlay (`qemu-img create`)")
        p = _spawn(qemu, args, d)
        qmp = _qmp(d, deadline)
        # The faults and CPU of QEMU's own start count from zero.
        last.update(cpu=0.0, flt=0)
        mark("QEMU start -> QMP handshake done")
        if state is not None:
            caps = [{"capability": c, "state": True} for c in ("x-ignore-shared", "events")]
            qmp.next_id += 1
            qmp.sock.sendall(json.dumps({
                "execute": "migrate-set-capabilities", "id": qmp.next_id,
                "arguments": {"capabilities": caps}}).encode() + b"\n")
            qmp.next_id += 1
            qmp.sock.sendall(json.dumps({
                "execute": "migrate-incoming", "id": qmp.next_id,
                "arguments": {"uri": f"exec:cat '{state}'"}}).encode() + b"\n")
            while True:
                m = qmp.read_msg(deadline)
                if "error" in m:
                    raise RuntimeError(f"raw clone: QMP {m['error']}")
                if m.get("event") == "MIGRATION" and m["data"]["status"] in (
                        "completed", "failed", "cancelled"):
                    if m["data"]["status"] != "completed":
                        raise RuntimeError(f"raw clone: migration {m['data']['status']}")
                    break
            mark("migrate-incoming (device state) -> MIGRATION completed")
        con = _Console(connect_unix(os.path.join(d, "console.sock"), deadline),
                       connect_unix(os.path.join(d, "stderr.sock"), deadline), who="raw clone")
        qmp.execute("cont", deadline)
        t_cont = time.time()
        mark("console connect + `cont`")
        if state is None:
            con.until_prompt(prompt_re, deadline)
            mark("`cont` -> shell prompt (the boot)")
            # The same terminal as a clone's (the agent's session set-up), not timed.
            con.step("stty -echo -opost 2>/dev/null; PS1=''", deadline, 999)
            mark("(the session's `stty` line)")
        else:
            # The template saved its shell waiting for a line, its (empty) prompt printed.
            con.step("", deadline, 999)
            mark("`cont` -> the shell answers a first line (builtin `echo`)")
            out.append(("  of which `cont` -> first console byte", con.first_byte_at - t_cont,
                        None, None))
        n = 1000
        for rnd in (1, 2):
            for label, line in guest_steps():
                n += 1
                con.step(line, deadline, n)
                mark(f"{label}, {'1st' if rnd == 1 else '2nd'} run")
        _powerdown(p, qmp, con, deadline)
        out.append(("`system_powerdown` -> QEMU gone", time.time() - last["t"], None, None))
        return out
    finally:
        _end(p, d)
