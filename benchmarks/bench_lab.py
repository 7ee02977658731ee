"""Build and tear down 2 nodes × 50 pods in mixed modes on the netns backend; print seconds.

Goal on this machine (issue 2): build ≤ 5 s, teardown ≤ 3 s. Run as root:
    .venv/bin/python benchmarks/bench_lab.py [--repeats 3] [--pods 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

from labkit import lab
from labkit.spec import parse_spec

MIXED = ("veth", "bridge", "overlay", "eni-policy-route", "macvlan")


def spec(pods_per_node: int, name: str = "bench") -> dict:
    nodes = []
    for n in (1, 2):
        pods = [{"name": f"x{n}-{i}", "mode": "eni-exclusive"} for i in range(2)]
        pods += [{"name": f"p{n}-{i}", "mode": MIXED[i % len(MIXED)], "labels": {"app": "web"}}
                 for i in range(2, pods_per_node)]
        nodes.append({"name": f"n{n}", "enis": 3, "pods": pods})
    return {"name": name, "datapath": "none", "nodes": nodes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pods", type=int, default=50, help="pods per node")
    args = ap.parse_args()
    s = parse_spec(spec(args.pods))
    lab.down(s.name)
    builds, downs = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        lab.up(s, progress=False)
        builds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        lab.down(s.name)
        downs.append(time.perf_counter() - t0)
    b, d = statistics.median(builds), statistics.median(downs)
    print(f"2 nodes x {args.pods} pods (modes: 2 eni-exclusive + {', '.join(MIXED)} per node), "
          f"{args.repeats} repeats, median:")
    print(f"  build    {b:6.2f} s  (runs: {', '.join(f'{x:.2f}' for x in builds)})  goal <= 5 s: "
          f"{'met' if b <= 5 else 'NOT met'}")
    print(f"  teardown {d:6.2f} s  (runs: {', '.join(f'{x:.2f}' for x in downs)})  goal <= 3 s: "
          f"{'met' if d <= 3 else 'NOT met'}")


if __name__ == "__main__":
    main()
