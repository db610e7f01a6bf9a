"""Figure 12: memory of N concurrent warm clones against N cold VMs of `tiny`: the PSS of each
QEMU (its proportional share of the pages it shares) beside its RSS, from
/proc/PID/smaps_rollup, while all N run `sleep`."""

import time

from ..common import TERMINAL, log, med
from ..http import system_line
from ..procstat import smaps_rollup_kib
from ..record import emit
from ..server import concurrent_server, warm_tiny_configs
from . import Figure

FIELDS = ["Rss", "Pss", "Pss_Anon", "Pss_File", "Shared_Clean", "Shared_Dirty",
          "Private_Clean", "Private_Dirty"]


def sample(srv, n, boot, sleep_s):
    """N requests running `sleep`; once every one's commands have started, one smaps_rollup
    per QEMU (after a second's settling). Then they are cancelled. [{field: KiB}]."""
    api = srv.api
    uuids = [api.submit(f"sleep {sleep_s}", timeout=600, boot=boot) for _ in range(n)]
    try:
        for u in uuids:
            api.wait_system_line(u, "commands started", timeout=600)
        time.sleep(1)
        pids = [srv.qemu_pid(u) for u in uuids]
        out = [smaps_rollup_kib(p) for p in pids if p]
        if len(out) != n or any(x is None for x in out):
            raise RuntimeError(f"only {len(out)} of {n} QEMUs readable: {pids}")
        # boot_mode is recorded at the end: tell from the system log how each one started.
        want = "starting " if boot == "cold" else "restored from template"
        odd = [u for u in uuids if system_line(api.logs(u, "system"), want) is None]
        if odd:
            raise RuntimeError(f"{len(odd)} of {n} {boot or 'warm'} requests did not start "
                               f"as asked (no '{want}' line)")
        return out
    finally:
        for u in uuids:
            api.put_status(u, "cancelled")
        for u in uuids:
            r = api.wait_terminal(u, poll=0.1, timeout=120)
            if r["status"] not in TERMINAL:
                raise RuntimeError(f"{u} not ended: {r['status']}")


def figure12(n, runs):
    log(f"figure 12: PSS and RSS of {n} concurrent warm clones vs {n} cold VMs, {runs} run(s)")
    srv = concurrent_server(n, "clonemem", configs=warm_tiny_configs(pool=0))
    warm, cold = [], []
    try:
        _dir, meta = srv.wait_template("tiny")
        for i in range(runs):
            warm += sample(srv, n, None, 30)
            cold += sample(srv, n, "cold", 120)
            log(f"  run {i + 1}/{runs}: PSS per clone {med([x['Pss'] for x in warm]) / 1024:.1f}"
                f" MiB (RSS {med([x['Rss'] for x in warm]) / 1024:.1f}), per cold VM "
                f"{med([x['Pss'] for x in cold]) / 1024:.1f} MiB "
                f"(RSS {med([x['Rss'] for x in cold]) / 1024:.1f})")
    finally:
        srv.stop()

    def mib(xs, f):
        return [x.get(f, 0) / 1024 for x in xs]

    wp, wr = med(mib(warm, "Pss")), med(mib(warm, "Rss"))
    cp, cr = med(mib(cold, "Pss")), med(mib(cold, "Rss"))
    shared = med(mib(warm, "Shared_Clean")) + med(mib(warm, "Shared_Dirty"))
    note = (f"{n} QEMUs at once, each running `sleep` (sampled once every one's commands had "
            f"started), {runs} run(s). A clone: PSS {wp:.1f} MiB, RSS {wr:.1f} MiB, of which "
            f"{shared:.1f} MiB shared with other processes (the template's RAM file, mapped "
            f"copy-on-write by every clone: its pages count 1/{n} in each clone's PSS, plus "
            f"QEMU's own binary and libraries); it privately dirtied "
            f"{med(mib(warm, 'Private_Dirty')):.1f} MiB. A cold VM: PSS {cp:.1f} MiB, RSS "
            f"{cr:.1f} MiB, nearly all private: {med(mib(cold, 'Pss_Anon')):.1f} MiB of anonymous "
            "memory (its guest RAM, as much as the boot touched, and TCG's translation buffer; a "
            "clone's anonymous memory is the pages it wrote and its own translations). "
            f"{n} clones: {wp * n:.0f} MiB of PSS "
            f"against {cp * n:.0f} MiB for {n} cold VMs ({wp / cp:.2f}x); the template's RAM "
            f"file is {meta['size_bytes'] / 2**20:.0f} MiB on disk (meta.json size_bytes, with "
            "state and disk), in the page cache once, whatever the number of clones.")
    detail = {"columns": ["smaps_rollup (median per QEMU)", "warm clone MiB", "cold VM MiB"],
              "rows": [[f, med(mib(warm, f)), med(mib(cold, f))] for f in FIELDS]}
    emit("12", f"PSS per QEMU, {n} concurrent warm clones", "MiB", mib(warm, "Pss"),
         target="reported; shared pages visible", ok=None, digits=1, note=note, detail=detail)
    emit("12", f"  RSS per QEMU, {n} concurrent warm clones", "MiB", mib(warm, "Rss"), digits=1)
    emit("12", f"PSS per QEMU, {n} concurrent cold VMs", "MiB", mib(cold, "Pss"),
         target="reported", digits=1)
    emit("12", f"  RSS per QEMU, {n} concurrent cold VMs", "MiB", mib(cold, "Rss"), digits=1)
    emit("12", f"  total PSS, {n} clones / {n} cold VMs", "x", [wp / cp], median=wp / cp,
         target="reported", digits=2)


def _run(ctx):
    figure12(*ctx.pick((2, 1), (8, 2)))


FIGURE = Figure("12", "12", _run)
