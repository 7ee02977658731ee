"""Run labkit's load generator from Python: in-pod servers, latency clients, "who answered" probes.

Thin wrappers around the C programs in :mod:`labkit.native`, started through :mod:`labkit.nsexec`
so that each process lives in a pod's network namespace (and, for eBPF socket-LB, in the lab's
cgroup) and is pinned to the load CPUs from :mod:`labkit.measure.cpus` before it executes.

- :func:`start_server` starts ``lkserver`` and returns once it printed its readiness line.
- :func:`run_client` runs ``lkclient`` once and returns its JSON result as a dict.
- :class:`ClientSession` keeps one ``lkclient --serve`` in a pod and runs many measurements
  through it (slices of interleaved points: a pipe round trip each instead of a process start).
- :func:`who` asks a Service address ``count`` times which pod answered.

A program that fails raises :class:`~labkit.errors.MeasurementError` carrying its stderr; raw
samples the client wrote before failing stay on disk (``error.result`` holds its partial JSON). A
namespace that is not there raises :class:`~labkit.errors.LabStateError` before anything starts.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from labkit import nsexec
from labkit.errors import LabStateError, MeasurementError
from labkit.native import binary

MODES = ("crr", "rr", "udp_rr", "who")


# ---------------------------------------------------------------- server

def start_server(
    netns: str | None,
    name: str,
    ports: int | Iterable[int],
    cgroup: Path | None = None,
    cpus: Sequence[int] | None = None,
    *,
    bind: str = "0.0.0.0",
    timeout: float = 5.0,
    log_path: Path | None = None,
    detach: bool = False,
) -> subprocess.Popen:
    """Start ``lkserver --name name`` on ``ports`` (TCP and UDP) inside ``netns`` and wait until
    it listens. Its stderr goes to ``log_path`` (default: an anonymous temporary file, read back
    into the error if it fails to start). ``detach`` lets it outlive this process."""
    ports = [ports] if isinstance(ports, int) else list(ports)
    if not ports:
        raise ValueError("start_server needs at least one port")
    _require_netns(netns)
    argv = [str(binary("lkserver")), "--name", name, "--bind", bind,
            "--ports", ",".join(str(p) for p in ports)]
    log: IO[bytes] = open(log_path, "ab") if log_path else tempfile.TemporaryFile()
    try:
        proc = nsexec.spawn(argv, netns, cgroup=cgroup, cpus=cpus, stdout=subprocess.PIPE,
                            stderr=log, detach=detach)
    finally:
        if log_path:
            log.close()  # the child holds its own descriptor
    line = _read_line(proc, timeout)
    if proc.stdout:
        proc.stdout.close()  # nothing more is printed after readiness
    expected = "ready " + " ".join(str(p) for p in ports)
    if line.strip() != expected:
        exited = proc.poll()
        stop_server(proc)
        where = f" in netns {netns}" if netns else ""
        if exited is not None:
            state = f"exited with code {exited}"
        else:
            state = f"printed {line.strip()!r}" if line else f"was not ready within {timeout:g} s"
        raise MeasurementError(f"lkserver {name!r}{where} on ports {ports} {state} (expected "
                               f"{expected!r}); stderr: {_read_log(log, log_path)}")
    proc.lkserver_log = log if not log_path else None  # type: ignore[attr-defined]  # keep it open
    return proc


def stop_server(proc: subprocess.Popen, timeout: float = 2.0) -> None:
    """Terminate a server started here (SIGTERM, then SIGKILL). Safe to call twice."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log = getattr(proc, "lkserver_log", None)
    if log is not None:
        log.close()


