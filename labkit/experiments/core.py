"""The experiment core every experiment reuses: set up, warm up, measure, tear down, record state.

:func:`execute` is a template method (papermill's ``Engine.execute_notebook`` shape): it creates (or
reopens, to resume) a run in the results store, pins labkit itself to the orchestration CPU, calls
the experiment's ``setup`` / ``measure`` / ``teardown`` with ``teardown`` in ``finally``, and marks the
run ``complete``, ``interrupted`` or ``failed`` in its manifest. Points already in the run are
passed to ``measure`` so that a resumed run skips them.

:func:`measure_interleaved` measures latency points (``lkclient`` in a pod, pinned to the load CPU,
raw samples saved, a row appended per point) together, interleaved sample by sample, so that every
point's samples are spread over the same stretch of time (why: see its docstring).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .. import nsexec
from ..errors import LabkitError, ResultsStoreError
from ..measure import loadgen
from ..measure.cpus import CpuPlan, pin_current_thread, plan_cpus
from ..measure.stats import latency_stats, load_raw
from ..results import Run


class Experiment(Protocol):
    name: str

    def setup(self, ctx: RunContext) -> None: ...

    def measure(self, ctx: RunContext) -> None: ...

    def teardown(self, ctx: RunContext) -> None: ...


@dataclasses.dataclass
class RunContext:
    """What an experiment gets while it runs."""

    run: Run
    params: Any
    cpus: CpuPlan
    done: set[tuple]  # keys of points already recorded (resume)
    progress: bool = True
    on_point: Callable[[dict], None] | None = None  # live consumers (widgets): called after each row

    def record(self, row: dict[str, Any]) -> None:
        self.run.append(row)
        if self.on_point:
            self.on_point(row)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time a phase of the run (labs up, latency, rates …): its seconds are added to the
        manifest's ``phases`` and a line goes to the run's ``run.log``, so a slow run shows where its
        time went."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            took = round(time.monotonic() - t0, 1)
            try:
                phases = self.run.manifest().get("phases", {})
                phases[name] = round(phases.get(name, 0) + took, 1)
                self.run.update_manifest(phases=phases)
                with open(self.run.path / "run.log", "a") as log:
                    log.write(f"{time.strftime('%H:%M:%S')} {name}: {took} s\n")
            except OSError as exc:  # a full store: the timing is lost, not the error that matters
                if exc.errno not in STORE_FULL:
                    raise


def point_name(full: dict[str, Any]) -> str:
    """A point's name in file names (its raw samples): what identifies it, as ``key=value`` pairs."""
    return "-".join(f"{k}={full.get(k)}" for k in ("datapath", "mode", "services", "position", "repeat", "metric"))


def point_key(row: dict[str, Any]) -> tuple:
    """Identity of a point for resume: what was measured, not what came out. The same for a row as
    written and as read back from points.csv (where an empty field is NaN and a whole number may be
    a float): a resumed run skips exactly the points it has."""
    return tuple(_plain(row.get(k)) for k in ("datapath", "mode", "services", "position", "repeat", "metric"))


def _plain(value: Any) -> str:
    if value is None or value == "" or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@nsexec.outside_event_loop
