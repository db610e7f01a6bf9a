"""Figure 6: API throughput with wrk against `sqlite-sim api` (no agents): POST /requests and
GET /requests/{uuid}, with the server's CPU per request and a perf profile, on both engines side
by side (SQLite with group commit, PostgreSQL) and, for POST, SQLite with group commit off
(`SQLITE_SIM_GROUP_COMMIT=false`, one transaction per insert: the baseline)."""

import os
import re
import resource
import shutil
import subprocess
import time

from .. import pg
from ..common import log, med
from ..procstat import busy_fraction, ctx_switches, host_cpu, perf_profile, proc_cpu_seconds
from ..procstat import prof_summary
from ..record import emit
from ..server import Server
from . import Figure


def parse_wrk(out):
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    lat = re.search(r"Latency\s+([\d.]+)(us|ms|s)", out)
    total = re.search(r"(\d+) requests in", out)
    lat_ms = None
    if lat:
        lat_ms = float(lat.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[lat.group(2)]
    return {
        "rps": float(rps.group(1)) if rps else None,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "sock_errors": sum(int(x) for x in errors.groups()) if errors else 0,
        "lat_ms": lat_ms,
        "requests": int(total.group(1)) if total else None,
    }


def wrk_cmd(url, lua, duration, latency=True):
    """wrk with 2 threads and 32 connections; `lua` (a script) or None for plain GETs."""
    return (["wrk", "-t2", "-c32", f"-d{duration}s"] + (["--latency"] if latency else [])
            + (["-s", lua] if lua else []) + [url])


def run_wrk(srv, url, lua, duration):
    cmd = wrk_cmd(url, lua, duration)
    b0 = host_cpu()
    s0 = proc_cpu_seconds(srv.main_pid)
    x0 = ctx_switches(srv.main_pid)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    wall = time.time() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    s1 = proc_cpu_seconds(srv.main_pid)
    x1 = ctx_switches(srv.main_pid)
    b1 = host_cpu()
    res = parse_wrk(out)
    res["ctx_per_req"] = (x1 - x0) / res["requests"] if res["requests"] else None
    res["server_cores"] = (s1 - s0) / wall
    res["wrk_cores"] = ((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)) / wall
    res["host_busy"] = busy_fraction(b0, b1)
    return res


# What figure 6 compares, in the order measured: (label, engine, extra env, targets by kind).
# A kind without a target is reported; the last setup is the baseline of group commit (the
# same binary, each insert a transaction of its own on the blocking pool, as before it).
SETUPS = [
    ("SQLite", "sqlite", {}, {"POST": 15000, "GET": 40000, "HEALTH": None}),
    ("PostgreSQL", "postgres", {}, {"POST": 5000, "GET": None}),
    ("SQLite, group commit off", "sqlite", {"SQLITE_SIM_GROUP_COMMIT": "false"}, {"POST": None}),
]
PATHS = {"POST": "/requests", "GET": "/requests/{uuid}", "HEALTH": "/health"}
# How each kind is named in its row: GET /health is the ceiling of the HTTP stack on these cores
# (the same server, middleware and wrk, with one trivial database read and a tiny answer).
KIND_NAMES = {"POST": "POST", "GET": "GET", "HEALTH": "ceiling, GET"}


def measure(engine, env, kinds, runs, duration):
    """wrk runs of each kind (alternating) against one `api` server; ({kind: [result]},
    {kind: perf profile}, rows in the table at the end)."""
    srv = Server(label=f"api-{engine}", trace_runs=False, engine=engine, env=env)
    try:
        srv.spawn("api")
        uuid = srv.api.submit("echo hi", timeout=60)
        base = f"http://127.0.0.1:{srv.api.port}"
        lua = os.path.join(srv.root, "post.lua")
        with open(lua, "w") as f:
            f.write('wrk.method = "POST"\n'
                    'wrk.body = \'{"vm_name":"tiny","commands":"echo hi","timeout":60}\'\n'
                    'wrk.headers["Content-Type"] = "application/json"\n')
        targets = {"POST": (f"{base}/requests", lua), "GET": (f"{base}/requests/{uuid}", None),
                   "HEALTH": (f"{base}/health", None)}
        results = {k: [] for k in kinds}
        for i in range(runs):
            for kind in kinds:
                res = run_wrk(srv, *targets[kind], duration)
                results[kind].append(res)
                log(f"  {engine} {kind} run {i + 1}/{runs}: {res['rps']:.0f} req/s, non-2xx "
                    f"{res['non2xx']}, socket errors {res['sock_errors']}, server "
                    f"{res['server_cores']:.2f} cores, wrk {res['wrk_cores']:.2f} cores, host "
                    f"busy {res['host_busy'] * 100:.0f}%")
        # One more run of each, not counted, sampled with perf to see where the server's CPU
        # goes.
        profiles = {}
        if shutil.which("perf"):
            for kind in kinds:
                w = subprocess.Popen(wrk_cmd(*targets[kind], 5, latency=False),
                                     stdout=subprocess.DEVNULL)
                time.sleep(0.5)
                profiles[kind] = perf_profile(srv.main_pid, 3)
                w.wait()
        rows = srv.api.call("GET", "/requests?limit=1")[1]
        total_rows = rows.get("total") if isinstance(rows, dict) else None
    finally:
        srv.stop()
    return results, profiles, total_rows


def row_note(kind, rs, prof, total_rows):
    """The note of one row: errors, latency, where the CPU went."""
    m = med([r["rps"] for r in rs])
    bad = sum(r["non2xx"] + r["sock_errors"] for r in rs)
    sc, wc = med([r["server_cores"] for r in rs]), med([r["wrk_cores"] for r in rs])
    busy = med([r["host_busy"] for r in rs])
    per_req_us = sc / m * 1e6 if m else None
    cpu_verdict = (": the CPUs are saturated, so CPU is the bound" if busy >= 0.9 else
                   f": {100 - busy * 100:.0f}% of the CPU stays idle, so the bound is not "
                   "raw CPU but serialisation or waiting inside the server")
    note = (f"non-2xx responses + socket errors: {bad}; mean latency (median of runs) "
            f"{med([r['lat_ms'] for r in rs if r['lat_ms'] is not None]):.2f} ms. CPU: "
            f"sqlite-sim {sc:.2f} cores, wrk {wc:.2f} cores, host busy {busy * 100:.0f}% of "
            f"2 cores{cpu_verdict}. sqlite-sim spends {per_req_us:.0f} us of CPU per "
            f"request: even with both cores to itself and a free load generator it could "
            f"serve at most ~{2 / (sc / m):,.0f} req/s. Its threads switch context "
            f"{med([r['ctx_per_req'] for r in rs]):.1f} times per request.")
    if prof:
        note += " Where sqlite-sim's CPU goes (perf): " + prof_summary(prof) + "."
        cats = dict(prof["categories"])
        switch = cats.get("kernel: context switches and futex wake-ups", 0)
        sqlite = sum(v for k, v in cats.items() if k.startswith(("SQLite", "SQL ")))
        ctx = med([r["ctx_per_req"] for r in rs])
        if prof["categories"][0][0].startswith("kernel: context switches") and ctx >= 2:
            note += (f" The largest share, {switch:.0f}%, is the kernel switching threads, "
                     f"{ctx:.1f} switches per request; "
                     f"SQLite itself (parsing and executing) is {sqlite:.0f}%.")
    if kind == "POST" and total_rows is not None:
        note += f" {total_rows:,} rows were inserted in all."
    return note, m, bad


def figure6(runs, duration):
    if shutil.which("wrk") is None:
        log("figure 6: wrk not installed; skipped")
        emit("6", "API throughput", "req/s", [], note="wrk not installed")
        return
    log(f"figure 6: API throughput, wrk -t2 -c32 -d{duration}s x{runs} (api mode, no agents), "
        f"on {', '.join(s[0] for s in SETUPS)}")
    measured = []
    for label, engine, env, goals in SETUPS:
        log(f"figure 6: {label}")
        results, profiles, total_rows = measure(engine, env, list(goals), runs, duration)
        measured.append((label, engine, goals, results, profiles, total_rows))
    pg_note = ""
    if any(engine == "postgres" for _, engine, *_ in measured):
        pg_note = (f" PostgreSQL: the cluster of scripts/postgres.sh ({pg.settings()}), a "
                   "database of its own, on the same 2 cores; its backends' CPU is not in "
                   "sqlite-sim's.")
    # Side by side: every setup's POST, then every setup's GET.
    for kind in PATHS:
        for label, engine, goals, results, profiles, total_rows in measured:
            if kind not in goals:
                continue
            rs = results[kind]
            note, m, bad = row_note(kind, rs, profiles.get(kind), total_rows)
            if engine == "postgres":
                note += pg_note
            goal = goals[kind]
            emit("6", f"API throughput, {KIND_NAMES[kind]} {PATHS[kind]} ({label})", "req/s",
                 [r["rps"] for r in rs],
                 target=f">= {goal:,}" if goal else "baseline (reported)",
                 ok=(m >= goal if goal else True) and bad == 0, note=note, digits=0)


def _run(ctx):
    runs, duration = ctx.pick((1, 2), (3, 10))
    figure6(runs, duration)


FIGURE = Figure("6", "6", _run)
