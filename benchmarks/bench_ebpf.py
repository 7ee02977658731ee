"""Load and update times of the eBPF datapaths versus the number of services.

For each datapath (``ebpf`` socket-LB, ``ebpf-tc``) and each N: the full load of N services (3
endpoints each) into empty maps by a fresh datapath instance, as ``labkit up`` does it (opening the
pins, reading back the maps, one batch per map); the full resync of a later process onto maps that
already hold the table; and one update at N (add or remove one service: a partial sync). Compile + attach is timed once per datapath. Goals: full load of 20k <= 0.3 s, one
update <= 1 ms.

"apply" is the datapath's own time (``SyncResult.seconds``); "sync" adds the service diff computed
by ``Datapath.sync`` (O(N), shared by every datapath). Medians (and minimum) over ``--repeat`` runs,
and the CPU time (user + system) of the full load: on a shared 2-core machine wall times of single
runs jump when other work runs, CPU time much less.

Runs as root and builds its own objects, all named ``lkbench-ebpf-<pid>``: a cgroup folder (socket-LB
attaches there, never to a cgroup root), and a node + pod namespace pair joined by one veth (tc
attaches on it). No traffic is sent. Everything is removed at the end, also on failure.

    .venv/bin/python benchmarks/bench_ebpf.py [--sizes 1000,5000,10000,20000,50000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkit import nsexec  # noqa: E402
from labkit.datapath import get  # noqa: E402
from labkit.datapath.base import NodeContext, PodIface  # noqa: E402
from labkit.services import Endpoint, ServicePort, ServiceTable  # noqa: E402

PREFIX = f"lkbench-ebpf-{os.getpid()}"
BASE = int(ipaddress.IPv4Address("10.96.0.10"))
POD_IP = "10.244.0.1"


def table(n: int) -> ServiceTable:
    return ServiceTable.of(
        ServicePort("default", f"s{k}", "", "TCP", str(ipaddress.IPv4Address(BASE + k)), 80,
                    tuple(Endpoint(f"10.244.{j}.{k % 250 + 2}", 8080) for j in range(3)))
        for k in range(n))


def build(undo: list) -> tuple[Path, str, str]:
    from pyroute2 import IPRoute

    cgroup = nsexec.cgroup2_root() / PREFIX
    cgroup.mkdir()
    undo.append(lambda: nsexec.remove_cgroup(cgroup))
    node, pod = f"{PREFIX}-node", f"{PREFIX}-pod"
    for ns in (node, pod):
        nsexec.create_netns(ns)
        undo.append(lambda ns=ns: nsexec.remove_netns(ns))

    def veth():
        with IPRoute() as ipr:
            ipr.link("add", ifname="lx-pod", kind="veth", peer={"ifname": "eth0"})
            ipr.link("set", index=ipr.link_lookup(ifname="eth0")[0], net_ns_fd=str(nsexec.netns_path(pod)))
            ipr.link("set", index=ipr.link_lookup(ifname="lx-pod")[0], state="up")

    def address():
        with IPRoute() as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address=POD_IP, prefixlen=24)

    nsexec.in_netns(node, veth)  # sockets made and used in the namespace's own thread
    nsexec.in_netns(pod, address)
    return cgroup, node, pod


def measure(name: str, ctx: NodeContext, sizes: list[int], repeat: int) -> list[dict]:
    cls = get(name)
    dp = cls(ctx)
    rows = []
    try:
        t0 = time.perf_counter()
        dp.sync(table(1))
        first = time.perf_counter() - t0
        print(f"{name}: compile {dp.compile_seconds:.2f} s, compile + load + pin + attach + first sync "
              f"{first:.2f} s", flush=True)
        for n in sizes:
            tab = table(n)
            extra = ServicePort("default", "extra", "", "TCP", str(ipaddress.IPv4Address(BASE + n)), 80,
                                (Endpoint("10.244.0.1", 8080),))
            loads, cpus = [], []
            for _ in range(repeat):
                emptier = cls(ctx)  # a fresh instance's sync is full: it empties the maps
                emptier.sync(ServiceTable.of([]))
                emptier.close()
                fresh = cls(ctx)
                c0 = time.process_time()  # user + system time: what the load costs, waits excluded
                res = fresh.sync(tab)
                cpus.append(time.process_time() - c0)
                assert res.full and res.services == n
                loads.append(res.seconds)
                fresh.close()
            resyncs = []
            for _ in range(repeat):  # a later process: its first sync reads the full maps back
                fresh = cls(ctx)
                resyncs.append(fresh.sync(tab).seconds)
                fresh.close()
            dp = cls(ctx)
            dp.sync(tab)
            applies, syncs = [], []
            bigger = tab.with_ports(extra)
            for i in range(max(20, repeat)):
                t0 = time.perf_counter()
                res = dp.sync(bigger if i % 2 == 0 else tab)
                syncs.append(time.perf_counter() - t0)
                assert not res.full and res.added + res.removed == 1
                applies.append(res.seconds)
            rows.append({"datapath": name, "services": n, "load_s": statistics.median(loads),
                         "load_min_s": min(loads), "load_cpu_s": statistics.median(cpus), "resync_s": statistics.median(resyncs), "update_ms": statistics.median(applies) * 1e3,
                         "update_min_ms": min(applies) * 1e3, "sync_ms": statistics.median(syncs) * 1e3})
            r = rows[-1]
            print(f"  N={n:>6}: full load {r['load_s']:.3f} s (min {r['load_min_s']:.3f}, cpu {r['load_cpu_s']:.3f}), "
                  f"resync by a new "
                  f"process {r['resync_s']:.3f} s, one update "
                  f"{r['update_ms']:.3f} ms (min {r['update_min_ms']:.3f}), sync incl. diff {r['sync_ms']:.1f} ms",
                  flush=True)
    finally:
        dp.cleanup()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,5000,10000,20000,50000")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--datapath", default="ebpf,ebpf-tc")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    sizes = [int(x) for x in args.sizes.split(",")]
    undo: list = []
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"{PREFIX}-") as state:
        try:
            cgroup, node, pod = build(undo)
            for name in args.datapath.split(","):
                ctx = NodeContext(lab=PREFIX, prefix=f"lk-{PREFIX}", node="bench", netns=node,
                                  pod_cidr="10.244.0.0/16", service_cidr="10.96.0.0/12",
                                  state_dir=Path(state) / name, cgroup=cgroup / "node",
                                  pods=(PodIface("pod", "lx-pod", pod, POD_IP, "veth"),))
                ctx.cgroup.mkdir(exist_ok=True)
                rows += measure(name, ctx, sizes, args.repeat)
        finally:
            for fn in reversed(undo):
                fn()
    print()
    print("| datapath | services | full load (s) median / min / cpu | resync by new process (s) "
          "| one update (ms) median / min | sync incl. diff (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['datapath']} | {r['services']} | {r['load_s']:.3f} / {r['load_min_s']:.3f} / "
              f"{r['load_cpu_s']:.3f} | {r['resync_s']:.3f} | "
              f"{r['update_ms']:.3f} / {r['update_min_ms']:.3f} | {r['sync_ms']:.1f} |")
    goal = [r for r in rows if r["services"] == 20000]
    for r in goal:
        print(f"{r['datapath']} at 20k: full load {'OK' if r['load_s'] <= 0.3 else 'OVER'} (goal 0.3 s), "
              f"one update {'OK' if r['update_ms'] <= 1 else 'OVER'} (goal 1 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
