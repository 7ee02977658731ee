"""Run labkit's load generator from Python: in-pod servers, latency clients, "who answered" probes.

Thin wrappers around the C programs in :mod:`labkit.native`, started through :mod:`labkit.nsexec`
so that each process lives in a pod's network namespace (and, for eBPF socket-LB, in the lab's
cgroup) and is pinned to the load CPUs from :mod:`labkit.measure.cpus` before it executes.

- :func:`start_server` starts ``lkserver`` and returns once it printed its readiness line.
- :func:`run_client` runs ``lkclient`` once and returns its JSON result as a dict.
- :class:`ClientSession` keeps one ``lkclient --serve`` in a pod and runs many measurements
  through it (slices of interleaved points: a pipe round trip each instead of a process start):
  latency (:meth:`~ClientSession.run`, :meth:`~ClientSession.burst`: one transaction at a time) and
  rates under load (:meth:`~ClientSession.rate`, :meth:`~ClientSession.rate_burst`: C transactions
  at once, closed loop or at an offered rate, with the CPU time per transaction).
- :func:`combine_windows` adds up a point's rate windows into its rate and CPU cost.
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
# rms rounding of a window's busy ticks: three counters move (user, system, softirq), each read
# twice and truncated to a tick, the difference uniform-triangular: sqrt(3 x 1/6) tick
CPU_ROUNDING_TICKS = 0.7


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
    mode: str, host: str, port: int, samples: int | None, warmup: int | None = None, size: int = 64,
    raw_path: Path | None = None, duration: float | None = None, connect_timeout_ms: int = 1000,
    timeout_ms: int = 1000, max_errors: int | None = None, *, concurrency: int | None = None,
    duration_ms: int | None = None, rate: float | None = None, cpu_stat: Sequence[int] | str | None = None,
) -> list[str]:
    """The ``lkclient`` command line for these options (see lkclient.c for their meaning).

    ``concurrency`` selects rate mode (``duration_ms`` its window, ``rate`` an offered rate per
    second, ``cpu_stat`` the CPUs whose /proc/stat time it reports); ``samples=None`` leaves ``-n``
    out (in rate mode with a window: no cap)."""
    if mode not in MODES:
        raise ValueError(f"unknown load mode {mode!r}; known: {', '.join(MODES)}")
    argv = [str(binary("lkclient")), "--mode", mode, "--host", host, "--port", str(port)]
    if samples is not None:
        argv += ["-n", str(samples)]
    argv += ["-s", str(size), "--connect-timeout-ms", str(connect_timeout_ms), "--timeout-ms", str(timeout_ms)]
    optional = {"-w": warmup, "--raw": raw_path, "--duration": duration, "--max-errors": max_errors,
                **_rate_options(concurrency, duration_ms, rate, cpu_stat)}
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, str(value)]
    return argv


def _rate_options(concurrency: int | None, duration_ms: int | None, rate: float | None,
                  cpu_stat: Sequence[int] | str | None) -> dict[str, str | None]:
    if cpu_stat is not None and not isinstance(cpu_stat, str):
        cpu_stat = ",".join(str(int(c)) for c in cpu_stat) or None
    return {"--concurrency": None if concurrency is None else str(concurrency),
            "--duration-ms": None if duration_ms is None else str(duration_ms),
            "--rate": None if rate is None else repr(float(rate)), "--cpu-stat": cpu_stat}


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
    ``timeout_ms``, ``max_errors``; rate mode: ``concurrency``, ``duration_ms``, ``rate``,
    ``cpu_stat``, with ``samples=None`` for a window without a cap). ``timeout`` bounds the whole
    run; by default it allows every attempt its connect and I/O timeouts plus a minute."""
    _require_netns(netns)
    argv = client_argv(mode, host, port, samples, warmup, size, raw_path, **options)
    if timeout is None:
        timeout = _default_timeout(samples, warmup, options)
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


def _default_timeout(samples: int | None, warmup: int | None, options: dict[str, Any], targets: int = 1) -> float:
    """A minute plus every attempt's connect and I/O timeouts (up to 1000 attempts), plus the windows."""
    per_try = (options.get("connect_timeout_ms", 1000) + options.get("timeout_ms", 1000)) / 1000
    window = (options.get("duration_ms") or 0) / 1000
    return 60 + targets * (window + per_try * min((samples or 0) + (warmup or 0), 1000))


