"""Figure 2: pickup latency, created_at -> `starting qemu`, in `all` mode and in split
`api` + `agents` mode: on SQLite (the `PRAGMA data_version` change check, and polling only as
the old baseline) and on PostgreSQL (LISTEN/NOTIFY)."""

import os
import random
import shutil
import tempfile
import time

from ..common import IMAGES, log, med, parse_ts
from ..qemu import make_overlay
from ..record import emit
from ..server import Server, first_ts, line_times
from . import Figure


def pickup_samples(srv, n, jitter=0.0):
    api = srv.api
    out = []
    for i in range(n):
        if jitter:
            time.sleep(random.uniform(0, jitter))
        uuid = api.submit("echo hi", timeout=300)
        r = api.wait_terminal(uuid, poll=0.05)
        if r["status"] != "done":
            raise RuntimeError(f"pickup run ended {r['status']}: {r.get('error')}")
        lines = line_times(srv, uuid, api.logs(uuid, "system"))
        created = parse_ts(r["created_at"])
        start = first_ts(lines, "starting ")
        claimed = first_ts(lines, "claimed by agent")
        out.append({"pickup": (start - created) * 1000, "claim": (claimed - created) * 1000,
                    "prepare": (start - claimed) * 1000})
        log(f"  pickup {i + 1}/{n}: {out[-1]['pickup']:.1f} ms "
            f"(claim {out[-1]['claim']:.1f} ms, overlay {out[-1]['prepare']:.1f} ms)")
    return out


def qemu_img_create_ms(n):
    """`qemu-img create` of the tiny overlay on its own, as the agent runs it."""
    d = tempfile.mkdtemp(prefix="bimg-", dir="/tmp")
    base = os.path.join(IMAGES, "tiny.qcow2")
    out = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            make_overlay(base, os.path.join(d, f"o{i}.qcow2"))
            out.append((time.perf_counter() - t0) * 1000)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return out


def figure2(srv_all, n, poll_interval=1.0):
    log(f"figure 2: pickup latency, {n} runs in `all` mode")
    s = pickup_samples(srv_all, n)
    p50 = med([x["pickup"] for x in s])
    claim, prep = med([x["claim"] for x in s]), med([x["prepare"] for x in s])
    img = med(qemu_img_create_ms(max(n, 5)))
    note = (f"created_at -> `starting qemu` p50 {p50:.1f} ms = created_at -> claimed p50 "
            f"{claim:.1f} ms (wake-up + claim transaction) + claimed -> starting p50 {prep:.1f} ms "
            "(run directory and the qcow2 overlay, made by running `qemu-img create`; that "
            f"command alone takes {img:.1f} ms median here, measured separately)."
            + (" The claim path itself is within the target; the overlay's process start is what "
               "exceeds it." if claim <= 10 < p50 else ""))
    emit("2", "pickup latency, `all` mode (p50; max)", "ms", [x["pickup"] for x in s],
         target="p50 <= 10", ok=p50 <= 10, note=note, digits=1)
    emit("2", "  of which created_at -> claimed, `all` mode", "ms", [x["claim"] for x in s],
         digits=1)

    # Split mode as it is now: agents wake on any commit (PRAGMA data_version checked every
    # SQLITE_SIM_CHANGE_CHECK_INTERVAL), with the poll left at its 5 s default as a safety net.
    check = 0.015
    log(f"figure 2: pickup latency, {n} runs in split api+agents mode "
        f"(change check every {check * 1000:g} ms, poll 5 s, random submission phase)")
    s = split_samples(n, {"SQLITE_SIM_AGENT_POLL_INTERVAL": "5",
                          "SQLITE_SIM_CHANGE_CHECK_INTERVAL": str(check)}, jitter=0.5)
    p50 = med([x["pickup"] for x in s])
    note = (f"split mode, agents woken by the change check (every {check * 1000:g} ms) with "
            f"the 5 s poll behind it: p50 {p50:.0f} ms, max {max(x['pickup'] for x in s):.0f} "
            f"ms; created_at -> claimed p50 {med([x['claim'] for x in s]):.1f} ms, claimed -> "
            f"starting (overlay) p50 {med([x['prepare'] for x in s]):.1f} ms.")
    emit("2", f"pickup latency, split `api`+`agents` (change check {check * 1000:g} ms; p50; "
         "max)", "ms", [x["pickup"] for x in s], target="p50 <= 100", ok=p50 <= 100,
         note=note, digits=1)

    # PostgreSQL: agents woken by LISTEN/NOTIFY, the 5 s poll behind it.
    log(f"figure 2: pickup latency, {n} runs in split api+agents mode on PostgreSQL "
        "(LISTEN/NOTIFY, poll 5 s, random submission phase)")
    s = split_samples(n, {"SQLITE_SIM_AGENT_POLL_INTERVAL": "5"}, jitter=0.5,
                      engine="postgres")
    p50 = med([x["pickup"] for x in s])
    claim = med([x["claim"] for x in s])
    note = (f"split mode on PostgreSQL, agents woken by LISTEN/NOTIFY with the 5 s poll "
            f"behind it: p50 {p50:.1f} ms, max {max(x['pickup'] for x in s):.0f} ms; "
            f"created_at -> claimed p50 {claim:.1f} ms (commit, NOTIFY, the agents process's "
            f"wake-up, the claim's round trip), claimed -> starting (overlay) p50 "
            f"{med([x['prepare'] for x in s]):.1f} ms.")
    emit("2", "pickup latency, split `api`+`agents` on PostgreSQL (LISTEN/NOTIFY; p50; max)",
         "ms", [x["pickup"] for x in s], target="p50 <= 20", ok=p50 <= 20, note=note,
         digits=1)
    emit("2", "  of which created_at -> claimed, split on PostgreSQL", "ms",
         [x["claim"] for x in s], digits=1)

    # The old baseline: polling only (the change check pushed out of reach).
    log(f"figure 2: pickup latency, {n} runs in split api+agents mode "
        f"(poll {poll_interval} s only, random submission phase)")
    s = split_samples(n, {"SQLITE_SIM_AGENT_POLL_INTERVAL": str(poll_interval),
                          "SQLITE_SIM_CHANGE_CHECK_INTERVAL": "3600"}, jitter=poll_interval)
    mx = max(x["pickup"] for x in s)
    lim = poll_interval * 1000 + 10
    p50 = med([x["pickup"] for x in s])
    note = (f"split mode without the change check: the agents process polls every "
            f"{poll_interval:g} s, so pickup is uniform in [0, {poll_interval * 1000:.0f}] ms "
            f"plus the fixed cost; p50 {p50:.0f} ms, max {mx:.0f} ms; claimed -> starting "
            f"(overlay) p50 {med([x['prepare'] for x in s]):.1f} ms. `met` is judged on the max.")
    emit("2", f"pickup latency, split `api`+`agents` (poll {poll_interval:g} s only; p50; max)",
         "ms", [x["pickup"] for x in s], target=f"max <= {lim:.0f}", ok=mx <= lim, note=note,
         digits=1)


def split_samples(n, env, jitter, engine="sqlite"):
    srv = Server(label=f"split-{engine}", env=env, engine=engine)
    try:
        srv.spawn("api")
        srv.spawn("agents")
        return pickup_samples(srv, n, jitter=jitter)
    finally:
        srv.stop()


def _run(ctx):
    figure2(ctx.server, ctx.pick(2, 10))


FIGURE = Figure("2", "2", _run, shared_server=True)
