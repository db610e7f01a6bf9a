"""What processes cost: CPU, threads, context switches and memory from /proc, host-wide CPU,
`perf` profiles and counters, and a sampler of other people's heavy processes."""

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time

from .common import log

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_alive(pid):
    """True while the process exists and has not exited (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _stat_cpu_seconds(path):
    """utime + stime from a /proc stat file, in seconds."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu_seconds(pid):
    """utime + stime of one process, in seconds (None if it is gone)."""
    try:
        return _stat_cpu_seconds(f"/proc/{pid}/stat")
    except (OSError, IndexError, ValueError):
        return None


def proc_children_cpu_seconds(pid):
    """cutime + cstime: CPU of a process's children it has waited for (its QEMUs, qemu-img)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[13]) + int(fields[14])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def thread_cpu(pid):
    """{tid: cpu seconds} for every thread of a process ({} if it is gone)."""
    out = {}
    if not pid:
        return out
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            out[tid] = _stat_cpu_seconds(f"/proc/{pid}/task/{tid}/stat")
        except (OSError, IndexError, ValueError):
            pass
    return out


def ctx_switches(pid):
    """Context switches (voluntary + involuntary) summed over a process's live threads."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except (OSError, ValueError):
            pass
    return total


def host_cpu():
    """(busy, total) jiffies from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def busy_fraction(before, after):
    """Share of the host's CPU time that was busy between two `host_cpu()` readings."""
    return (after[0] - before[0]) / max(1, after[1] - before[1])


def vm_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def smaps_rollup_kib(pid):
    """{field: KiB} from /proc/PID/smaps_rollup (Rss, Pss, Pss_Anon, Pss_File, Shared_Clean,
    Private_Dirty, ...); None if the process is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        return None
    return out or None


# ----------------------------------------------------------------------------------------
# perf

# perf symbol categories, checked in order (user space, then kernel).
PROFILE_CATEGORIES = [
    ("regex compilation", False, r"regex_automata|regex_syntax|regex::"),
    ("SQL parsing/preparing", False,
     r"sqlite3RunParser|yy_reduce|yy_|keywordCode|sqlite3GetToken|sqlite3Prepare|sqlite3Locate"
     r"|sqlite3Select|sqlite3Expr|sqlite3Parser|sqlite3Resolve|sqlite3Code|sqlite3Where"),
    ("SQLite execution, WAL and pages", False,
     r"sqlite3|^wal|^pager|^btree|Vdbe|^pcache|^balance|^moveTo|^getAndInit|^unixRead|^unix"),
    ("memory allocator", False, r"malloc|free|_int_|realloc|unlink_chunk|consolidate|memalign"),
    ("user-space locks and thread hand-offs", False,
     r"lll_lock|lll_unlock|pthread_mutex|pthread_cond|Condvar|futex|parking_lot|blocking::pool"),
    ("kernel: context switches and futex wake-ups", True,
     r"finish_task_switch|futex|_raw_spin_unlock_irqrestore|schedule|try_to_wake_up|switch_"),
    ("kernel: other (TCP/unix sockets, syscalls, interrupts)", True, r"."),
    ("other user space (tokio, hyper, serde, JSON, ...)", False, r"."),
]


def perf_profile(pid, seconds):
    """Samples one process with `perf record` for `seconds`; returns
    {"categories": [(name, pct)], "top": [(pct, kind, sym)]} or None."""
    if not shutil.which("perf"):
        return None
    fd, data = tempfile.mkstemp(prefix="bperf-", suffix=".data", dir="/tmp")
    os.close(fd)
    try:
        subprocess.run(["perf", "record", "-q", "-F", "499", "-o", data, "-p", str(pid), "--",
                        "sleep", str(seconds)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=seconds + 60, check=True)
        rep = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children",
                              "--sort", "sym", "--percent-limit", "0"],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    except (subprocess.SubprocessError, OSError) as e:
        log(f"perf failed: {e}")
        return None
    finally:
        os.unlink(data)
    samples = []
    for line in rep.splitlines():
        m = re.match(r"^\s+([\d.]+)%\s+\[(.)\]\s+(.*?)\s*$", line)
        if m:
            samples.append((float(m.group(1)), m.group(2), m.group(3)))
    if not samples:
        return None
    cats = {name: 0.0 for name, _, _ in PROFILE_CATEGORIES}
    for pct_, kind, sym in samples:
        for name, kernel, rx in PROFILE_CATEGORIES:
            if (kind == "k") == kernel and re.search(rx, sym):
                cats[name] += pct_
                break
    ranked = sorted(((v, k) for k, v in cats.items() if v >= 0.5), reverse=True)
    top = [s for s in sorted(samples, reverse=True) if s[1] != "k"][:6]
    return {"categories": [(k, v) for v, k in ranked], "top": top}


def perf_count(pid, events, seconds):
    """Counts perf events (e.g. syscall tracepoints) of one process for `seconds`."""
    if not shutil.which("perf") or not pid:
        return None
    try:
        out = subprocess.run(["perf", "stat", "-x,", "-e", ",".join(events), "-p", str(pid),
                              "--", "sleep", str(seconds)], capture_output=True, text=True,
                             timeout=seconds + 60).stderr
    except (subprocess.SubprocessError, OSError):
        return None
    counts = {}
    for line in out.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[2] in events and parts[0].strip().isdigit():
            counts[parts[2]] = int(parts[0])
    return counts or None


def prof_summary(prof):
    cats = ", ".join(f"{name} {v:.0f}%" for name, v in prof["categories"])
    top = ", ".join(f"`{sym[:60]}` {p:.1f}%" for p, _, sym in prof["top"])
    return f"{cats}; top user-space symbols: {top}"


# ----------------------------------------------------------------------------------------
# Other people's load


class OthersSampler(threading.Thread):
    """Counts other people's heavy processes (cargo, rustc, QEMU not started by this script)
    every 2 s, so that each figure can say whether it shared the CPUs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples = []  # (time, count)
        self.window_start = time.time()

    @staticmethod
    def count():
        n = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
                if comm not in ("cargo", "rustc", "qemu-system-x86"):
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            # An empty cmdline is a process that just exited (a zombie): not running.
            if not cmd or b"/tmp/bsim-" in cmd or b"/tmp/braw-" in cmd:
                continue
            n += 1
        return n

    def run(self):
        while True:
            self.samples.append((time.time(), self.count()))
            time.sleep(2)

    def window(self):
        """(samples with others running, samples) since the current figure began."""
        w = [c for t, c in self.samples if t >= self.window_start]
        return sum(1 for c in w if c > 0), len(w)
