"""Paths, logging and small helpers every module uses, and the registry of processes and
servers this run started, so that it (and only it) is cleaned up on exit."""

import atexit
import datetime
import os
import signal
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The binary `cargo build --release` made: under CARGO_TARGET_DIR when that is set (as
# scripts/bench.sh's cargo sees it, relative to the repository), else target/.
TARGET_DIR = os.path.join(REPO, os.environ.get("CARGO_TARGET_DIR") or "target")
BIN = os.path.join(TARGET_DIR, "release", "sqlite-sim")
IMAGES = os.path.join(REPO, "vm_images")
CONFIGS = os.path.join(REPO, "vm_configs")
QEMU = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"
TERMINAL = ("done", "failed", "cancelled")


def log(msg):
    print(f"[bench_vm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_ts(s):
    """RFC 3339 UTC with microseconds (`2026-11-29T13:30:38.325823Z`) -> epoch seconds."""
    return (
        datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ")
        .replace(tzinfo=datetime.timezone.utc)
        .timestamp()
    )


def med(xs):
    return statistics.median(xs) if xs else None


def pctl(xs, p):
    """The p-th percentile by nearest rank (p99 of fewer than 100 samples is their maximum)."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    rank = max(1, -(-len(xs) * p // 100))  # ceil
    return xs[int(rank) - 1]


# ----------------------------------------------------------------------------------------
# Everything this run started

SERVERS = []  # server.Server objects not yet stopped
CHILDREN = []  # subprocess.Popen objects (raw QEMU) not yet reaped


def cleanup():
    for c in list(CHILDREN):
        if c.poll() is None:
            c.kill()
            c.wait()
    for s in list(SERVERS):
        try:
            s.stop()
        except Exception as e:  # noqa: BLE001 - best effort at exit
            log(f"cleanup of {s.label}: {e}")


def _on_signal(signum, _frame):
    log(f"signal {signum}: stopping my servers")
    cleanup()
    sys.exit(128 + signum)


def install_cleanup():
    """Stop this run's servers and children at exit and on SIGINT, SIGTERM and SIGHUP."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    atexit.register(cleanup)
