"""Load and update times of the netfilter Service datapaths versus the number of services.

For each datapath and each N (services of 3 endpoints each): the full load of N services into an
empty node by a fresh datapath instance (one ``iptables-restore`` / one ``nft`` transaction), then
``--updates`` partial syncs adding one service each and one removing a service, then the cleanup.
Goals: iptables-legacy loads 20k in <= 5 s; nftables loads 20k in <= 30 s and applies one update in
<= 1 s.

Times are the datapath's own (``SyncResult.seconds``: render + apply; the O(N) service diff that
``Datapath.sync`` computes first is shared by every datapath and reported apart as "diff"; for eBPF
the compile and program load of a fresh instance is taken out and printed apart). Next to
each wall time the CPU time (user + system, this process and its children) is given: on this shared
2-core machine a wall time jumps when other work runs, CPU time much less. Updates: median (and
max) of ``--updates`` runs.

Datapaths are chosen by registry name (``--datapaths``). Any registered datapath runs if the
NodeContext built here is enough for it; one that needs more gets it from :data:`CONTEXT_HOOKS`
(``ebpf``: an empty node cgroup of the benchmark's own) — add a function there, nothing else
changes. (``ebpf-tc`` attaches to pod interfaces, which this benchmark has none of: its
load and update times come from `labkit run service-scale --datapaths ebpf-tc`.)

Runs as root in its own node namespace per datapath (``lkbench-dp-<pid>-<n>``), removed at the
end, also on failure. No traffic is sent.

    .venv/bin/python benchmarks/bench_datapath_load.py [--sizes 1000,5000,10000,20000]
        [--datapaths iptables-legacy,iptables-nft,nftables] [--updates 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkit import nsexec  # noqa: E402
from labkit.datapath import get  # noqa: E402
from labkit.datapath.base import NodeContext  # noqa: E402
from labkit.services import Endpoint, ServicePort, ServiceTable, diff  # noqa: E402

PREFIX = f"lkbench-dp-{os.getpid()}"
BASE = int(ipaddress.IPv4Address("10.96.0.16"))
GOALS = {("iptables-legacy", "load", 20000): 5.0, ("nftables", "load", 20000): 30.0,
         ("nftables", "add", 20000): 1.0}

# name -> fn(node_netns, undo) returning extra NodeContext fields (cgroup, pods ...) for datapaths
# that need more than a namespace. Registered by the datapath's owner.
CONTEXT_HOOKS: dict[str, Callable[[str, list], dict]] = {}


def _node_cgroup(node: str, undo: list) -> dict:
    """socket-LB attaches to the node's pod cgroup: an empty one of the benchmark's own (no process
    is in it, nothing else is rewritten), removed at the end."""
    root = nsexec.cgroup2_root()
    if root is None:
        raise SystemExit("ebpf needs cgroup v2 (labkit doctor says where it is mounted)")
    cg = root / node
    cg.mkdir()
    undo.append(lambda: nsexec.remove_cgroup(cg))
    return {"cgroup": cg}


CONTEXT_HOOKS["ebpf"] = _node_cgroup


def service(k: int) -> ServicePort:
    eps = tuple(Endpoint(f"10.244.{j + 1}.{k % 250 + 2}", 8080) for j in range(3))
    return ServicePort("bench", f"svc-{k}", "", "TCP", str(ipaddress.IPv4Address(BASE + k)), 80, eps)


def table(n: int) -> ServiceTable:
    return ServiceTable.of(service(k) for k in range(n))


def cpu() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    c0, t0 = cpu(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, cpu() - c0


def bench_one(name: str, sizes: list[int], updates: int, undo: list) -> list[dict]:
    node = f"{PREFIX}-{len(undo)}"
    nsexec.create_netns(node)
    undo.append(lambda: nsexec.remove_netns(node))
    extra = CONTEXT_HOOKS[name](node, undo) if name in CONTEXT_HOOKS else {}
    state = Path(f"/tmp/{PREFIX}-{name}")
    undo.append(lambda: shutil.rmtree(state, ignore_errors=True))
    ctx = NodeContext(lab=PREFIX, prefix=f"lk-{PREFIX}", node="bench", netns=node, pod_cidr="10.244.0.0/16",
                      service_cidr="10.96.0.0/12", state_dir=state, **extra)
    cls = get(name)
    cls.preflight()
    rows = []
    for n in sizes:
        dp = cls(ctx)
        dp.cleanup()  # a known empty start
        t = table(n)
        _, diff_s, _ = timed(lambda: diff(None, t))
        res, _, load_cpu = timed(lambda: dp.sync(t))
        row = {"datapath": name, "services": n, "load_s": res.seconds, "load_cpu_s": load_cpu, "diff_s": diff_s}
        compiled = getattr(dp, "compile_seconds", None)
        if compiled:  # eBPF: the first sync of a fresh instance compiles and loads the programs too
            row["compile_s"] = compiled
            row["load_s"] -= compiled
        adds, add_cpus = [], []
        for i in range(updates):
            t = t.with_ports(service(n + i))
            res, _, c = timed(lambda: dp.sync(t))
            assert not res.full, "an update must be a partial sync"
            adds.append(res.seconds)
            add_cpus.append(c)
        t = t.without(service(0).key)
        res, _, rm_cpu = timed(lambda: dp.sync(t))
        _, clean_s, _ = timed(dp.cleanup)
        row.update(add_s=statistics.median(adds), add_max_s=max(adds), add_cpu_s=statistics.median(add_cpus),
                   remove_s=res.seconds, remove_cpu_s=rm_cpu, cleanup_s=clean_s)
        rows.append(row)
        extra = f" (+ compile {row['compile_s']:.2f} s)" if "compile_s" in row else ""
        print(f"  {name:16} N={n:6}  load {row['load_s']:6.2f} s{extra} (cpu {load_cpu:5.2f})  add one "
              f"{row['add_s']:6.3f} s (cpu {row['add_cpu_s']:5.2f})  remove one {row['remove_s']:6.3f} s  "
              f"cleanup {clean_s:5.2f} s", flush=True)
    return rows


def report(rows: list[dict]) -> None:
    sizes = sorted({r["services"] for r in rows})
    names = list(dict.fromkeys(r["datapath"] for r in rows))
    by = {(r["datapath"], r["services"]): r for r in rows}
    print("\nFull load, seconds wall (CPU) — and growth versus the smallest N")
    print(f"{'datapath':16}" + "".join(f"{n:>22}" for n in sizes))
    for name in names:
        first = by.get((name, sizes[0]))
        cells = []
        for n in sizes:
            r = by.get((name, n))
            cells.append("-" if r is None else f"{r['load_s']:.2f} ({r['load_cpu_s']:.1f}) x{r['load_s'] / first['load_s']:.0f}")
        print(f"{name:16}" + "".join(f"{c:>22}" for c in cells))
    print("\nAdd one service, seconds (median; CPU) / remove one service, seconds")
    print(f"{'datapath':16}" + "".join(f"{n:>22}" for n in sizes))
    for name in names:
        cells = []
        for n in sizes:
            r = by.get((name, n))
            cells.append("-" if r is None else f"{r['add_s']:.3f} ({r['add_cpu_s']:.2f}) / {r['remove_s']:.2f}")
        print(f"{name:16}" + "".join(f"{c:>22}" for c in cells))
    ref = "iptables-legacy"
    if ref in names:
        print(f"\nRatio to {ref} at the same N (load / add one)")
        for name in names:
            if name == ref:
                continue
            cells = []
            for n in sizes:
                a, b = by.get((name, n)), by.get((ref, n))
                cells.append("-" if not (a and b) else f"{a['load_s'] / b['load_s']:.2f} / {a['add_s'] / b['add_s']:.2f}")
            print(f"{name:16}" + "".join(f"{c:>22}" for c in cells))
    print("\nGoals")
    for (name, what, n), limit in GOALS.items():
        r = by.get((name, n))
        if r is None:
            continue
        got = r["load_s"] if what == "load" else r["add_s"]
        print(f"  {name} {what} at {n}: {got:.2f} s <= {limit:g} s: {'PASS' if got <= limit else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,5000,10000,20000")
    ap.add_argument("--datapaths", default="iptables-legacy,iptables-nft,nftables")
    ap.add_argument("--updates", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write every row here")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces, netfilter)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in a.sizes.split(",")]
    print(f"load average at start: {os.getloadavg()[0]:.2f} (2 CPUs; other work inflates wall times)")
    rows: list[dict] = []
    undo: list = []
    try:
        for name in a.datapaths.split(","):
            rows += bench_one(name, sizes, a.updates, undo)
    finally:
        for fn in reversed(undo):
            fn()
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    report(rows)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
