"""What serves inside a pod: labkit's own echo server, nothing, a command the user brings, or the
packaged ``http`` workload (nginx), and how each one answers.

A pod's server is its own ``server`` or else the lab's (``server:`` in the spec; :class:`ServerSpec`):

- ``labkit``  ``lkserver`` on every port the lab uses: 8080 (``labkit check``'s pod-to-pod rows), every
              Service's target port, every port of the NetworkPolicy matrix. It answers ``GET /``
              with the pod's name, so a check knows which pod it reached, and echoes anything else.
- ``none``    nothing runs: a connection is refused (which still proves the path works).
- ``{command: "...", port: P}``  the user's command runs in the pod (its namespace and cgroup,
              pinned like labkit's server, journaled, killed at ``down``) and serves port P; labkit's
              server keeps the other ports and never binds P. A check accepts any reply on P.
- ``http`` (or ``{kind: http, port: P}``, default port 80)  nginx (Debian's ``nginx-light``) with a
              config labkit writes: one process (no master, no daemon), no disk I/O, access log off,
              keep-alive on; ``GET /`` answers the pod's name, as labkit's server does, so checks and
              Service-spread tests work unchanged. The client of this workload is ``wrk``
              (:func:`wrk`).
"""

from __future__ import annotations

import difflib
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from .errors import MeasurementError, MissingFeature
from .spec.types import COMMAND, HTTP, HTTP_PORT, KINDS, LABKIT, NONE, ServerSpec

CHECK_PORT = 8080  # labkit check's pod-to-pod rows


def server_problems(path: str, server: ServerSpec) -> list[tuple[str, str]]:
    """A server choice's problems, each with its path and the fix."""
    out = []
    if server.kind not in KINDS:
        near = difflib.get_close_matches(str(server.kind), KINDS, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        out.append((path, f"unknown server {server.kind!r}{hint}; expected labkit, none, http or "
                          "{command: '<command line>', port: <port>}"))
        return out
    if server.kind == COMMAND:
        if not server.command or not server.command.strip():
            out.append((f"{path}.command", "give the command line that starts the server"))
        else:
            try:
                shlex.split(server.command)
            except ValueError as exc:
                out.append((f"{path}.command", f"not a valid command line ({exc})"))
        if server.port is None:
            out.append((f"{path}.port", "give the port the command serves (labkit's server leaves it to it)"))
    elif server.command is not None:
        out.append((f"{path}.command", f"only a command server takes 'command', not {server.kind}"))
    if server.port is not None and not 1 <= server.port <= 65535:
        out.append((f"{path}.port", f"port {server.port} outside 1..65535"))
    elif server.port is not None and server.kind in (LABKIT, NONE):
        out.append((f"{path}.port", f"server {server.kind} takes no port"))
    return out


# ---------------------------------------------------------------- nginx

NGINX_CONF = """# written by labkit for pod {pod}: one process, nothing on disk but this folder
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    tcp_nodelay on;
    default_type text/plain;
    server {{
        listen {port} reuseport backlog=4096;
        location / {{ return 200 "{pod}\\n"; }}
    }}
}}
"""


def nginx_binary() -> str:
    path = shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/usr/bin:/bin")
    if path is None:
        raise MissingFeature("nginx", "the http workload", "apt-get install nginx-light (setup.sh does it)")
    return path


def nginx_argv(pod: str, port: int, folder: Path) -> list[str]:
    """nginx for ``pod`` on ``port``, its config and temp folders written under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if not re.fullmatch(r"[a-z0-9-]+", pod):
        raise ValueError(f"pod name {pod!r} cannot go into nginx's config")
    conf = folder / "nginx.conf"
    conf.write_text(NGINX_CONF.format(pod=pod, dir=folder, port=port))
    return [nginx_binary(), "-p", str(folder), "-c", str(conf), "-e", str(folder / "error.log")]


def server_argv(server: ServerSpec, pod: str, folder: Path) -> list[str] | None:
    """The user's or the packaged server's command line for ``pod`` (None: labkit's or none)."""
    if server.kind == HTTP:
        return nginx_argv(pod, server.serves, folder)
    if server.kind == COMMAND:
        return shlex.split(server.command)
    return None


# ---------------------------------------------------------------- wrk

WRK_SCRIPT = """-- labkit: wrk's summary as one JSON line
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %d, "duration_us": %d, "bytes": %d, "errors": {"connect": %d, '
    .. '"read": %d, "write": %d, "status": %d, "timeout": %d}, "p50_us": %.1f, "p90_us": %.1f, '
    .. '"p99_us": %.1f, "mean_us": %.1f, "max_us": %.1f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


def wrk_argv(url: str, connections: int, seconds: float, close: bool, script: Path) -> list[str]:
    """``wrk`` with one thread and ``connections`` connections for ``seconds``; ``close`` sends
    ``Connection: close`` (a new connection per request: the Service table is walked every time)."""
    if shutil.which("wrk") is None:
        raise MissingFeature("wrk", "the http workload's client", "apt-get install wrk (setup.sh does it)")
    script.write_text(WRK_SCRIPT)
    argv = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{max(1, round(seconds))}s", "--timeout", "2s",
            "-s", str(script)]
    if close:
        argv += ["-H", "Connection: close"]
    return [*argv, url]


def parse_wrk(stdout: str) -> dict:
    """wrk's summary (the JSON line :data:`WRK_SCRIPT` prints) with ``rate_per_s`` added."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            out = json.loads(line)
            out["rate_per_s"] = out["requests"] / (out["duration_us"] / 1e6) if out["duration_us"] else 0.0
            out["error_count"] = sum(out["errors"].values())
            return out
    raise MeasurementError(f"wrk printed no summary: {stdout.strip()[-300:]}")


def run_wrk(run, url: str, connections: int, seconds: float, close: bool, script: Path,
            timeout: float | None = None) -> dict:
    """wrk through ``run(argv, timeout=…)`` (a pod's ``exec``), parsed."""
    proc = run(wrk_argv(url, connections, seconds, close, script), timeout=timeout or seconds + 60)
    if isinstance(proc, subprocess.CompletedProcess) and proc.returncode != 0:
        raise MeasurementError(f"wrk {url} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return parse_wrk(proc.stdout)


__all__ = ["ServerSpec", "KINDS", "LABKIT", "NONE", "COMMAND", "HTTP", "HTTP_PORT", "CHECK_PORT", "server_problems",
           "server_argv", "nginx_argv", "wrk_argv", "parse_wrk", "run_wrk"]
