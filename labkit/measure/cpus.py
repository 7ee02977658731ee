"""Which CPUs carry the measured traffic and which carry labkit itself.

Latency figures are only stable when the load generator and the in-pod servers share one CPU and
nothing else runs there: loopback and veth traffic is then processed in the sender's context on
that CPU, and the orchestrator (Python, rule loading, logging) cannot preempt a sample. On the
2-core machines labkit was developed on, unpinned runs measured about 4x slower and erratic. So the
plan is: the lowest available CPU for load (client and servers), every other one for orchestration.

With a single CPU there is nothing to separate: the plan says ``pinned=False`` and carries a
warning that callers show to the user.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

UNPINNED_WARNING = (
    "only {n} CPU available ({cpus}): the load generator, the in-pod servers and labkit itself share "
    "it, so latency figures will be noisier — on a 2-core machine unpinned runs measured about 4x "
    "slower and erratic. Compare only runs made under the same conditions, repeat them (median of "
    ">= 3), or use a machine with at least 2 CPUs."
)


@dataclass(frozen=True)
class CpuPlan:
    """CPU sets for the measured processes (``load_cpus``) and for labkit (``orchestration_cpus``).

    ``pinned`` is False when the two cannot be separated; ``warning`` then says why it matters."""

    load_cpus: tuple[int, ...]
    orchestration_cpus: tuple[int, ...]
    pinned: bool
    warning: str | None = None


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """``"0"``, ``"0,2"``, ``"0-3,6"`` (the kernel's cpulist format) to a sorted tuple."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"bad CPU list {text!r}: expected e.g. '0' or '0-1,3'") from None
        if first > last or first < 0:
            raise ValueError(f"bad CPU range {part!r} in {text!r}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError(f"empty CPU list {text!r}")
    return tuple(sorted(cpus))


def plan_cpus(
    available: Iterable[int] | None = None,
    load: Iterable[int] | str | None = None,
    orchestration: Iterable[int] | str | None = None,
) -> CpuPlan:
    """Split the CPUs this process may use (``os.sched_getaffinity(0)`` unless ``available`` is
    given) into load and orchestration sets. ``load`` / ``orchestration`` override the choice
    (CPU numbers or a cpulist string; ``load`` defaults to ``$LABKIT_LOAD_CPUS`` when set);
    orchestration then defaults to the remaining CPUs."""
    avail = tuple(sorted(set(available if available is not None else available_cpus())))
    if load is None:
        load = os.environ.get("LABKIT_LOAD_CPUS") or None
    if not avail:
        raise ValueError("no CPU available to this process")
    load_set = _override(load, avail, "load")
    orch_set = _override(orchestration, avail, "orchestration")
    if load_set is None:
        load_set = _first_not_in(avail, orch_set)
    if orch_set is None:
        orch_set = tuple(c for c in avail if c not in load_set) or load_set
    if set(load_set) & set(orch_set):
        return CpuPlan(load_set, orch_set, pinned=False, warning=_overlap_warning(avail, load_set, orch_set))
    return CpuPlan(load_set, orch_set, pinned=True)


def _overlap_warning(avail: tuple[int, ...], load: tuple[int, ...], orch: tuple[int, ...]) -> str:
    if len(avail) < 2:
        return UNPINNED_WARNING.format(n=len(avail), cpus=_fmt(avail))
    return (f"load CPUs {_fmt(load)} overlap orchestration CPUs {_fmt(orch)}: labkit itself will "
            "disturb the measured traffic, so latency figures will be noisier")


_BEFORE_PINNING: tuple[int, ...] | None = None


def available_cpus() -> tuple[int, ...]:
    """The CPUs this process may use, as they were before labkit pinned its own thread: once the
    orchestration thread is pinned, ``sched_getaffinity(0)`` only shows the orchestration CPU, and
    anything planned or started from it (in-pod servers) would land there too."""
    return _BEFORE_PINNING or tuple(sorted(os.sched_getaffinity(0)))


def pin_current_thread(cpus: Iterable[int]) -> None:
    """Move the calling thread (and threads it starts later) to ``cpus``; used for orchestration."""
    global _BEFORE_PINNING
    if _BEFORE_PINNING is None:
        _BEFORE_PINNING = tuple(sorted(os.sched_getaffinity(0)))
    os.sched_setaffinity(0, set(cpus))


def _override(value: Iterable[int] | str | None, avail: tuple[int, ...], what: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    cpus = parse_cpu_list(value) if isinstance(value, str) else tuple(sorted(set(value)))
    missing = [c for c in cpus if c not in avail]
    if missing or not cpus:
        raise ValueError(f"{what} CPUs {_fmt(cpus)} are not all available to this process "
                         f"(available: {_fmt(avail)})")
    return cpus


def _first_not_in(avail: tuple[int, ...], taken: tuple[int, ...] | None) -> tuple[int, ...]:
    free = [c for c in avail if not taken or c not in taken]
    return (free[0],) if free else avail[:1]


def _fmt(cpus: Iterable[int]) -> str:
    return ",".join(str(c) for c in cpus)


def cpu_busy(cpus: Iterable[int], window: float = 0.5) -> float:
    """Fraction of ``window`` seconds that ``cpus`` spent busy (everything but idle and iowait in
    ``/proc/stat``; steal counts as busy: the host took the CPU)."""
    def sample() -> dict[int, tuple[int, int]]:
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                name, *vals = line.split()
                if name.startswith("cpu") and name[3:].isdigit():
                    v = [int(x) for x in vals]
                    idle = v[3] + v[4]
                    out[int(name[3:])] = (sum(v[:8]) - idle, sum(v[:8]))
        return out

    wanted = set(cpus)
    a = sample()
    time.sleep(window)
    b = sample()
    busy = sum(b[c][0] - a[c][0] for c in wanted if c in a and c in b)
    total = sum(b[c][1] - a[c][1] for c in wanted if c in a and c in b)
    return busy / total if total else 0.0


def wait_quiet(cpus: Iterable[int], threshold: float = 0.05, window: float = 0.5, timeout: float = 20.0) -> float:
    """Wait until ``cpus`` are idle (busy < ``threshold`` over ``window`` s), at most ``timeout`` s;
    returns the seconds waited. After a big table load the kernel frees the old table and runs
    deferred work (kworkers, RCU callbacks) that would land inside the first samples; here the
    wait after loading 5,000 services into four datapaths was 0.5-1 s."""
    cpus = tuple(cpus)
    t0 = time.monotonic()
    while cpu_busy(cpus, window) >= threshold and time.monotonic() - t0 < timeout:
        pass
    return time.monotonic() - t0


@contextmanager
def all_cpus() -> Iterator[None]:
    """Let the calling thread (and what it starts) use every CPU for a while, then pin it back:
    for work that no measurement overlaps, such as loading a datapath's table, which is then timed
    as this machine runs it (iptables-legacy-restore of 20,000 services: 5.3 s sharing labkit's CPU,
    4.3-4.5 s with both)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(available_cpus()))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextmanager
def off_the_load_cpus() -> Iterator[None]:
    """Run the calling thread (and what it starts, unless pinned otherwise) on the orchestration CPUs
    for a while: building or removing a lab never competes with a measurement on the load CPU
    (another lab's, perhaps another user's). Nothing changes on a one-CPU machine."""
    global _BEFORE_PINNING
    plan = plan_cpus()
    before = os.sched_getaffinity(0)
    kept = _BEFORE_PINNING
    if plan.pinned:
        # what is planned meanwhile (in-pod servers: the load CPUs) is planned from every CPU, not
        # from the orchestration CPU this thread now runs on
        _BEFORE_PINNING = available_cpus()
        os.sched_setaffinity(0, set(plan.orchestration_cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
        _BEFORE_PINNING = kept


def cpu_ticks(cpus: Iterable[int]) -> tuple[int, int]:
    """(busy, total) USER_HZ ticks of ``cpus`` since boot, from /proc/stat: busy is user + nice +
    system + irq + softirq, as lkclient counts it (``--cpu-stat``)."""
    wanted = {f"cpu{c}" for c in cpus}
    busy = total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name in wanted:
                v = [int(x) for x in values[:8]]  # user nice system idle iowait irq softirq steal
                busy += v[0] + v[1] + v[2] + v[5] + v[6]
                total += sum(v)
    return busy, total


USER_HZ = os.sysconf("SC_CLK_TCK")
