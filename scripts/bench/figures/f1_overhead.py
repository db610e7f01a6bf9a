"""Figure 1: end-to-end `echo hi` under the supervisor against raw QEMU with the same argv."""

import os
import time

from ..common import IMAGES, log, med, parse_ts
from ..qemu import parse_starting_line, prompt_regex, raw_run
from ..record import emit
from ..server import first_ts, line_times
from . import Figure


def supervisor_run(srv):
    """POST `echo hi`, poll every 20 ms until done. Returns timing dict."""
    api = srv.api
    t0 = time.time()
    uuid = api.submit("echo hi", timeout=300)
    r = api.wait_terminal(uuid, poll=0.02)
    t1 = time.time()
    if r["status"] != "done":
        raise RuntimeError(f"supervisor run ended {r['status']}: {r.get('error')}")
    lines = line_times(srv, uuid, api.logs(uuid, "system"))

    def ts(prefix):
        return first_ts(lines, prefix)

    # The exit marker is the first console chunk logged as `shutdown`.
    shut = api.logs(uuid, "shutdown")
    return {
        "uuid": uuid,
        "total": t1 - t0,
        "boot_ms": r.get("boot_ms"),
        "run_ms": r.get("run_ms"),
        "shutdown_ms": r.get("shutdown_ms"),
        "sent": t0,
        "claimed": ts("claimed by agent"),
        "starting": ts("starting "),
        "vcpus": ts("vCPUs started"),
        "prompt": ts("shell prompt after"),
        "cmd_started": ts("commands started"),
        "exited": parse_ts(shut[0]["timestamp"]) if shut else None,
        "ended": ts("VM ended by"),
        "finished": parse_ts(r["finished_at"]) if r.get("finished_at") else None,
        "observed": t1,
        "starting_line": next(line for _, line in lines if line.startswith("starting ")),
    }


