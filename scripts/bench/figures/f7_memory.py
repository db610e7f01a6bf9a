"""Figure 7: the supervisor's RSS idle and with several concurrent tiny VMs."""

import time

from ..common import TERMINAL, log, med
from ..procstat import vm_rss_kib
from ..record import emit
from ..server import concurrent_server
from . import Figure


def figure7(nvms, runs, sleep_s):
    log(f"figure 7: supervisor RSS idle and with {nvms} concurrent tiny VMs, {runs} run(s)")
    idle_l, peak_l, per_l, notes = [], [], [], []
    for i in range(runs):
        srv = concurrent_server(nvms, "memory")
        try:
            time.sleep(2)
            idle = vm_rss_kib(srv.main_pid)
            uuids = [srv.api.submit(f"sleep {sleep_s}; echo x", timeout=300)
                     for _ in range(nvms)]
            peak, seen_all, max_up = None, 0, 0
            deadline = time.monotonic() + 600
            while True:
                up = len(srv.qemu_pids())
                max_up = max(max_up, up)
                rss = vm_rss_kib(srv.main_pid)
                if up >= nvms:
                    seen_all += 1
                    peak = rss if peak is None else max(peak, rss)
                states = [srv.api.get(u)["status"] for u in uuids]
                if all(s in TERMINAL for s in states):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("memory run did not finish in 600 s")
                time.sleep(0.2)
            after = vm_rss_kib(srv.main_pid)
            bad = [s for s in states if s != "done"]
            if bad:
                raise RuntimeError(f"memory run: {len(bad)} requests ended {bad}")
            if peak is None:
                raise RuntimeError(f"never {nvms} QEMUs up at once (max {max_up})")
        finally:
            srv.stop()
        idle_l.append(idle / 1024)
        peak_l.append(peak / 1024)
        per_l.append((peak - idle) / 1024 / nvms)
        notes.append((seen_all, after / 1024))
        log(f"  run {i + 1}/{runs}: idle {idle / 1024:.1f} MiB, peak with {nvms} VMs "
            f"{peak / 1024:.1f} MiB ({seen_all} samples with all up; after {after / 1024:.1f} MiB)")
    emit("7", "supervisor RSS, idle", "MiB", idle_l, digits=1)
    emit("7", f"supervisor RSS, {nvms} concurrent VMs (peak)", "MiB", peak_l, digits=1,
         note=f"sampled every 200 ms: {min(n for n, _ in notes)} to {max(n for n, _ in notes)} "
              f"samples per run with all {nvms} QEMUs up; RSS once all were done "
              f"{min(a for _, a in notes):.1f} to {max(a for _, a in notes):.1f} MiB")
    emit("7", "supervisor RSS per VM ((peak - idle) / VMs)", "MiB", per_l, target="<= 2",
         ok=med(per_l) <= 2, digits=2,
         note=f"VmRSS of `sqlite-sim all` (QEMU is a separate process), sampled every 200 ms "
              f"while all {nvms} QEMUs ran `sleep {sleep_s}; echo x`")


def _run(ctx):
    nvms, runs = ctx.pick((2, 1), (8, 3))
    figure7(nvms, runs, 30)


FIGURE = Figure("7", "7", _run)
