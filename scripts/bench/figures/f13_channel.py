"""Figure 13: the guest channel (issue 12), each beside its console baseline in the same run.

13a  a real guest's stdout through the channel's virtio-serial port, SHA-256 checked
     (baseline: 4b, the same kind of flood over the serial console);
13b  a 100 MB tar uploaded (multipart POST into the store, then streamed into the guest and
     extracted), SHA-256 checked in the guest (baseline: 13b0, 1 MB over the console);
13c  100 MB of artifacts collected from the guest into the store, SHA-256 checked against the
     guest's own sums (baseline: 13c0, 1 MB over the console);
13d  sqlite-sim's CPU per MB ingested through the channel during 13a (baseline: 4b's note).
"""

import hashlib
import io
import os
import re
import tarfile
import tempfile
import time

from ..common import TERMINAL, log, parse_ts
from ..http import NoDelayConnection
from ..procstat import proc_cpu_seconds
from ..record import emit
from ..server import Server, cold_configs, set_key
from . import Figure

BLOCK = 10_000_000  # bytes of one random block the guest repeats
PLACED = re.compile(r"placed (\d+) files? \(([^)]*)\) in ([\d.]+) s over the (\w+)")
COLLECTED = re.compile(r"collected (\d+) artifacts? \(([^)]*)\) from .* in ([\d.]+) s over the (\w+)")


def configs():
    """`tiny` with room for 100 MB in its RAM root, on the channel and on the console only."""
    tiny = set_key(set_key(cold_configs()["tiny"], "MEMORY", "768M"), "IMAGE", "tiny.qcow2")
    return {"chan": set_key(tiny, "CHANNEL", "virtio"),
            "con": set_key(tiny, "CHANNEL", "console")}


def system_text(api, uuid):
    return "".join(e["output"] for e in api.logs(uuid, "system"))


def stdout_flood(srv, mb):
    """13a and 13d: `blocks` repeats of a random block printed to the stdout port."""
    api = srv.api
    blocks = max(1, round(mb * 1e6 / BLOCK))
    nbytes = blocks * BLOCK
    loop = f"i=0; while [ $i -lt {blocks} ]; do cat /tmp/blk; i=$((i+1)); done"
    # The pause after `gen-end` lets the benchmark read the log counter before the flood.
    cmd = (f"head -c {BLOCK} /dev/urandom > /tmp/blk; echo gen-end >&2; sleep 1; {loop}; "
           f"echo flood-end >&2; ({loop}) | sha256sum >&2")
    log(f"figure 13a: {nbytes / 1e6:.0f} MB of stdout through the channel")
    uuid = api.submit(cmd, timeout=1200, vm="chan")
    # From the first stdout byte in the store to the last (the log byte counter of /metrics,
    # polled every 20 ms): what a follower could read, not what the guest thinks it wrote.
    base = start = end = None
    while end is None:
        r = api.get(uuid)
        if base is None:
            if r["status"] in TERMINAL:
                break
            _, err = api.call("GET", f"/requests/{uuid}/logs/raw?log_type=stderr", raw=True)
            if b"gen-end" in err:
                base = log_bytes(api)
        else:
            n = log_bytes(api)
            if start is None and n > base:
                start = (time.time(), proc_cpu_seconds(srv.main_pid))
            if n >= base + nbytes:
                end = (time.time(), proc_cpu_seconds(srv.main_pid))
            elif r["status"] in TERMINAL:
                raise RuntimeError(f"the run ended with less stdout stored than {nbytes} bytes")
        time.sleep(0.02)
    r = api.wait_terminal(uuid, poll=0.1, timeout=1200)
    if r["status"] != "done" or r.get("channel") != "virtio" or end is None:
        raise RuntimeError(f"flood ended {r['status']} over {r.get('channel')}: {r.get('error')}")
    host_sha, got = api.sha256_of(f"/requests/{uuid}/logs/raw?log_type=stdout")
    stderr = "".join(e["output"] for e in api.logs(uuid, "stderr"))
    m = re.search(r"\b([0-9a-f]{64})\b", stderr)
    guest_sha = m.group(1) if m else None
    exact = guest_sha == host_sha and got == nbytes
    dur = end[0] - start[0]
    rate = nbytes / dur / 1e6
    emit("13a", f"real-guest stdout through the channel ({nbytes / 1e6:.0f} MB, SHA-256 checked)",
         "MB/s", [rate], target=">= 25 MB/s (console: 4b)", ok=exact and rate >= 25,
         note=(f"{nbytes / 1e6:.0f} MB ({blocks} x a 10 MB block from /dev/urandom, `cat` from "
               f"tmpfs) in {dur:.2f} s, from the first of its bytes in the store to the last "
               f"(/metrics log bytes, polled every 20 ms); "
               f"byte-exact: {'yes' if exact else 'NO'} (SHA-256 of /logs/raw stdout = the "
               f"guest's `sha256sum` of the same bytes: {guest_sha == host_sha}; {got:,} of "
               f"{nbytes:,} bytes). Baseline: 4b, the console, in this run."))
    if start[1] is not None and end[1] is not None:
        cpu = end[1] - start[1]
        per_mb = cpu / (nbytes / 1e6)
        emit("13d", "supervisor CPU per MB ingested through the channel", "CPU-s/MB", [per_mb],
             target="reported (console: 4b's note, ~2 CPU-s/MB)", ok=True, digits=4,
             note=(f"sqlite-sim used {cpu:.2f} CPU-s (user + system, /proc) over the same "
                   f"{dur:.2f} s, including answering the benchmark's polls."))


