"""Connectivity probe run *inside* a pod (its namespace and cgroup): ``python -m labkit.probe``.

Reads a JSON list of targets on stdin (``{"id", "host", "port", "proto": "tcp"|"udp"[, "expect":
"any"]}``), opens a real connection to each (HTTP ``GET /`` over TCP, ``WHO?`` over UDP), and prints
one JSON list of results (``{"id", "ok", "backend", "error", "ms"}``). ``backend`` is the name the
in-pod server answered with, so a check knows which pod it reached; with ``"expect": "any"`` (a
server the user brought) any reply counts, and ``backend`` is its first line. It runs as a process of the pod so that
everything the kernel applies to the pod's processes (socket-level eBPF hooks) applies to the probe.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

TIMEOUT = 1.5


def _tcp(host: str, port: int, timeout: float, any_reply: bool = False) -> str:
    """``GET /`` and the name in the reply's body; with ``any_reply`` (a server of the user's) any
    reply at all, as text."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            data += chunk
            if not chunk or (any_reply and data):
                break
    if any_reply:
        if not data:
            raise OSError("closed without a reply")
        return data.decode(errors="replace").splitlines()[0].strip()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0] + b" ":
        raise OSError(f"unexpected reply {data[:60]!r}")
    return body.decode().strip()


def _udp(host: str, port: int, timeout: float) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        s.send(b"WHO?")
        return s.recv(4096).decode().strip()


def probe(target: dict) -> dict:
    t0 = time.perf_counter()
    try:
        args = (target["host"], int(target["port"]), float(target.get("timeout", TIMEOUT)))
        if target.get("proto", "tcp") == "udp":
            backend = _udp(*args)
        else:
            backend = _tcp(*args, any_reply=target.get("expect") == "any")
        return {"id": target["id"], "ok": True, "backend": backend, "error": "",
                "ms": round((time.perf_counter() - t0) * 1e3, 3)}
    except OSError as exc:
        err = exc.strerror or str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError) or isinstance(exc, socket.timeout):
            err = "timeout"
        return {"id": target["id"], "ok": False, "backend": "", "error": err,
                "ms": round((time.perf_counter() - t0) * 1e3, 3)}


def main() -> None:
    targets = json.load(sys.stdin)
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(probe, targets))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