def _require_netns(netns: str | None) -> None:
    if netns is not None and not nsexec.netns_path(netns).exists():
        raise LabStateError(f"network namespace {netns!r} does not exist (is the lab up?)")


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """First stdout line of ``proc``, or "" if it exits or ``timeout`` passes first."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                break
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:  # EOF: it exited
                proc.wait()
                break
            buf += chunk
    return buf.decode(errors="replace")


def _read_log(log: IO[bytes], log_path: Path | None) -> str:
    try:
        if log_path:
            data = Path(log_path).read_bytes()
        else:
            log.seek(0)
            data = log.read()
            log.close()
    except OSError as exc:
        return f"(unreadable: {exc})"
    return data.decode(errors="replace").strip()[-2000:] or "(empty)"


# ---------------------------------------------------------------- client

def client_argv(
    mode: str, host: str, port: int, samples: int, warmup: int | None = None, size: int = 64,
    raw_path: Path | None = None, duration: float | None = None, connect_timeout_ms: int = 1000,
    timeout_ms: int = 1000, max_errors: int | None = None,
) -> list[str]:
    """The ``lkclient`` command line for these options (see lkclient.c for their meaning)."""
    if mode not in MODES:
        raise ValueError(f"unknown load mode {mode!r}; known: {', '.join(MODES)}")
    argv = [str(binary("lkclient")), "--mode", mode, "--host", host, "--port", str(port),
            "-n", str(samples), "-s", str(size), "--connect-timeout-ms", str(connect_timeout_ms),
            "--timeout-ms", str(timeout_ms)]
    optional = {"-w": warmup, "--raw": raw_path, "--duration": duration, "--max-errors": max_errors}
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, str(value)]
    return argv


def run_client(
    netns: str | None,
    mode: str,
    host: str,
    port: int,
    samples: int = 1000,
    warmup: int | None = None,
    size: int = 64,
    raw_path: Path | None = None,
    cgroup: Path | None = None,
    cpus: Sequence[int] | None = None,
    timeout: float | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run ``lkclient`` once inside ``netns`` and return its JSON result.

    ``options`` are passed to :func:`client_argv` (``duration``, ``connect_timeout_ms``,
    ``timeout_ms``, ``max_errors``). ``timeout`` bounds the whole run; by default it allows
    every attempt its connect and I/O timeouts plus a minute."""
    _require_netns(netns)
    argv = client_argv(mode, host, port, samples, warmup, size, raw_path, **options)
    if timeout is None:
        per_try = (options.get("connect_timeout_ms", 1000) + options.get("timeout_ms", 1000)) / 1000
        timeout = 60 + per_try * min(samples + (warmup or 0), 1000)
    where = f"{host}:{port}" + (f" from netns {netns}" if netns else "")
    try:
        proc = nsexec.run(argv, netns, check=False, timeout=timeout, cgroup=cgroup, cpus=cpus)
    except subprocess.TimeoutExpired as exc:
        raise MeasurementError(f"lkclient {mode} to {where} did not finish within {timeout:g} s") from exc
    result = _parse_result(proc.stdout)
    if proc.returncode != 0 or result is None:
        err = MeasurementError(
            f"lkclient {mode} to {where} failed (exit code {proc.returncode}): "
            f"{proc.stderr.strip()[-2000:] or '(no stderr)'}")
        err.result = result  # type: ignore[attr-defined]  # partial figures, if it printed any
        raise err
    return result


