#!/usr/bin/env python3
"""Record QMP transcripts from a real QEMU running the tiny guest.

Writes one JSON Lines file per scenario into qmp-fixtures/ (see the README
there for the format).  Each scenario uses a fresh QEMU process so that
every transcript starts with the greeting.  Python 3 stdlib only.

Usage: python3 scripts/record-qmp-fixtures.py [--image IMG] [--out DIR]
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = b"root@tiny:~# "
IO_TIMEOUT = 10.0  # seconds for any single QMP read
BOOT_TIMEOUT = 60.0


class Console:
    """Drains the guest serial console so the guest never blocks on it."""

    def __init__(self, path):
        self.sock = connect_unix(path)
        self.buf = bytearray()
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self):
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                data = b""
            with self.cond:
                if not data:
                    self.cond.notify_all()
                    return
                self.buf += data
                self.cond.notify_all()

    def wait_for(self, pattern, timeout):
        deadline = time.monotonic() + timeout
        with self.cond:
            while pattern not in self.buf:
                left = deadline - time.monotonic()
                if left <= 0 or not self.thread.is_alive():
                    tail = bytes(self.buf[-200:])
                    raise RuntimeError(f"no {pattern!r} on console; tail: {tail!r}")
                self.cond.wait(min(left, 0.5))

    def close(self):
        self.sock.close()


class Transcript:
    """A QMP connection that records every message in wire order."""

    def __init__(self, path):
        self.sock = connect_unix(path)
        self.sock.settimeout(IO_TIMEOUT)
        self.rfile = self.sock.makefile("rb")
        self.lines = []
        self.next_id = 1
        self.reset = False  # connection ended by ECONNRESET, not EOF

    def recv(self):
        """Next message from QEMU, or None when the connection closed."""
        try:
            raw = self.rfile.readline()
        except ConnectionResetError:
            # QEMU reads QMP input byte by byte and stops reading once a
            # command is dispatched; if it exits (quit) with our trailing
            # "\n" unread, the kernel reports ECONNRESET instead of EOF.
            # Everything QEMU sent before that has already been read.
            self.reset = True
            return None
        if not raw:
            return None
        msg = json.loads(raw)
        self.lines.append({"dir": "recv", "msg": msg})
        return msg

    def send(self, execute, arguments=None):
        msg = {"execute": execute}
        if arguments is not None:
            msg["arguments"] = arguments
        msg["id"] = self.next_id
        self.next_id += 1
        self.lines.append({"dir": "send", "msg": msg})
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        return msg["id"]

    def command(self, execute, arguments=None):
        """Send a command; record events until its reply; return the reply."""
        cid = self.send(execute, arguments)
        while True:
            msg = self.recv()
            if msg is None:
                raise RuntimeError(f"connection closed waiting for reply to {execute}")
            if msg.get("id") == cid and ("return" in msg or "error" in msg):
                return msg

    def wait_event(self, name):
        while True:
            msg = self.recv()
            if msg is None:
                raise RuntimeError(f"connection closed waiting for {name}")
            if msg.get("event") == name:
                return msg

    def saw_event(self, name):
        return any(l["msg"].get("event") == name for l in self.lines)

    def until_closed(self):
        """Record everything QEMU sends until it closes the socket."""
        while self.recv() is not None:
            pass

    def handshake(self):
        greeting = self.recv()
        if not greeting or "QMP" not in greeting:
            raise RuntimeError(f"bad greeting: {greeting!r}")
        expect_return(self.command("qmp_capabilities"))

    def close(self):
        self.rfile.close()
        self.sock.close()


class Qemu:
    """One QEMU process with QMP and console on unix sockets in a temp dir."""

    def __init__(self, qemu, image, tmp, paused):
        self.tmp = tmp
        self.qmp_path = os.path.join(tmp, "qmp.sock")
        con_path = os.path.join(tmp, "console.sock")
        for p in (self.qmp_path, con_path):
            if os.path.exists(p):
                os.unlink(p)
        args = [
            qemu, "-accel", "tcg", "-nodefaults", "-no-user-config",
            "-display", "none", "-m", "128M", "-smp", "1",
            "-drive", f"file={image},if=virtio,format=qcow2,snapshot=on",
            "-chardev", f"socket,id=con0,path={con_path},server=on,wait=off",
            "-serial", "chardev:con0", "-serial", "null",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if paused:
            args.append("-S")
        self.stderr = open(os.path.join(tmp, "qemu.stderr"), "w+b")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                     stdout=self.stderr, stderr=self.stderr)
        self.console = None
        try:
            self.console = Console(self._wait_socket(con_path))
        except BaseException as e:
            try:  # a refused connect usually means QEMU is exiting
                died = self.proc.wait(timeout=1) is not None
            except subprocess.TimeoutExpired:
                died = False
            self.stderr.seek(0)
            err = self.stderr.read().decode(errors="replace").strip()
            self.close()  # never leave a QEMU behind
            if died and isinstance(e, OSError):
                raise RuntimeError(f"qemu exited: {err}") from e
            raise

    def _wait_socket(self, path):
        deadline = time.monotonic() + IO_TIMEOUT
        while not os.path.exists(path):
            if self.proc.poll() is not None:
                self.stderr.seek(0)
                raise RuntimeError(f"qemu exited: {self.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"qemu did not create {path}")
            time.sleep(0.01)
        return path

    def qmp(self):
        return Transcript(self._wait_socket(self.qmp_path))

    def close(self):
        # Kill unconditionally: scenarios that end QEMU themselves are done.
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.console:
            self.console.close()
        self.stderr.close()


def connect_unix(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def expect_return(reply):
    if "return" not in reply:
        raise RuntimeError(f"unexpected reply: {reply!r}")
    return reply["return"]


def expect_error(reply, cls):
    if reply.get("error", {}).get("class") != cls:
        raise RuntimeError(f"expected {cls} error, got {reply!r}")


# --- Scenarios: each takes a fresh Qemu and returns the transcript lines. ---

def sc_handshake(vm):
    t = vm.qmp()
    t.handshake()
    return t


def sc_query_status(vm):
    t = vm.qmp()
    t.handshake()
    st = expect_return(t.command("query-status"))
    assert st["status"] == "prelaunch" and not st["running"], st
    t.command("cont")
    if not t.saw_event("RESUME"):
        t.wait_event("RESUME")
    st = expect_return(t.command("query-status"))
    assert st["running"], st
    return t


def sc_stop_cont(vm):
    vm.console.wait_for(PROMPT, BOOT_TIMEOUT)
    t = vm.qmp()
    t.handshake()
    t.command("stop")
    if not t.saw_event("STOP"):
        t.wait_event("STOP")
    st = expect_return(t.command("query-status"))
    assert st["status"] == "paused", st
    t.command("cont")
    if not t.saw_event("RESUME"):
        t.wait_event("RESUME")
    return t


def sc_powerdown(vm):
    vm.console.wait_for(PROMPT, BOOT_TIMEOUT)
    t = vm.qmp()
    t.handshake()
    expect_return(t.command("system_powerdown"))
    # Without -no-shutdown QEMU exits after the guest powers off.
    t.until_closed()
    if not t.saw_event("SHUTDOWN"):
        raise RuntimeError("no SHUTDOWN event after system_powerdown")
    return t


def sc_quit(vm):
    vm.console.wait_for(PROMPT, BOOT_TIMEOUT)
    t = vm.qmp()
    t.handshake()
    expect_return(t.command("quit"))
    t.until_closed()
    return t


def sc_error(vm):
    t = vm.qmp()
    t.handshake()
    expect_error(t.command("no-such-command"), "CommandNotFound")
    expect_error(t.command("query-status", {"bogus": 1}), "GenericError")
    return t


def sc_unknown_event(vm):
    # Real query-status exchange, then a made-up event spliced in between
    # the command and its reply (marked "synthetic").
    t = vm.qmp()
    t.handshake()
    before = time.time()
    expect_return(t.command("query-status"))
    send_idx = max(i for i, l in enumerate(t.lines) if l["dir"] == "send")
    secs, usecs = int(before), int((before % 1) * 1e6)
    fake = {
        "dir": "recv",
        "synthetic": True,
        "msg": {
            "timestamp": {"seconds": secs, "microseconds": usecs},
            "event": "X_SQLITE_SIM_FUTURE_EVENT",
            "data": {"reason": "forward-compatibility test", "count": 1},
        },
    }
    t.lines.insert(send_idx + 1, fake)
    return t


# name -> (scenario, start paused with -S)
SCENARIOS = [
    ("handshake", sc_handshake, True),
    ("query-status", sc_query_status, True),
    ("stop-cont", sc_stop_cont, False),
    ("powerdown", sc_powerdown, False),
    ("quit", sc_quit, False),
    ("error", sc_error, True),
    ("unknown-event", sc_unknown_event, True),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default=os.path.join(REPO, "vm_images", "tiny.qcow2"))
    ap.add_argument("--out", default=os.path.join(REPO, "qmp-fixtures"))
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--only", action="append", help="record just this scenario")
    opts = ap.parse_args()
    if not os.path.exists(opts.image):
        sys.exit(f"{opts.image} missing; run scripts/build-tiny-image.sh first")
    os.makedirs(opts.out, exist_ok=True)

    tmp = tempfile.mkdtemp(prefix="qmp-fixtures-")
    try:
        for name, scenario, paused in SCENARIOS:
            if opts.only and name not in opts.only:
                continue
            vm = Qemu(opts.qemu, opts.image, tmp, paused)
            try:
                t = scenario(vm)
                t.close()
            finally:
                vm.close()
            path = os.path.join(opts.out, f"{name}.jsonl")
            with open(path, "w") as f:
                for line in t.lines:
                    f.write(json.dumps(line) + "\n")
            how = " (closed by ECONNRESET)" if t.reset else ""
            print(f"{path}: {len(t.lines)} lines{how}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
