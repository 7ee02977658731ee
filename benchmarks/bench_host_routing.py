"""eBPF host routing against the node's kernel routing: TCP_RR and TCP_CRR p50, pod to pod on the
same node and across nodes, and the node-to-node host-network baseline.

Two identical labs of two nodes of ``veth`` pods (``cli`` and ``srv-s`` on ``n1``, ``srv-r`` on
``n2``; ``--datapath``, default ``ebpf`` socket-LB as Cilium pairs it with host routing): ``lkbh<pid>k``
forwards with the nodes' kernel routing, ``lkbh<pid>b`` with eBPF host routing synced on both nodes
(:class:`labkit.hostrouting.BpfHostRouting`). ``--kernel-datapath`` gives the kernel lab another
Service datapath: ``iptables-nft`` (kube-proxy) puts netfilter and conntrack on every forwarded
packet, as on a Kubernetes node; with the default (the same as ``--datapath``) the kernel lab's nodes
have no netfilter rule at all, the cheapest kernel path there is. The host-network baseline is an
``lkserver`` in node ``n2``'s own namespace of the bpf lab (no netfilter rule; ``eth0``'s host
routing program passes node traffic on), measured from ``n1``'s namespace (the same VPC router in
between).

Every point (config × position × metric × repeat) is measured together, interleaved burst by burst
as labkit's experiments measure (:func:`labkit.experiments.core.measure_interleaved`: one
``lkclient --serve`` per client, bursts in a fresh random order each cycle; client and servers on
the load CPU, this process on the others, :mod:`labkit.measure.cpus`), so that every config sees the
same moments of this machine. Reported: the median over ``--repeat`` repeats of each point's p50,
and the ratios the issue sets goals on (cross-node TCP_RR p50 >= 10 % lower with bpf, TCP_CRR >= 5 %
lower, bpf TCP_RR within 10 % of the host network). Differences under ~3 µs are noise here.
Both labs are torn down at the end, also on failure; raw samples go to a temporary results folder
(``--results`` keeps them).

Where the packets went (the why of the ratios): the host-routing counters of each node
(``redirect_peer``: delivered into a pod past the node's stack, on the receive side too;
``redirect_neigh``: sent out of the node past its stack, to the FIB's next hop; ``neigh_unresolved``:
of those, the ones whose next hop the kernel had to resolve first; ``pass``: left to the stack), the
CPUs the pods' servers may run on (the load CPU, with the clients) and, per lab, the IP datagrams
each namespace's own stack forwarded during the measurement (``Ip: ForwDatagrams`` of ``n1``,
``n2`` and the VPC router ``vpc``): with eBPF host routing the nodes forward (almost) nothing,
while the VPC router's stack still forwards every cross-node packet in both labs.

    .venv/bin/python benchmarks/bench_host_routing.py [--samples 2000] [--repeat 3] [--datapath ebpf]
                                                      [--kernel-datapath iptables-nft]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkit import lab as labmod
from labkit import naming, nsexec
from labkit.experiments import core
from labkit.hostrouting import BpfHostRouting
from labkit.measure import loadgen
from labkit.measure.cpus import pin_current_thread, plan_cpus
from labkit.results import Run
from labkit.spec import parse_spec

TAG = f"{os.getpid() % 10000}"
PORT = 8080
CONFIGS = ("kernel", "bpf")
POSITIONS = {"same-node": "srv-s", "cross-node": "srv-r"}
HOST_PORT = 9180  # the baseline lkserver in n2's namespace


def lab_spec(name: str, datapath: str) -> dict:
    return {"name": name, "datapath": datapath, "policy_engine": "none",
            "nodes": [{"name": "n1", "pods": [{"name": "cli"}, {"name": "srv-s"}]},
                      {"name": "n2", "pods": [{"name": "srv-r"}]}]}


def row(config: str, position: str, rep: int, datapath: str) -> dict:
    return {"experiment": "bench-host-routing", "datapath": datapath, "mode": config, "services": 0,
            "position": position, "repeat": rep}


def points(labs: dict, metrics: list[str], repeats: int) -> list[core.LatencyPoint]:
    out = []
    for rep in range(1, repeats + 1):
        for metric in metrics:
            for config, lb in labs.items():
                for position, server in POSITIONS.items():
                    out.append(core.LatencyPoint(row(config, position, rep, lb.spec.datapath), metric,
                                                 lb.pod_netns("cli"),
                                                 lb.backend.pod_cgroup(lb.spec, "cli"),
                                                 str(lb.plan.pods[server].ip), PORT, lb, "cli"))
            bpf = labs["bpf"]
            out.append(core.LatencyPoint(row("host", "cross-node", rep, bpf.spec.datapath), metric,
                                         naming.netns_name(bpf.name, "n1"), None,
                                         str(bpf.plan.nodes["n2"].primary.ip), HOST_PORT))
    return out


def forwarded(lab: str) -> dict[str, int]:
    """``Ip: ForwDatagrams`` of each namespace of ``lab`` that forwards (nodes and the VPC router)."""
    out = {}
    for ns in ("n1", "n2", "vpc"):
        text = nsexec.run(["cat", "/proc/net/snmp"], naming.netns_name(lab, ns)).stdout
        head, values = [ln.split() for ln in text.splitlines() if ln.startswith("Ip:")][:2]
        out[ns] = int(values[head.index("ForwDatagrams")])
    return out


def server_cpus(lb) -> dict[str, str]:
    """Pod -> the CPUs its server processes may run on (Cpus_allowed_list)."""
    out = {}
    for node in lb.spec.nodes:
        for pod in node.pods:
            pids = (lb.backend.pod_cgroup(lb.spec, pod.name) / "cgroup.procs").read_text().split()
            allowed = set()
            for pid in pids:
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except FileNotFoundError:
                    continue
                allowed |= {ln.split()[-1] for ln in status.splitlines() if ln.startswith("Cpus_allowed_list")}
            out[pod.name] = ",".join(sorted(allowed))
    return out


def summarise(run: Run, metrics: list[str]) -> list[dict]:
    df = run.points()
    p50 = {}
    for (config, position, metric), grp in df.groupby(["mode", "position", "metric"]):
        p50[config, position, metric] = (statistics.median(grp["p50_us"]), sorted(grp["p50_us"]),
                                         int(grp["errors"].fillna(0).sum()))
    rows = []
    for position in POSITIONS:
        for metric in metrics:
            kernel, bpf = p50[("kernel", position, metric)], p50[("bpf", position, metric)]
            host = p50.get(("host", position, metric))
            rows.append({"position": position, "metric": metric, "kernel": kernel, "bpf": bpf, "host": host})
    return rows


def report(rows: list[dict]) -> None:
    print(f"{'position':<11} {'metric':<6} {'kernel p50':>10} {'bpf p50':>9} {'bpf/kernel':>10} "
          f"{'host p50':>9} {'bpf/host':>9}   repeats (kernel | bpf | host), errors")
    for r in rows:
        k, b, h = r["kernel"][0], r["bpf"][0], r["host"][0] if r["host"] else None
        reps = " | ".join(", ".join(f"{v:.1f}" for v in x[1]) for x in (r["kernel"], r["bpf"], r["host"]) if x)
        errors = sum(x[2] for x in (r["kernel"], r["bpf"], r["host"]) if x)
        print(f"{r['position']:<11} {r['metric']:<6} {k:>10.1f} {b:>9.1f} {b / k:>10.3f} "
              f"{(f'{h:.1f}' if h else '-'):>9} {(f'{b / h:.3f}' if h else '-'):>9}   {reps}, {errors}")
    cross = {r["metric"]: r for r in rows if r["position"] == "cross-node"}
    goals = []
    if "rr" in cross:
        r = cross["rr"]
        goals.append(("cross-node TCP_RR p50 >= 10 % lower with bpf", 1 - r["bpf"][0] / r["kernel"][0], 0.10))
        goals.append(("cross-node TCP_RR p50 within 10 % of the host network", r["bpf"][0] / r["host"][0] - 1, None))
    if "crr" in cross:
        r = cross["crr"]
        goals.append(("cross-node TCP_CRR p50 >= 5 % lower with bpf", 1 - r["bpf"][0] / r["kernel"][0], 0.05))
    for what, value, floor in goals:
        met = value >= floor if floor is not None else value <= 0.10
        sign = "lower" if floor is not None else "above host"
        print(f"goal: {what}: {100 * value:+.1f} % {sign} -> {'met' if met else 'NOT met'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=2000, help="per point and repeat")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--burst", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--metrics", default="rr,crr")
    ap.add_argument("--datapath", default="ebpf", help="Service datapath of the labs (none, ebpf, ebpf-tc)")
    ap.add_argument("--kernel-datapath", help="Service datapath of the kernel lab (default: --datapath)")
    ap.add_argument("--results", type=Path, help="keep the run (raw samples, points.csv) under this folder")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_host_routing: needs root (builds two labs)", file=sys.stderr)
        return 2
    metrics = args.metrics.split(",")
    BpfHostRouting.preflight(args.datapath)
    cpus = plan_cpus()
    if not cpus.pinned:
        print(f"warning: {cpus.warning}", file=sys.stderr)
    # Pinned before the labs exist, as labkit's experiments do (core.execute): a lab built from an
    # unpinned process runs its pods' servers where the builder ran (off_the_load_cpus: the
    # orchestration CPU), while the clients and the host-network server sit on the load CPU. Every
    # pod round trip then crossed CPUs (waking an idle vCPU: ~40 us here) and the host network's did
    # not: that, not the network path, was the 3.9-4.9x between pods and the host network.
    pin_current_thread(cpus.orchestration_cpus)
    names = {config: f"lkbh{TAG}{config[0]}" for config in CONFIGS}
    labs: dict = {}
    host_server = None
    hrs: list[BpfHostRouting] = []
    tmp = tempfile.TemporaryDirectory(prefix="lkbh-") if args.results is None else None
    try:
        datapaths = {"kernel": args.kernel_datapath or args.datapath, "bpf": args.datapath}
        for config, name in names.items():
            labmod.down(name)
            labs[config] = labmod.up(parse_spec(lab_spec(name, datapaths[config])), progress=False)
        bpf = labs["bpf"]
        for node in ("n1", "n2"):
            ctx = bpf.backend.node_context(bpf.spec, node, bpf.plan)
            hrs.append(BpfHostRouting(ctx))
            print(f"host routing on {bpf.name}/{node}: {hrs[-1].sync()}")
        host_server = loadgen.start_server(naming.netns_name(bpf.name, "n2"), "host-n2", HOST_PORT,
                                           cpus=cpus.load_cpus if cpus.pinned else None)
        run = Run.create("bench-host-routing", vars(args) | {"results": str(args.results)},
                         root=Path(tmp.name) if tmp else args.results)
        ctx = core.RunContext(run, args, cpus, set(), progress=False)
        pts = points(labs, metrics, args.repeat)
        print("pod servers' CPUs:", {config: server_cpus(lb) for config, lb in labs.items()},
              f"load CPUs {list(cpus.load_cpus)}")
        print(f"{len(pts)} points x {args.samples} samples, interleaved (run {run.path})", flush=True)
        before = {config: forwarded(lb.name) for config, lb in labs.items()}
        core.measure_interleaved(ctx, pts, args.samples, args.warmup, burst=args.burst,
                                 rng=random.Random(args.seed))
        run.finish("complete")
        forwards = {config: {ns: n - before[config][ns] for ns, n in forwarded(lb.name).items()}
                    for config, lb in labs.items()}
        stats = {f"{bpf.name}/{hr.ctx.node}": hr.stats() for hr in hrs}
        report(summarise(run, metrics))
        print("host routing counters:", stats)
        print("datagrams forwarded by each namespace's IP stack during the measurement:",
              "; ".join(f"{config} lab: " + ", ".join(f"{ns} {n}" for ns, n in f.items())
                        for config, f in forwards.items()))
    finally:
        if host_server is not None:
            loadgen.stop_server(host_server)
        for hr in hrs:
            hr.cleanup()
        for name in names.values():
            labmod.down(name)
        if tmp:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