def execute(experiment: Experiment, params: Any, resume: str | None = None, progress: bool = True,
            on_point: Callable[[dict], None] | None = None) -> Run:
    from ..serve.client import use_daemon

    if use_daemon():  # not root: the labkit daemon measures it (when the measurement CPUs are free)
        from ..serve import participant

        return participant.run_experiment(experiment.name, params, resume=resume, progress=progress)
    plan = plan_cpus()
    if not plan.pinned:
        warnings.warn(plan.warning or "CPUs not separated", stacklevel=2)
    if resume:
        run = Run.open(resume)
        m = run.manifest()
        if m["experiment"] != experiment.name:
            raise LabkitError(f"run {run.run_id} is a {m['experiment']} run, not {experiment.name}")
        params = type(params)(**m["params"])
        done = {point_key(r) for r in run.points().to_dict("records")}
        run.update_manifest(status="running", resumed=m.get("resumed", 0) + 1)
    else:
        run = Run.create(experiment.name, dataclasses.asdict(params))
        done = set()
    ctx = RunContext(run, params, plan, done, progress, on_point)
    affinity = os.sched_getaffinity(0)
    pin_current_thread(plan.orchestration_cpus)
    status = "failed"
    try:
        with ctx.phase("setup"):
            experiment.setup(ctx)
        experiment.measure(ctx)
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except OSError as exc:
        if exc.errno not in STORE_FULL:
            raise
        raise ResultsStoreError(f"the results store {run.path.parent} could not be written ({exc.strerror}): the "
                                f"{len(run.points())} points written before are kept in {run.points_path}; free "
                                f"space and continue with --resume {run.run_id}") from exc
    finally:
        try:
            with ctx.phase("teardown"):
                experiment.teardown(ctx)
        finally:
            try:
                run.finish(status)
            except OSError as exc:  # a full store: the status stays "running", resumable
                if exc.errno not in STORE_FULL:
                    raise
            os.sched_setaffinity(0, affinity)  # the caller (a notebook, a test) gets its CPUs back
    return run


STORE_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def record_value(ctx: RunContext, row: dict[str, Any], metric: str, value: float, unit: str = "s") -> None:
    ctx.record({**row, "metric": metric, "value": value, "unit": unit})


@dataclasses.dataclass(frozen=True)
class LatencyPoint:
    """One latency point of :func:`measure_interleaved`: what identifies it (``row`` + ``metric``)
    and where its client runs (``netns`` and ``cgroup`` of the client pod, target ``host:port``).
    With ``lab`` (a :class:`labkit.lab.Lab`) and ``pod``, the client runs through
    ``lab.client_session(pod)``, wherever that lab's pods are (a VM on the vagrant backend)."""

    row: dict[str, Any]
    metric: str
    netns: str
    cgroup: Path | None
    host: str
    port: int
    lab: Any = None
    pod: str = ""

    @property
    def full(self) -> dict[str, Any]:
        return {**self.row, "metric": self.metric}

    @property
    def key(self) -> str:
        return point_name(self.full)