class ClientSession:
    """One ``lkclient --serve`` process inside ``netns``/``cgroup``, pinned to ``cpus``, that runs
    measurements on request (:meth:`run`, same options and result as :func:`run_client`). It waits
    on its stdin between requests, using no CPU. Use as a context manager, or :meth:`close`."""

    def __init__(self, netns: str | None, cgroup: Path | None = None, cpus: Sequence[int] | None = None):
        _require_netns(netns)
        self.where = f" from netns {netns}" if netns else ""
        self._err = tempfile.TemporaryFile()
        self.proc = nsexec.spawn([str(binary("lkclient")), "--serve"], netns, cgroup=cgroup, cpus=cpus,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err)

    def run(self, mode: str, host: str, port: int, samples: int = 1000, warmup: int | None = None,
            size: int = 64, raw_path: Path | None = None, timeout: float | None = None,
            **options: Any) -> dict[str, Any]:
        argv = client_argv(mode, host, port, samples, warmup, size, raw_path, **options)[1:]
        if any(not a or any(c.isspace() for c in a) for a in argv):
            raise ValueError(f"lkclient --serve takes space-separated options; got {argv}")
        if timeout is None:
            per_try = (options.get("connect_timeout_ms", 1000) + options.get("timeout_ms", 1000)) / 1000
            timeout = 60 + per_try * min(samples + (warmup or 0), 1000)
        where = f"{host}:{port}{self.where}"
        result = self._request(argv, f"{mode} to {host}:{port}", timeout)
        if result.get("aborted"):
            err = MeasurementError(f"lkclient {mode} to {where} aborted after {result.get('errors')} errors: "
                                   f"{result.get('error_kinds')}")
            err.result = result  # type: ignore[attr-defined]
            raise err
        return result

    def burst(self, mode: str, targets: Sequence[tuple[str, int, Path]], samples: int, warmup: int = 0,
              size: int = 64, max_errors: int | None = None, timeout: float | None = None,
              connect_timeout_ms: int = 1000, timeout_ms: int = 1000) -> list[dict[str, Any]]:
        """``samples`` samples to each of ``targets`` (``host, port, raw file``), taken one attempt
        per target in turn after ``warmup`` attempts each, so that all targets see the same moments;
        each target's samples are APPENDED to its raw file. One result per target, in order, as
        :func:`run_client` returns them (``aborted`` set instead of raising)."""
        argv = ["--mode", mode, "-n", str(samples), "-w", str(warmup), "-s", str(size),
                "--connect-timeout-ms", str(connect_timeout_ms), "--timeout-ms", str(timeout_ms)]
        if max_errors is not None:
            argv += ["--max-errors", str(max_errors)]
        for host, port, raw in targets:
            if any(c.isspace() or c == ":" for c in str(raw)):
                raise ValueError(f"raw path {raw} must not contain spaces or ':'")
            argv += ["--target", f"{host}:{port}:{raw}"]
        if timeout is None:
            timeout = 60 + (connect_timeout_ms + timeout_ms) / 1000 * min(len(targets) * (samples + warmup), 1000)
        result = self._request(argv, f"{mode} burst to {len(targets)} targets", timeout)
        out = result.get("targets")
        if not isinstance(out, list) or len(out) != len(targets):
            raise MeasurementError(f"lkclient --serve: unexpected burst reply {str(result)[:300]}")
        return out

    def _request(self, argv: list[str], what: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((" ".join(argv) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died: reading says how
        result = _parse_result(_read_line(self.proc, timeout))
        if result is None:
            self.proc.kill()
            self.proc.wait()
            stderr = _read_log(self._err, None)
            self.close()
            raise MeasurementError(f"lkclient --serve {what}{self.where} gave no result within {timeout:g} s "
                                   f"(exit code {self.proc.returncode}): {stderr}")
        if "error" in result:
            raise MeasurementError(f"lkclient --serve {what}{self.where}: {result['error']}")
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdout, self.proc.stdin):
            if f and not f.closed:
                f.close()
        if not self._err.closed:
            self._err.close()

    def __enter__(self) -> ClientSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_result(stdout: str) -> dict[str, Any] | None:
    lines = stdout.strip().splitlines()
    if not lines:
        return None
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return None


# ---------------------------------------------------------------- who answered

@dataclass(frozen=True)
class WhoResult:
    """How many of ``count`` connections each backend answered, and how many failed (and why)."""

    counts: dict[str, int]
    errors: int
    error_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values()) + self.errors


def who(
    netns: str | None,
    host: str,
    port: int,
    count: int,
    cgroup: Path | None = None,
    cpus: Sequence[int] | None = None,
    connect_timeout_ms: int = 1000,
) -> WhoResult:
    """Open ``count`` connections to ``host:port`` and tally which pod (lkserver ``--name``)
    answered each. Refused or timed-out connections are counted in ``errors``, not raised:
    "no endpoint" is an answer a test may expect."""
    r = run_client(netns, "who", host, port, samples=count, warmup=0, cgroup=cgroup, cpus=cpus,
                   connect_timeout_ms=connect_timeout_ms)
    return WhoResult(counts=dict(r.get("names", {})), errors=int(r["errors"]),
                     error_kinds=dict(r.get("error_kinds", {})))
