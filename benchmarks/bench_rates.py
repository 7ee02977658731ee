#!/usr/bin/env python3
"""Rates under load on loopback: transactions/s and CPU µs per transaction versus concurrency.

lkclient's rate mode (closed loop) against lkserver, both pinned to the load CPU of
:func:`labkit.measure.cpus.plan_cpus` in a throwaway network namespace (``lkbench-rt-<pid>``); this
script moves itself to the orchestration CPUs. Every point (mode x C) is measured in the
interleaved discipline labkit's experiments use: ``--rounds`` turns, each giving every point one
window of ``--window-ms`` in a fresh random order (:meth:`ClientSession.rate_burst`, raw samples
appended), the windows of a point added up (:func:`loadgen.combine_windows`). So every point sees
this machine's speed steps alike, and the ratios between points hold even when the absolute
figures move.

Printed per mode: rate/s, its ratio to C=1, CPU µs per transaction on the load CPU (/proc/stat:
client, server and the kernel's packet work, plus anything else that ran there) and its ratio,
how busy that CPU was, p50/p99 latency under that load, and the tick rounding of the CPU figure.

What to expect with client and server on ONE CPU: it is busy at C=1 already (the two take turns),
so C buys no parallelism, only batching (one epoll_wait, one wake-up, for many transactions): a
modest gain that stops once batches are full, while latency grows as C / rate (Little's law).

Usage (root): .venv/bin/python benchmarks/bench_rates.py [--rounds 15] [--window-ms 200]
              [--concurrency 1,4,16,64] [--modes crr,rr]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkit import nsexec  # noqa: E402
from labkit.measure import cpus, loadgen, stats  # noqa: E402

from bench_loadgen import create_lab_netns  # noqa: E402  # this folder is sys.path[0] for a script

PORT = 18080


def measure(ns: str, load: tuple[int, ...], points: list[tuple[str, int]], rounds: int, window_ms: int,
            raw_dir: Path) -> dict[tuple[str, int], list[dict]]:
    """``rounds`` windows per point, the points in a fresh random order each round."""
    windows: dict[tuple[str, int], list[dict]] = {pt: [] for pt in points}
    with loadgen.ClientSession(ns, cpus=load) as session:
        for rnd in range(1, rounds + 1):
            for mode, c in random.sample(points, len(points)):
                raw = raw_dir / f"{mode}-{c}.i64"
                (r,) = session.rate_burst(mode, [("127.0.0.1", PORT, raw)], c, window_ms)
                if r["aborted"] or r["errors"]:
                    print(f"{mode} C={c}: {r['errors']} errors {r['error_kinds']}", file=sys.stderr)
                windows[(mode, c)].append(r)
            print(f"round {rnd}/{rounds} done", file=sys.stderr, flush=True)
    return windows


def report(windows: dict[tuple[str, int], list[dict]], raw_dir: Path, plan: cpus.CpuPlan, window_ms: int) -> None:
    print(f"closed loop on loopback, client and server on load CPU {plan.load_cpus}, "
          f"{len(next(iter(windows.values())))} windows of {window_ms} ms per point, interleaved")
    header = (f"{'mode':<5} {'C':>3} {'rate/s':>10} {'xC=1':>6} {'cpu us/txn':>11} {'xC=1':>6} "
              f"{'cpu busy':>8} {'p50 us':>9} {'p99 us':>9} {'C/rate us':>10} {'cpu +-':>7}")
    print(header)
    for mode in dict.fromkeys(m for m, _ in windows):
        base = None
        for (m, c), ws in windows.items():
            if m != mode:
                continue
            total = loadgen.combine_windows(ws)
            lat = stats.latency_stats(stats.load_raw(raw_dir / f"{m}-{c}.i64"))
            rate, cost = total["rate_per_s"], total["cpu_us_per_txn"]
            if base is None:
                base = (rate, cost)
            ratio = (lambda v, b: f"{v / b:6.2f}" if v and b else f"{'-':>6}")
            print(f"{m:<5} {c:>3} {rate:>10.0f} {ratio(rate, base[0])} {cost or float('nan'):>11.2f} "
                  f"{ratio(cost, base[1])} {total['cpu_busy'] or float('nan'):>8.3f} {lat['p50_us']:>9.1f} "
                  f"{lat['p99_us']:>9.1f} {c / rate * 1e6:>10.1f} {100 * (total['cpu_rounding'] or 0):>6.2f}%")
    print("C/rate: the mean latency Little's law predicts for C in flight; cpu +-: the tick rounding "
          "(one standard deviation) of cpu us/txn")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--window-ms", type=int, default=200)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--modes", default="crr,rr")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 1
    plan = cpus.plan_cpus()
    if plan.warning:
        print("warning:", plan.warning, file=sys.stderr)
    cpus.pin_current_thread(plan.orchestration_cpus)
    points = [(m, int(c)) for m in args.modes.split(",") for c in args.concurrency.split(",")]
    ns = f"lkbench-rt-{os.getpid()}"
    create_lab_netns(ns)
    server = None
    try:
        server = loadgen.start_server(ns, "bench", [PORT], cpus=plan.load_cpus)
        with tempfile.TemporaryDirectory(prefix="lkbench-rates-") as tmp:
            windows = measure(ns, plan.load_cpus, points, args.rounds, args.window_ms, Path(tmp))
            report(windows, Path(tmp), plan, args.window_ms)
    finally:
        if server is not None:
            loadgen.stop_server(server)
        nsexec.remove_netns(ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