class ClientSession:
    """One ``lkclient --serve`` process inside ``netns``/``cgroup``, pinned to ``cpus``, that runs
    measurements on request (:meth:`run`, same options and result as :func:`run_client`; rates under
    load: :meth:`rate`, :meth:`rate_burst`). It waits on its stdin between requests, using no CPU.
    Use as a context manager, or :meth:`close`."""

    def __init__(self, netns: str | None, cgroup: Path | None = None, cpus: Sequence[int] | None = None):
        _require_netns(netns)
        self.cpus = tuple(cpus) if cpus else None  # also the CPUs whose time rate() reports
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
            timeout = _default_timeout(samples, warmup, options)
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
        if timeout is None:
            timeout = 60 + (connect_timeout_ms + timeout_ms) / 1000 * min(len(targets) * (samples + warmup), 1000)
        return self._targets(argv, targets, f"{mode} burst", timeout)

    def rate(self, mode: str, host: str, port: int, concurrency: int = 1, duration_ms: int | None = None,
             samples: int | None = None, warmup: int | None = None, rate: float | None = None, size: int = 64,
             raw_path: Path | None = None, cpu_stat: Sequence[int] | str | None = None,
             timeout: float | None = None, **options: Any) -> dict[str, Any]:
        """``concurrency`` transactions at once to ``host:port`` for a window of ``duration_ms``
        (and/or until ``samples`` completed), after ``warmup`` completions (lkclient's default:
        max(100, 4 x concurrency)). Closed loop: a slot starts its next transaction as soon as one
        ends. Open loop with ``rate`` (per second, across the slots): transactions start on a
        fixed schedule and their latency counts from when they were MEANT to start, so a server
        that falls behind shows in the latencies (``unstarted``: due by the window's end, never
        started). ``cpu_stat``: the CPUs whose /proc/stat time is reported (default: the ones
        this session is pinned to; ``()`` for none). The result is :meth:`run`'s, its latencies
        under that load, plus ``concurrency``, ``offered_per_s``, ``rate_per_s``, ``unstarted``
        and ``cpu_*`` (see lkclient.c). An aborted run raises, as :meth:`run` does."""
        if duration_ms is None and samples is None:
            raise ValueError("rate() needs a window (duration_ms) or a number of transactions (samples)")
        return self.run(mode, host, port, samples, warmup, size, raw_path, timeout, concurrency=concurrency,
                        duration_ms=duration_ms, rate=rate, cpu_stat=self._cpu_stat(cpu_stat), **options)

    def rate_burst(self, mode: str, targets: Sequence[tuple[str, int, Path]], concurrency: int, duration_ms: int,
                   warmup: int | None = None, rate: float | None = None, size: int = 64,
                   cpu_stat: Sequence[int] | str | None = None, max_errors: int | None = None,
                   timeout: float | None = None, connect_timeout_ms: int = 1000,
                   timeout_ms: int = 1000) -> list[dict[str, Any]]:
        """A window of ``duration_ms`` for each of ``targets`` (``host, port, raw file``) in turn,
        as :meth:`rate` runs one (fresh connections and ``warmup`` completions per window), each
        target's samples APPENDED to its raw file: the interleaved discipline of :meth:`burst` for
        rates. One result per target, in order (``aborted`` set instead of raising); add a point's
        windows up with :func:`combine_windows`."""
        argv = ["--mode", mode, "--concurrency", str(concurrency), "--duration-ms", str(duration_ms),
                "-s", str(size), "--connect-timeout-ms", str(connect_timeout_ms), "--timeout-ms", str(timeout_ms)]
        flags = {"-w": warmup, "--max-errors": max_errors,
                 **_rate_options(None, None, rate, self._cpu_stat(cpu_stat))}
        argv += [a for flag, value in flags.items() if value is not None for a in (flag, str(value))]
        if timeout is None:
            timeout = _default_timeout(None, warmup, {"duration_ms": duration_ms, "connect_timeout_ms":
                                                      connect_timeout_ms, "timeout_ms": timeout_ms}, len(targets))
        return self._targets(argv, targets, f"{mode} rate burst", timeout)

    def _cpu_stat(self, cpu_stat: Sequence[int] | str | None) -> Sequence[int] | str | None:
        if cpu_stat is None:
            return getattr(self, "cpus", None)  # a subclass may not pin (remote sessions)
        return cpu_stat or None

    def _targets(self, argv: list[str], targets: Sequence[tuple[str, int, Path]], what: str,
                 timeout: float) -> list[dict[str, Any]]:
        for host, port, raw in targets:
            if any(c.isspace() or c == ":" for c in str(raw)):
                raise ValueError(f"raw path {raw} must not contain spaces or ':'")
            argv = argv + ["--target", f"{host}:{port}:{raw}"]
        result = self._request(argv, f"{what} to {len(targets)} targets", timeout)
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

    def collect(self, raws: Iterable[Path]) -> None:
        """Make sure every sample the session took for these raw files is in them, on this machine
        (here they always are; a remote session copies them now)."""

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


def combine_windows(results: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One point's rate windows (results of :meth:`ClientSession.rate_burst` for that point) added
    up: ``samples``, ``errors``, ``elapsed_s`` and the CPU ticks summed, ``rate_per_s`` and
    ``cpu_us_per_txn`` from the sums (None when unknown), ``windows`` counted.

    ``cpu_rounding`` is the typical relative error of ``cpu_us_per_txn`` from /proc/stat's 10 ms
    ticks (one standard deviation): each window rounds the counters that moved by under a tick each,
    about 0.7 tick rms in all, independently from window to window, so ``0.7 x sqrt(windows) /
    cpu_ticks``: 25 saturated windows of 200 ms (500 ticks) give 0.7 %. A partly idle CPU adds the
    sampling error of tick-based accounting (see lkclient.c), not included."""
    rs = list(results)
    samples = sum(int(r.get("samples") or 0) for r in rs)
    elapsed = sum(float(r.get("elapsed_s") or 0) for r in rs)
    out: dict[str, Any] = {"windows": len(rs), "samples": samples, "errors": sum(int(r.get("errors") or 0) for r in rs),
                           "elapsed_s": elapsed, "rate_per_s": samples / elapsed if elapsed else None}
    opened = [r for r in rs if r.get("elapsed_s")]  # a window that never opened (aborted) has no CPU reading
    if not opened or any(r.get("cpu_ticks") is None for r in opened):
        return out | {"cpu_s": None, "cpu_us_per_txn": None, "cpu_ticks": None, "cpu_busy": None, "cpu_rounding": None}
    ticks = sum(int(r["cpu_ticks"]) for r in opened)
    total = sum(int(r["cpu_total_ticks"]) for r in opened)
    cpu_s = ticks / float(opened[0]["cpu_hz"])
    return out | {"cpu_ticks": ticks, "cpu_s": cpu_s, "cpu_us_per_txn": cpu_s * 1e6 / samples if samples else None,
                  "cpu_busy": ticks / total if total else None,
                  "cpu_rounding": CPU_ROUNDING_TICKS * len(opened) ** 0.5 / ticks if ticks else None}


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