def figure1(srv, n):
    log(f"figure 1: overhead, {n} alternating supervisor/raw runs (+1 warm-up each)")
    prompt_re = prompt_regex()
    base = os.path.join(IMAGES, "tiny.qcow2")
    warm = supervisor_run(srv)
    qemu, accel, args = parse_starting_line(warm["starting_line"])
    src_dir = os.path.join(srv.run_dir, warm["uuid"])
    log(f"  raw baseline argv ({accel}): {qemu} {' '.join(args)}")
    raw_run(qemu, args, src_dir, base, prompt_re)
    sup, raw = [], []
    for i in range(n):
        s = supervisor_run(srv)
        sup.append(s)
        rr = raw_run(qemu, args, src_dir, base, prompt_re)
        raw.append(rr)
        log(f"  run {i + 1}/{n}: supervisor {s['total']:.3f} s "
            f"(boot {s['boot_ms']} ms, run {s['run_ms']} ms, shutdown {s['shutdown_ms']} ms); "
            f"raw {rr['total']:.3f} s (boot {rr['boot'] * 1000:.0f} ms)")

    def sp(a, b):
        xs = [x[b] - x[a] for x in sup if x[a] is not None and x[b] is not None]
        return med(xs) * 1000 if xs else None

    def rp(*keys):
        return med([sum(r[k] for k in keys) for r in raw]) * 1000

    sup_med, raw_med = med([s["total"] for s in sup]), med([r["total"] for r in raw])
    ratio = sup_med / raw_med
    # Comparable phases (supervisor, raw), then the supervisor's sub-steps.
    phases = [
        ("before QEMU: supervisor POST -> claim -> overlay; raw: overlay",
         sp("sent", "starting"), rp("overlay")),
        ("launch: spawn, QMP handshake, console connected, `cont`",
         sp("starting", "vcpus"), rp("launch")),
        ("guest boot: `cont` -> shell prompt", sp("vcpus", "prompt"), rp("boot")),
        ("command: prompt -> done (supervisor: set-up, upload, exit marker; raw: `hi` read back)",
         sp("prompt", "exited"), rp("run")),
        ("shutdown: -> QEMU gone (supervisor: stderr end marker, then ACPI)",
         sp("exited", "ended"), rp("shutdown")),
        ("finish: VM ended -> `done` seen by the client", sp("ended", "observed"), 0.0),
    ]
    subs = [
        ("  of which POST sent -> claimed (HTTP, insert, wake-up, claim)", sp("sent", "claimed")),
        ("  of which claimed -> starting (run dir, `qemu-img create`)", sp("claimed", "starting")),
        ("  of which prompt -> commands started (stty line, base64 upload, acks)",
         sp("prompt", "cmd_started")),
        ("  of which commands started -> exit marker", sp("cmd_started", "exited")),
        ("  of which VM ended -> finished_at (drain, log commit, final UPDATE)",
         sp("ended", "finished")),
        ("  of which finished_at -> seen by the client (20 ms polling)",
         sp("finished", "observed")),
    ]
    rows = []
    for name, a, b in phases:
        rows.append([name, a, b, None if a is None or b is None else a - b])
    rows += [[name, a, None, None] for name, a in subs]
    rows.append(["total (medians of totals)", sup_med * 1000, raw_med * 1000,
                 (sup_med - raw_med) * 1000])
    detail = {"columns": ["phase", "supervisor ms", "raw QEMU ms", "difference ms"],
              "rows": rows}
    boot_diff = rows[2][3] or 0.0
    non_boot = sum(r[3] for i, r in enumerate(rows[:len(phases)]) if i != 2 and r[3] is not None)
    costly = sorted(((r[3], r[0].split(":")[0]) for r in rows[:len(phases)]
                     if r[3] is not None and not r[0].startswith("guest boot")), reverse=True)
    sboot = [(x["prompt"] - x["vcpus"]) * 1000 for x in sup if x["prompt"] and x["vcpus"]]
    rboot = [r["boot"] * 1000 for r in raw]
    overlap = max(min(sboot), min(rboot)) <= min(max(sboot), max(rboot))
    note = (f"supervisor {sup_med:.3f} s vs raw QEMU {raw_med:.3f} s (medians of {n} alternating "
            f"pairs): {(sup_med - raw_med) * 1000:+.0f} ms, ratio {ratio:.3f}. The guest boot "
            f"(`cont` -> prompt, identical QEMU arguments) took {med(sboot):.0f} ms "
            f"(min {min(sboot):.0f}, max {max(sboot):.0f}) under the supervisor and "
            f"{med(rboot):.0f} ms (min {min(rboot):.0f}, max {max(rboot):.0f}) raw: ")
    if n < 3:
        note += (f"with {n} pair(s) its {boot_diff:+.0f} ms difference cannot be told apart from "
                 "TCG run-to-run variation. ")
    elif overlap:
        note += (f"the ranges overlap, so its {boot_diff:+.0f} ms difference is TCG run-to-run "
                 f"variation; with the boot counted equal the ratio would be "
                 f"{(sup_med * 1000 - boot_diff) / (raw_med * 1000):.3f}. ")
    else:
        note += (f"the ranges do not overlap, so the {boot_diff:+.0f} ms difference is "
                 "systematic in this run. ")
    note += (f"Outside the boot the supervisor adds {non_boot:+.0f} ms, mostly: "
             + "; ".join(f"{name} {d:+.0f} ms" for d, name in costly[:3])
             + " (the command phase is the session set-up line and the acknowledged base64 "
               "upload, see the sub-rows).")
    emit("1", "end-to-end `echo hi`, supervisor (POST -> done)", "s", [s["total"] for s in sup])
    emit("1", "end-to-end `echo hi`, raw QEMU baseline", "s", [r["total"] for r in raw])
    emit("1", "  supervisor boot_ms", "ms", [s["boot_ms"] for s in sup], digits=0)
    emit("1", "  supervisor run_ms", "ms", [s["run_ms"] for s in sup], digits=0)
    emit("1", "  supervisor shutdown_ms", "ms", [s["shutdown_ms"] for s in sup], digits=0)
    ratios = [s["total"] / r["total"] for s, r in zip(sup, raw)]
    emit("1", "end-to-end overhead (ratio of medians; min/max of pairs)", "x", ratios,
         target="<= 1.10", ok=ratio <= 1.10, note=note, detail=detail, median=ratio)


def _run(ctx):
    figure1(ctx.server, ctx.runs or ctx.pick(1, 5))


FIGURE = Figure("1", "1", _run, shared_server=True)
