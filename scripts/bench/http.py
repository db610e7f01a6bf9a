"""A keep-alive HTTP/1.1 client for one sqlite-sim server, with the API's shortcuts."""

import hashlib
import http.client
import json
import socket
import time

from .common import TERMINAL


class NoDelayConnection(http.client.HTTPConnection):
    """http.client sends headers and body in two writes: without TCP_NODELAY, Nagle plus the
    peer's delayed ACK would add ~40 ms to every POST/PUT (curl and wrk set it too)."""

    def connect(self):
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def system_line(entries, prefix):
    """The log entry holding a line that starts with `prefix`. The log sink merges consecutive
    chunks of one type into one row (with the first chunk's timestamp), so an entry may hold
    several system lines."""
    for e in entries:
        if any(line.startswith(prefix) for line in e["output"].splitlines()):
            return e
    return None


class Api:
    """A keep-alive HTTP/1.1 client for one server."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.conn = None

    def call(self, method, path, body=None, timeout=30, raw=False):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in range(2):
            try:
                if self.conn is None:
                    self.conn = NoDelayConnection(self.host, self.port, timeout=timeout)
                self.conn.timeout = timeout
                if self.conn.sock is not None:
                    self.conn.sock.settimeout(timeout)
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                payload = resp.read()
                if raw:
                    return resp.status, payload
                try:
                    return resp.status, json.loads(payload) if payload else None
                except ValueError:
                    return resp.status, payload
            except (http.client.HTTPException, OSError):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                # Only a GET is retried (on a fresh connection): a repeated POST could submit
                # twice.
                if attempt == 1 or method != "GET":
                    raise
        raise RuntimeError("unreachable")

    def sha256_of(self, path, timeout=600):
        """SHA-256 (hex) and length of a GET's body, streamed on a connection of its own."""
        conn = NoDelayConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            h, n = hashlib.sha256(), 0
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
                n += len(chunk)
            return h.hexdigest(), n
        finally:
            conn.close()

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # API shortcuts

    def _ok(self, method, path, body=None, want=200):
        st, resp = self.call(method, path, body)
        if st != want:
            raise RuntimeError(f"{method} {path} -> {st} {resp}")
        return resp

    def submit(self, commands, timeout=300, vm="tiny", boot=None):
        """POSTs a request; `boot`: None (the VM's default), "cold" or "warm"."""
        body = {"vm_name": vm, "commands": commands, "timeout": timeout}
        if boot is not None:
            body["boot"] = boot
        return self._ok("POST", "/requests", body, want=201)["uuid"]

    def list(self, **query):
        """GET /requests with `query` (e.g. vm_name, limit): the list of requests."""
        q = "&".join(f"{k}={v}" for k, v in query.items())
        return self._ok("GET", "/requests" + ("?" + q if q else ""))["requests"]

    def get(self, uuid):
        return self._ok("GET", f"/requests/{uuid}")

    def logs(self, uuid, log_type=None, after=None):
        q = []
        if log_type:
            q.append(f"log_type={log_type}")
        if after is not None:
            q.append(f"after={after}")
        return self._ok("GET", f"/requests/{uuid}/logs" + ("?" + "&".join(q) if q else ""))

    def put_status(self, uuid, status):
        return self.call("PUT", f"/requests/{uuid}/status", {"status": status})

    def wait_terminal(self, uuid, poll=0.02, timeout=600):
        deadline = time.monotonic() + timeout
        while True:
            r = self.get(uuid)
            if r["status"] in TERMINAL:
                return r
            if time.monotonic() > deadline:
                raise RuntimeError(f"request {uuid} not finished after {timeout} s: {r['status']}")
            time.sleep(poll)

    def wait_system_line(self, uuid, prefix, timeout=300, poll=0.05):
        deadline = time.monotonic() + timeout
        while True:
            e = system_line(self.logs(uuid, "system"), prefix)
            if e is not None:
                return e
            r = self.get(uuid)
            if r["status"] in TERMINAL:
                raise RuntimeError(f"request {uuid} ended {r['status']} ({r.get('error')}) "
                                   f"before '{prefix}'")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no '{prefix}' for {uuid} within {timeout} s")
            time.sleep(poll)