def measure_interleaved(ctx: RunContext, points: list[LatencyPoint], samples: int, warmup: int,
                        size: int = 64, burst: int = 20, rng: random.Random | None = None,
                        on_samples: Callable[[int], None] | None = None) -> None:
    """Measure ``points`` together, finely interleaved, until each has ``samples`` samples.

    Why: this machine's speed changes in steps every 0.1-3 s (the CRR p50 of one pod-to-pod path
    flips between ~100, ~120 and ~150 µs; the host, not labkit). A point measured in one stretch
    gets whichever steps fell in it: points measured one after the other differed by 5-30 % between
    repeats. Interleaved, every point sees the same mix of steps as the points it is compared with.

    How: one ``lkclient --serve`` per client pod (and metric) takes all of that pod's points in
    bursts (:meth:`~labkit.measure.loadgen.ClientSession.burst`): ``burst`` samples per point, one
    attempt per point in turn. Bursts of the different pods alternate in a fresh random order
    (``rng``) each cycle. Each session warms up once with ``warmup`` attempts spread over its
    points, and every burst discards its first attempt per point (the first after another pod
    ran). A point's samples are appended to its raw file as they come; its row is appended once it
    has all of them. A killed run resumes where the raw files stopped (``ctx.done`` holds the
    finished points; a torn last write is cut off)."""
    todo = [pt for pt in points if point_key(pt.full) not in ctx.done]
    have: dict[str, int] = {}
    for pt in todo:
        have[pt.key] = _raw_count(ctx.run.raw_path(pt.key))
    groups: dict[tuple, list[LatencyPoint]] = {}
    for pt in todo:
        if have[pt.key] >= samples:  # measured before a kill, not yet recorded
            _finish_point(ctx, pt, ctx.run.raw_path(pt.key))
        else:
            groups.setdefault((pt.netns, pt.cgroup, pt.metric), []).append(pt)
    cpus = ctx.cpus.load_cpus if ctx.cpus.pinned else None
    sessions: dict[tuple, loadgen.ClientSession] = {}
    try:
        for key, pts in groups.items():
            lab, pod = pts[0].lab, pts[0].pod
            sess = sessions[key] = (lab.client_session(pod, cpus) if lab is not None
                                    else loadgen.ClientSession(key[0], key[1], cpus))
            if warmup:
                sess.burst(key[2], [(pt.host, pt.port, Path(os.devnull)) for pt in pts], 1,
                           warmup=-(-warmup // len(pts)), size=size)
        while groups:
            keys = list(groups)
            for key in rng.sample(keys, len(keys)) if rng else keys:
                pts = groups[key]
                n = min(burst, *(samples - have[pt.key] for pt in pts))
                raws = [ctx.run.raw_path(pt.key) for pt in pts]
                res = sessions[key].burst(key[2], [(pt.host, pt.port, raw) for pt, raw in zip(pts, raws)], n,
                                          warmup=1, size=size)
                done = []
                for pt, raw, r in zip(pts, raws, res):
                    with open(_errors_path(raw), "a") as log:  # errors survive a resume
                        log.write(f"{int(r.get('errors') or 0)}\n")
                    have[pt.key] += int(r.get("samples") or 0)
                    if r.get("aborted"):  # its target stopped answering: keep what it has, go on
                        _cut_short(ctx, pt, r)
                    if r.get("aborted") or have[pt.key] >= samples:
                        done.append((pt, raw))
                # a remote session's samples come over now, every finished point of the burst in one
                # copy (the points of a session finish together: one ssh command per point took
                # ~1 s each under TCG, a third of a quick VM run's latency phase)
                sessions[key].collect([raw for _, raw in done])
                for pt, raw in done:
                    if _raw_count(raw) < have[pt.key]:  # lkclient could not write them (it said why)
                        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: raw samples of {pt.key} "
                                                    f"missing from {raw}")
                    _finish_point(ctx, pt, raw)
                    have[pt.key] = max(have[pt.key], samples)
                if on_samples:
                    on_samples(n * len(pts))
                groups[key] = [pt for pt in pts if have[pt.key] < samples]
                if not groups[key]:
                    del groups[key]
    finally:
        for sess in sessions.values():
            sess.close()


def _cut_short(ctx: RunContext, pt, result: dict) -> None:
    """A point whose target stopped answering (consecutive errors): noted in the manifest; its row
    keeps the samples and errors it has, and the run goes on."""
    import warnings

    where = getattr(pt, "netns", None) or getattr(pt, "pod", "")
    what = {"point": pt.key, "target": f"{pt.host}:{pt.port}", "from": where,
            "errors": result.get("error_kinds") or result.get("errors")}
    ctx.run.update_manifest(cut_short=[*ctx.run.manifest().get("cut_short", []), what])
    warnings.warn(f"point {pt.key} cut short: {pt.host}:{pt.port} stopped answering ({what['errors']})", stacklevel=2)


def _errors_path(raw: Path) -> Path:
    return raw.with_name(raw.name + ".errors")


def _raw_count(raw: Path) -> int:
    """Samples already in a raw file; a torn last sample (a kill mid-write) is cut off."""
    try:
        size = raw.stat().st_size
    except FileNotFoundError:
        return 0
    if size % 8:
        os.truncate(raw, size - size % 8)
    return size // 8


def _errors(raw: Path) -> int:
    """Errors of a point so far (one line per burst)."""
    try:
        return sum(int(x) for x in _errors_path(raw).read_text().split())
    except FileNotFoundError:
        return 0


def _finish_point(ctx: RunContext, pt: LatencyPoint, raw: Path) -> None:
    """Push a point's raw file to disk and append its row (a kill in here is resumed by doing it
    again: the row is what marks the point done)."""
    fd = os.open(raw, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    ctx.record({**pt.full, **latency_stats(load_raw(raw)), "errors": _errors(raw), "raw": raw.name})
    _errors_path(raw).unlink(missing_ok=True)


# ---------------------------------------------------------------- rates under load

@dataclasses.dataclass(frozen=True)
class RatePoint:
    """One rate point of :func:`measure_rates_interleaved`: ``row`` + ``metric`` identify it
    (``crr-rate`` …), ``mode`` is lkclient's (``crr``, ``rr``, ``udp_rr``), the client runs in ``pod``
    of ``lab`` against ``host:port``."""

    row: dict[str, Any]
    metric: str
    mode: str
    host: str
    port: int
    lab: Any
    pod: str

    @property
    def full(self) -> dict[str, Any]:
        return {**self.row, "metric": self.metric}

    @property
    def key(self) -> str:
        return point_name(self.full)


def measure_rates_interleaved(ctx: RunContext, points: list[RatePoint], seconds: float, window_ms: int,
                              concurrency: int, size: int = 64, rng: random.Random | None = None,
                              on_window: Callable[[int], None] | None = None) -> None:
    """Rates under load, in the interleaved discipline of :func:`measure_interleaved`: each point gets
    windows of ``window_ms`` with ``concurrency`` transactions at once (closed loop), one window per
    point in turn, client pods' turns in a fresh random order each cycle, until it has ``seconds`` of
    windows. A point's row has its transactions/s (all its windows' transactions over their time),
    the CPU µs per transaction on the load CPUs (/proc/stat) and its latency percentiles under that
    load; its raw samples are appended window by window, its windows' results kept beside them
    (``<raw>.windows.jsonl``), so a killed run resumes with the windows it had."""
    import json
    import math

    need = max(1, math.ceil(seconds * 1000 / window_ms))
    todo = [pt for pt in points if point_key(pt.full) not in ctx.done]
    windows: dict[str, list[dict]] = {pt.key: _windows(ctx.run.raw_path(pt.key)) for pt in todo}
    groups: dict[tuple, list[RatePoint]] = {}
    for pt in todo:
        if len(windows[pt.key]) >= need:  # measured before a kill, not yet recorded
            _finish_rate(ctx, pt, windows[pt.key], concurrency)
        else:
            groups.setdefault((id(pt.lab), pt.pod, pt.mode), []).append(pt)
    cpus = ctx.cpus.load_cpus if ctx.cpus.pinned else None
    sessions: dict[tuple, loadgen.ClientSession] = {}
    try:
        for key, pts in groups.items():
            sess = sessions[key] = pts[0].lab.client_session(pts[0].pod, cpus)
            # a few transactions to each target first, not measured: the first packets of a path wait
            # for neighbour (and VXLAN) resolution, and a UDP flow whose first request is lost there
            # would count an error in the first window
            sess.burst(key[2], [(pt.host, pt.port, Path(os.devnull)) for pt in pts], 1, warmup=3, size=size)
        while groups:
            keys = list(groups)
            for key in rng.sample(keys, len(keys)) if rng else keys:
                pts = groups[key]
                raws = [ctx.run.raw_path(pt.key) for pt in pts]
                res = sessions[key].rate_burst(key[2], [(pt.host, pt.port, raw) for pt, raw in zip(pts, raws)],
                                               concurrency, window_ms, size=size)
                for pt, raw, r in zip(pts, raws, res):
                    with open(raw.with_name(raw.name + ".windows.jsonl"), "a") as log:
                        log.write(json.dumps({k: r.get(k) for k in WINDOW_FIELDS}) + "\n")
                    windows[pt.key].append(r)
                    if r.get("aborted"):  # its target stopped answering: keep what it has, go on
                        _cut_short(ctx, pt, r)
                        windows[pt.key] += [{}] * (need - len(windows[pt.key]))
                    if len(windows[pt.key]) >= need:
                        sessions[key].collect([raw])
                        _finish_rate(ctx, pt, [w for w in windows[pt.key] if w], concurrency)
                if on_window:
                    on_window(len(pts))
                groups[key] = [pt for pt in pts if len(windows[pt.key]) < need]
                if not groups[key]:
                    del groups[key]
    finally:
        for sess in sessions.values():
            sess.close()


WINDOW_FIELDS = ("samples", "errors", "elapsed_s", "cpu_ticks", "cpu_total_ticks", "cpu_hz", "rate_per_s")


def _windows(raw: Path) -> list[dict]:
    import json

    try:
        lines = raw.with_name(raw.name + ".windows.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            break
    return out


def _finish_rate(ctx: RunContext, pt: RatePoint, windows: list[dict], concurrency: int) -> None:
    """A rate point's row: its windows added up (:func:`labkit.measure.loadgen.combine_windows`) and
    its latencies under load from the raw samples."""
    raw = ctx.run.raw_path(pt.key)
    total = loadgen.combine_windows(windows)
    stats = latency_stats(load_raw(raw)) if raw.exists() else {}
    ctx.record({**pt.full, **stats, "samples": total["samples"], "errors": total["errors"],
                "rate_per_s": total["rate_per_s"], "cpu_us_per_txn": total["cpu_us_per_txn"],
                "concurrency": concurrency, "raw": raw.name if raw.exists() else ""})


# ---------------------------------------------------------------- a workload's own client (wrk)

@dataclasses.dataclass(frozen=True)
class WrkPoint:
    """One point measured with ``wrk`` (the http workload's client) from ``pod`` of ``lab`` to ``url``:
    ``close`` sends ``Connection: close`` (a connection per request), else keep-alive."""

    row: dict[str, Any]
    metric: str
    url: str
    close: bool
    lab: Any
    pod: str

    @property
    def full(self) -> dict[str, Any]:
        return {**self.row, "metric": self.metric}

    @property
    def key(self) -> str:
        return point_name(self.full)


def measure_wrk_interleaved(ctx: RunContext, points: list[WrkPoint], seconds: float, concurrency: int,
                            rng: random.Random | None = None, on_run: Callable[[int], None] | None = None) -> None:
    """``wrk`` runs of one second (its shortest) per point in turn, points in a fresh random order each
    cycle, until each has ``seconds``; pinned to the load CPUs, whose /proc/stat time gives the CPU
    µs per request. A point's row: requests/s over all its runs, the median of its runs' latency
    percentiles (wrk keeps no raw samples; each run's summary is kept, ``<raw>.wrk.jsonl``)."""
    import json
    import math
    import statistics

    from ..measure.cpus import USER_HZ, cpu_ticks
    from ..workloads import run_wrk

    need = max(1, math.ceil(seconds))
    todo = [pt for pt in points if point_key(pt.full) not in ctx.done]
    runs = {pt.key: [json.loads(x) for x in _lines(_wrk_log(ctx, pt))] for pt in todo}
    cpus = ctx.cpus.load_cpus if ctx.cpus.pinned else None
    script = ctx.run.path / "raw" / "wrk-summary.lua"
    while todo:
        for pt in rng.sample(todo, len(todo)) if rng else list(todo):
            before = cpu_ticks(cpus) if cpus else None
            out = run_wrk(lambda argv, timeout: pt.lab.exec(pt.pod, argv, cpus=cpus, check=False, timeout=timeout),
                          pt.url, concurrency, 1, pt.close, script)
            if before is not None:
                out["cpu_s"] = (cpu_ticks(cpus)[0] - before[0]) / USER_HZ
            with open(_wrk_log(ctx, pt), "a") as log:
                log.write(json.dumps(out) + "\n")
            runs[pt.key].append(out)
            if on_run:
                on_run(1)
        for pt in [pt for pt in todo if len(runs[pt.key]) >= need]:
            rs = runs[pt.key]
            requests, us = sum(r["requests"] for r in rs), sum(r["duration_us"] for r in rs)
            cpu = [r["cpu_s"] for r in rs if r.get("cpu_s") is not None]
            med = {f"{q}_us": statistics.median(r[f"{q}_us"] for r in rs) for q in ("p50", "p90", "p99", "mean")}
            ctx.record({**pt.full, **med, "samples": requests, "errors": sum(r["error_count"] for r in rs),
                        "rate_per_s": requests / (us / 1e6) if us else None,
                        "cpu_us_per_txn": sum(cpu) * 1e6 / requests if cpu and requests and len(cpu) == len(rs)
                        else None, "concurrency": concurrency, "raw": _wrk_log(ctx, pt).name})
            todo.remove(pt)


def _wrk_log(ctx: RunContext, pt: WrkPoint) -> Path:
    raw = ctx.run.raw_path(pt.key)
    return raw.with_name(raw.name + ".wrk.jsonl")


def _lines(path: Path) -> list[str]:
    try:
        return [x for x in path.read_text().splitlines() if x.strip()]
    except FileNotFoundError:
        return []
