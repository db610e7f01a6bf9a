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


def _read_console_until(con, buf, done, deadline, what):
    """Reads the console into `buf` until `done(buf)`; returns `buf`."""
    while not done(buf):
        r, _, _ = select.select([con], [], [], max(0, deadline - time.monotonic()))
        if not r:
            raise TimeoutError(f"raw baseline: no {what}")
        chunk = con.recv(65536)
        if not chunk:
            raise EOFError("raw baseline: console closed")
        buf += chunk
    return buf


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
        with open(os.path.join(d, "qemu.stderr"), "wb") as errf:
            p = subprocess.Popen([qemu] + args, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=errf, start_new_session=True)
        common.CHILDREN.append(p)
        qmp = Qmp(connect_unix(os.path.join(d, "qmp.sock"), deadline))
        qmp.read_msg(deadline)  # greeting
        qmp.execute("qmp_capabilities", deadline)
        con = connect_unix(os.path.join(d, "console.sock"), deadline)
        qmp.execute("cont", deadline)
        t_cont = time.time()
        _read_console_until(con, b"", lambda b: prompt_re.search(ANSI.sub(b"", b[-512:])),
                            deadline, "prompt")
        t_prompt = time.time()
        con.sendall(b"echo hi\n")
        _read_console_until(con, b"", lambda b: b"\nhi\r\n" in b, deadline, "output")
        t_hi = time.time()
        qmp.execute("system_powerdown", deadline)
        # Keep draining console and QMP while the guest powers off.
        while p.poll() is None:
            r, _, _ = select.select([con, qmp.sock], [], [], 0.002)
            for s in r:
                try:
                    s.recv(65536)
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError("raw baseline: QEMU did not exit")
        t_end = time.time()
        con.close()
        qmp.sock.close()
        if p.returncode != 0:
            raise RuntimeError(f"raw QEMU exited {p.returncode}")
        return {
            "total": t_end - t0,
            "overlay": t_overlay - t0,
            "launch": t_cont - t_overlay,
            "boot": t_prompt - t_cont,
            "run": t_hi - t_prompt,
            "shutdown": t_end - t_hi,
        }
    finally:
        if p is not None:
            if p.poll() is None:
                p.kill()
                p.wait()
            if p in common.CHILDREN:
                common.CHILDREN.remove(p)
        shutil.rmtree(d, ignore_errors=True)