def log_bytes(api):
    """`sqlite_sim_log_bytes_total` from /metrics."""
    _, text = api.call("GET", "/metrics", raw=True)
    m = re.search(rb"(?m)^sqlite_sim_log_bytes_total (\d+)", text)
    return int(m.group(1)) if m else 0


def multipart_file(request_json, parts):
    """A multipart body in a temp file: the `request` part, then (destination, path) parts.
    Returns (file, length, boundary)."""
    boundary = "sqsimbench" + os.urandom(8).hex()
    f = tempfile.TemporaryFile(dir="/tmp")
    f.write((f"--{boundary}\r\nContent-Disposition: form-data; name=\"request\"\r\n"
             f"Content-Type: application/json\r\n\r\n{request_json}\r\n").encode())
    for dest, path in parts:
        f.write((f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                 f"filename=\"{dest}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode())
        with open(path, "rb") as src:
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                f.write(chunk)
        f.write(b"\r\n")
    f.write(f"--{boundary}--\r\n".encode())
    length = f.tell()
    f.seek(0)
    return f, length, boundary


def make_tar(path, total, files=4):
    """A tar of `files` random files of `total` bytes in all; {name: sha256}."""
    sums = {}
    size = total // files
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for i in range(files):
            data = os.urandom(size)
            sums[f"f{i}.bin"] = hashlib.sha256(data).hexdigest()
            info = tarfile.TarInfo(f"f{i}.bin")
            info.size, info.mode = size, 0o644
            t.addfile(info, io.BytesIO(data))
    return sums


def upload(srv, vm, nbytes, figure, target, baseline_note):
    """13b / 13b0: a tar of `nbytes` POSTed to `vm` and extracted into /data."""
    import json

    api = srv.api
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        tar_path = os.path.join(d, "in.tar")
        sums = make_tar(tar_path, nbytes)
        tar_size = os.path.getsize(tar_path)
        req = json.dumps({"vm_name": vm, "timeout": 1800,
                          "commands": "cd /data && sha256sum f*.bin"})
        body, length, boundary = multipart_file(req, [("/data/", tar_path)])
        log(f"figure {figure}: {tar_size / 1e6:.1f} MB tar to {vm}")
        conn = NoDelayConnection(api.host, api.port, timeout=600)
        t0 = time.monotonic()
        conn.putrequest("POST", "/requests")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        while True:
            chunk = body.read(1 << 20)
            if not chunk:
                break
            conn.send(chunk)
        resp = conn.getresponse()
        answer = resp.read()
        post_s = time.monotonic() - t0
        conn.close()
        body.close()
    if resp.status != 201:
        raise RuntimeError(f"POST -> {resp.status} {answer[:300]!r}")
    uuid = json.loads(answer)["uuid"]
    r = api.wait_terminal(uuid, poll=0.2, timeout=2400)
    if r["status"] != "done" or r["exit_code"] != 0:
        raise RuntimeError(f"upload run ended {r['status']} {r.get('exit_code')}: {r.get('error')}")
    m = PLACED.search(system_text(api, uuid))
    if not m:
        raise RuntimeError("no 'placed' line in the system log")
    place_s = float(m.group(3))
    out = "".join(e["output"] for e in api.logs(uuid, "stdout"))
    guest = dict((n, s) for s, n in re.findall(r"([0-9a-f]{64})\s+(\S+)", out))
    exact = guest == sums
    rate = tar_size / (post_s + place_s) / 1e6
    emit(figure, f"upload of a {tar_size / 1e6:.0f} MB tar over the {m.group(4)}, "
         "POST -> files in place", "MB/s", [rate], target=target,
         ok=exact and (figure != "13b" or rate >= 20),
         note=(f"POST of the multipart body into the store {post_s:.2f} s "
               f"({tar_size / post_s / 1e6:.0f} MB/s), then streamed into the guest and extracted "
               f"by its `tar -x` in {place_s:.2f} s ({tar_size / place_s / 1e6:.1f} MB/s, the "
               f"supervisor's own 'placed' line); the boot between them is not counted. Every "
               f"file's SHA-256 in the guest matches the host's: {'yes' if exact else 'NO'}. "
               + baseline_note))


def artifacts(srv, vm, nbytes, figure, target, baseline_note):
    """13c / 13c0: the guest writes `nbytes` in files under /out, collected as artifacts."""
    api = srv.api
    files = max(1, nbytes // BLOCK)
    size = nbytes // files
    cmd = (f"mkdir -p /out; i=0; while [ $i -lt {files} ]; do head -c {size} /dev/urandom "
           f"> /out/a$i.bin; i=$((i+1)); done; cd /out && sha256sum a*.bin")
    log(f"figure {figure}: {files * size / 1e6:.1f} MB of artifacts from {vm}")
    st, resp = api.call("POST", "/requests", {"vm_name": vm, "commands": cmd, "timeout": 1800,
                                              "artifacts": ["/out"]})
    if st != 201:
        raise RuntimeError(f"POST -> {st} {resp}")
    uuid = resp["uuid"]
    r = api.wait_terminal(uuid, poll=0.2, timeout=2400)
    if r["status"] != "done":
        raise RuntimeError(f"artifacts run ended {r['status']}: {r.get('error')}")
    m = COLLECTED.search(system_text(api, uuid))
    if not m:
        raise RuntimeError("no 'collected' line in the system log")
    secs = float(m.group(3))
    out = "".join(e["output"] for e in api.logs(uuid, "stdout"))
    guest = {f"/out/{n}": s for s, n in re.findall(r"([0-9a-f]{64})\s+(\S+)", out)}
    _, listed = api.call("GET", f"/requests/{uuid}/artifacts")
    stored = {a["path"]: a["sha256"] for a in listed if a.get("left_out") is None}
    exact = stored == guest and len(stored) == files
    total = files * size
    t0 = time.monotonic()
    _, tar_len = api.sha256_of(f"/requests/{uuid}/artifacts.tar")
    dl_s = time.monotonic() - t0
    rate = total / secs / 1e6
    emit(figure, f"artifact collection of {total / 1e6:.0f} MB over the {m.group(4)}, "
         "guest -> downloadable", "MB/s", [rate], target=target,
         ok=exact and (figure != "13c" or rate >= 20),
         note=(f"{files} files of {size / 1e6:.1f} MB from /dev/urandom, collected by the guest's "
               f"`tar -c` and stored in chunks in {secs:.2f} s (the supervisor's 'collected' "
               f"line). Stored SHA-256s equal the guest's `sha256sum`: {'yes' if exact else 'NO'}. "
               f"Downloading them as /artifacts.tar ({tar_len / 1e6:.0f} MB) then took "
               f"{dl_s:.2f} s ({tar_len / max(dl_s, 1e-6) / 1e6:.0f} MB/s). " + baseline_note))


def _run(ctx):
    big = int(ctx.pick(20, 100) * 1e6)
    small = int(ctx.pick(0.2, 1) * 1e6)
    srv = Server(label="channel", configs=configs(),
                 env={"SQLITE_SIM_MAX_UPLOAD": "512M", "SQLITE_SIM_MAX_ARTIFACTS": "512M",
                      "SQLITE_SIM_AGENT_COUNT": "1"})
    try:
        srv.spawn("all")
        stdout_flood(srv, big / 1e6)
        upload(srv, "con", small, "13b0", "baseline (reported)",
               "The console baseline: the same path as base64 lines the guest acknowledges.")
        upload(srv, "chan", big, "13b", ">= 20 MB/s (console: 13b0)",
               "Baseline: 13b0, the console, in this run.")
        artifacts(srv, "con", small, "13c0", "baseline (reported)",
                  "The console baseline: the guest's tar as base64 lines.")
        artifacts(srv, "chan", big, "13c", ">= 20 MB/s (console: 13c0)",
                  "Baseline: 13c0, the console, in this run.")
    finally:
        srv.stop()


FIGURE = Figure("13", "13", _run)
