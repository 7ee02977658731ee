"""The in-VM agent of the ``vagrant`` backend: ``python3 -m labkit.agent <verb>``, run as root in a VM.

On the vagrant backend every node is a VM and labkit itself runs inside it: the host copies labkit's
package, pyroute2 and the prebuilt native helpers into ``/opt/labkit`` (see
:mod:`labkit.backends.vagrant`) and calls this module over ssh. It builds the node's part of the lab
with the very same :class:`~labkit.topology.NodeWiring` and datapath classes as the ``netns``
backend; the node's namespace is the VM's own (``Netns(None)``), pods are named namespaces inside it.

Verbs (each prints one JSON object on stdout, except ``pod-exec``):
- ``build-node --spec S --node N --nics eth0=MAC,eni1=MAC…``: name the VPC NICs by MAC (the first,
  management NIC is ``mgmt0`` and is never touched), wire the node and its pods, start the in-pod
  servers, program the Service datapath. Returns the kernel, timings and the datapath's sync result.
- ``sync --spec S --node N``: program the datapath again (a changed service table).
- ``pod-exec --lab L --node N --pod P -- ARGV…``: run ARGV in the pod's namespace and cgroup with the
  caller's stdin/stdout/stderr (``labkit exec`` and ``labkit check``'s probes); exits with its code.
- ``serve --spec S --node N``: drive Service datapaths of this node from the host, one JSON request
  per line on stdin, one JSON reply per line on stdout (see :func:`serve`); the host side is
  :class:`labkit.backends.vagrant.RemoteDatapath`. Lives until stdin closes, so that a datapath's
  state between syncs (the table applied, the eBPF service ids) persists as in one process.
- ``info``: kernel, loaded modules of interest.

Everything the agent creates lives inside the VM, which ``labkit down`` destroys whole; the journal
in ``/run/labkit/<lab>`` inside the VM is kept only for inspection.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from . import addressing, nsexec, topology
from .datapath import NodeContext, PodIface
from .datapath import get as get_datapath
from .errors import BackendError, LabkitError
from .services import Endpoint, ServicePort, ServiceTable, TableDiff, table_from_spec
from .spec import Spec, load_spec
from .state import LabState

# (pyroute2 and yaml imports cost seconds under TCG; `labkit exec` and `check` use lkexec directly)

SERVER_PORT = 8080
MODULES = ("ipvlan", "ip_vs", "ip_vs_rr", "br_netfilter", "vxlan", "macvlan", "veth", "nf_conntrack")
# VM NICs share one L2 segment with the VPC router: without these, every NIC answers ARP for every
# address of the VM and the router may send an ENI's traffic to eth0, past the ENI's ipvlan slaves.
VM_SYSCTLS = {"net.ipv4.conf.all.arp_ignore": 1, "net.ipv4.conf.all.arp_announce": 2,
              "net.ipv4.conf.default.arp_ignore": 1, "net.ipv4.conf.default.arp_announce": 2}


def netns_name(lab: str, obj: str) -> str:
    return f"lk-{lab}.{obj}"


def cgroup_dir(lab: str) -> Path:
    root = nsexec.cgroup2_root()
    if root is None:
        raise BackendError("no cgroup v2 hierarchy in the VM")
    return root / f"lk-{lab}"


def node_context(spec: Spec, node_name: str, plan: addressing.AddressPlan) -> NodeContext:
    """The datapath's view of this VM: ``netns`` None (the VM's own namespace)."""
    node = next(n for n in spec.nodes if n.name == node_name)
    pods = []
    for pod in node.pods:
        pp = plan.pods[pod.name]
        host = "" if pod.mode in ("eni-ipvlan", "macvlan") else f"lx-{pod.name}"
        pods.append(PodIface(pod.name, host, netns_name(spec.name, pod.name), str(pp.ip), pod.mode))
    return NodeContext(lab=spec.name, prefix=spec.prefix, node=node.name, netns=None, pod_cidr=spec.pod_cidr,
                       service_cidr=spec.service_cidr, state_dir=LabState(spec.name).dir / "nodes" / node.name,
                       cgroup=cgroup_dir(spec.name) / node.name, pods=tuple(pods),
                       node_ip=str(plan.nodes[node.name].primary.ip))


# ------------------------------------------------------------------ NICs

def _links() -> dict[str, str]:
    """MAC -> interface name of every link of the VM."""
    out = {}
    for d in Path("/sys/class/net").iterdir():
        try:
            out[(d / "address").read_text().strip().lower()] = d.name
        except OSError:
            pass
    return out


def rename_nics(wanted: dict[str, str]) -> dict[str, str]:
    """Give the NICs with the MACs in ``wanted`` (name -> MAC) their lab names (eth0, eni1…), via
    temporary names so that swaps (eth1 -> eth0 while eth0 exists) cannot collide."""
    links = _links()
    ipr = nsexec.iproute(None)
    try:
        missing = [f"{n} ({m})" for n, m in wanted.items() if m.lower() not in links]
        if missing:
            raise BackendError(f"the VM has no NIC with the MAC of {', '.join(missing)}; NICs: {links}")
        for mac, cur in links.items():
            # the management NIC must not hold a lab name: the box renames it to mgmt0 at boot
            if cur in wanted and mac != wanted[cur].lower() and mac not in {m.lower() for m in wanted.values()}:
                raise BackendError(f"{cur} (MAC {mac}) is not a VPC NIC but has the name labkit needs; "
                                   "use labkit's box (its management NIC is mgmt0)")
        temp = {}
        for k, (name, mac) in enumerate(wanted.items()):
            cur = links[mac.lower()]
            if cur == name:
                continue
            idx = ipr.link_lookup(ifname=cur)[0]
            ipr.link("set", index=idx, state="down")
            ipr.link("set", index=idx, ifname=f"lktmp{k}")
            temp[name] = idx
        for name, idx in temp.items():
            ipr.link("set", index=idx, ifname=name)
    finally:
        ipr.close()
    return {name: mac for name, mac in wanted.items()}


def set_hostname(name: str) -> None:
    """The node's name as the VM's hostname, resolvable (sudo looks it up on every call)."""
    subprocess.run(["hostname", name], check=False)
    Path("/etc/hostname").write_text(name + "\n")
    hosts = [ln for ln in Path("/etc/hosts").read_text().splitlines() if not ln.startswith("127.0.1.1")]
    Path("/etc/hosts").write_text("\n".join([*hosts, f"127.0.1.1 {name}"]) + "\n")


def load_modules() -> list[str]:
    """Load the lab's kernel modules in one ``modprobe -a`` (each exec costs under TCG); returns
    those present afterwards (built-in ones without parameters have no /sys/module entry)."""
    subprocess.run(["modprobe", "-a", "-q", *MODULES], capture_output=True)
    return [m for m in MODULES if Path(f"/sys/module/{m}").exists()]


# ------------------------------------------------------------------ build

def build_node(spec: Spec, node_name: str, nics: dict[str, str], servers: bool = True) -> dict:
    t0 = time.monotonic()
    node = next((n for n in spec.nodes if n.name == node_name), None)
    if node is None:
        raise BackendError(f"no node {node_name!r} in lab {spec.name!r}")
    plan = addressing.plan(spec)
    set_hostname(node_name)
    modules = load_modules()
    nsexec.write_sysctls(None, VM_SYSCTLS)
    rename_nics(nics)
    state = LabState(spec.name)
    if state.exists:
        raise BackendError(f"node {node_name} of lab {spec.name} is built already")
    state.create(spec)
    cg = cgroup_dir(spec.name)
    for pod in node.pods:
        (cg / node.name / pod.name).mkdir(parents=True, exist_ok=True)
    ns = topology.open_netns(None)
    try:
        wiring = topology.NodeWiring(spec, plan, node, ns, lambda pod: netns_name(spec.name, pod), state.record)
        wiring.setup_node()
        # after NodeWiring: Debian's default rp_filter=2 on NICs that existed at boot
        nsexec.write_sysctls(None, {f"net.ipv4.conf.{n}.rp_filter": 0 for n in nics if n in os.listdir("/sys/class/net")})
        for pod in node.pods:
            wiring.add_pod(pod)
    finally:
        ns.close()
    t_wire = time.monotonic() - t0
    if servers:
        start_servers(spec, node, state)
    t_servers = time.monotonic() - t0 - t_wire
    sync = sync_datapath(spec, node_name, plan)
    state.write_meta(status="ready", ready=time.time())
    state.close()
    return {"node": node_name, "kernel": platform.release(), "modules": modules,
            "pods": {p.name: str(plan.pods[p.name].ip) for p in node.pods}, "datapath": sync,
            "seconds": {"wire": round(t_wire, 2), "servers": round(t_servers, 2),
                        "total": round(time.monotonic() - t0, 2)}}


def start_servers(spec: Spec, node, state: LabState) -> None:
    from .native import binary

    exe = str(binary("lkserver"))
    logs = state.dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ports = ",".join(str(p) for p in sorted({SERVER_PORT} | {s.target_port for s in spec.services}))
    pending = {}
    for pod in node.pods:
        with open(logs / f"{pod.name}.log", "w") as log:
            proc = nsexec.spawn([exe, "--name", pod.name, "--ports", ports], netns_name(spec.name, pod.name),
                                cgroup=cgroup_dir(spec.name) / node.name / pod.name, stdout=log, stderr=log,
                                detach=True)
        state.record("process", pid=proc.pid, pod=pod.name)
        pending[pod.name] = proc
    deadline = time.monotonic() + 60  # TCG: a first exec can take seconds
    for name, proc in pending.items():
        log = logs / f"{name}.log"
        while not log.read_text().startswith("ready"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BackendError(f"in-pod server of {name} did not start: {log.read_text().strip()[-500:]}")
            time.sleep(0.02)


def sync_datapath(spec: Spec, node_name: str, plan: addressing.AddressPlan | None = None) -> dict:
    plan = plan or addressing.plan(spec)
    if spec.datapath == "none":
        return {"datapath": "none"}
    ctx = node_context(spec, node_name, plan)
    ctx.state_dir.mkdir(parents=True, exist_ok=True)
    res = get_datapath(spec.datapath)(ctx).sync(table_from_spec(spec, plan))
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(res).items()}


# ------------------------------------------------------------------ datapaths driven from the host

def _port_to_json(sp: ServicePort) -> list:
    return [sp.namespace, sp.name, sp.port_name, sp.protocol, sp.cluster_ip, sp.port,
            [[e.ip, e.port, e.pod, e.node] for e in sp.endpoints]]


def _port_from_json(v: list) -> ServicePort:
    return ServicePort(*v[:6], tuple(Endpoint(*e) for e in v[6]))


def table_to_json(table: ServiceTable) -> list:
    """A service table as compact JSON (install order kept)."""
    return [_port_to_json(sp) for sp in table]


def table_from_json(rows: list) -> ServiceTable:
    return ServiceTable.of(_port_from_json(r) for r in rows)


def changes_to_json(changes: TableDiff) -> dict:
    return {"added": [_port_to_json(sp) for sp in changes.added],
            "removed": [_port_to_json(sp) for sp in changes.removed],
            "changed": [[_port_to_json(a), _port_to_json(b)] for a, b in changes.changed], "full": changes.full}


def changes_from_json(d: dict) -> TableDiff:
    return TableDiff(tuple(_port_from_json(r) for r in d["added"]), tuple(_port_from_json(r) for r in d["removed"]),
                     tuple((_port_from_json(a), _port_from_json(b)) for a, b in d["changed"]), d["full"])


def apply_changes(table: ServiceTable, changes: TableDiff) -> ServiceTable:
    """The table ``changes`` lead to from ``table`` (what the host's desired table is)."""
    return table.without(*(sp.key for sp in changes.removed)).with_ports(
        *changes.added, *(new for _, new in changes.changed))


def serve(spec: Spec, node_name: str, requests, replies) -> int:
    """Answer datapath requests until ``requests`` ends. A request is
    ``{"op": "sync", "datapath": NAME, "table": [...]}`` (a whole table) or ``{..., "changes": {...}}``
    (a change set from the table this process applied last), ``{"op": "cleanup" | "describe", ...}``;
    the reply ``{"result": ...}`` (for sync the :class:`SyncResult` fields) or ``{"error": "..."}``."""
    plan = addressing.plan(spec)
    paths = {}
    for line in requests:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            name = req["datapath"]
            if name not in paths:
                ctx = node_context(spec, node_name, plan)
                ctx.state_dir.mkdir(parents=True, exist_ok=True)
                paths[name] = get_datapath(name)(ctx)
            dp = paths[name]
            if req["op"] == "sync":
                if "table" in req:
                    res = dp.sync(table_from_json(req["table"]))
                else:
                    if dp.applied is None:
                        raise BackendError("a change set needs a table applied first by this agent")
                    changes = changes_from_json(req["changes"])
                    res = dp.sync_changes(apply_changes(dp.applied, changes), changes)
                reply = {"result": vars(res)}
            elif req["op"] == "cleanup":
                dp.cleanup()
                reply = {"result": {}}
            elif req["op"] == "describe":
                reply = {"result": dp.describe()}
            else:
                raise BackendError(f"unknown op {req['op']!r}")
        except (LabkitError, OSError, subprocess.CalledProcessError, KeyError, ValueError) as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply, default=str) + "\n")
        replies.flush()
    return 0


def pod_exec(lab: str, node: str, pod: str, argv: list[str]) -> int:
    if argv and argv[0] == "python3":
        argv = [sys.executable, *argv[1:]]
    proc = nsexec.spawn(argv, netns_name(lab, pod), cgroup=cgroup_dir(lab) / node / pod, stdin=None, stdout=None,
                        stderr=None)
    return proc.wait()


# ------------------------------------------------------------------ CLI

def _nics(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, text.split(",")):
        name, _, mac = item.partition("=")
        out[name] = mac
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m labkit.agent")
    sub = p.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("build-node")
    b.add_argument("--spec", required=True)
    b.add_argument("--node", required=True)
    b.add_argument("--nics", required=True)
    b.add_argument("--no-servers", action="store_true")
    s = sub.add_parser("sync")
    s.add_argument("--spec", required=True)
    s.add_argument("--node", required=True)
    v = sub.add_parser("serve")
    v.add_argument("--spec", required=True)
    v.add_argument("--node", required=True)
    e = sub.add_parser("pod-exec")
    e.add_argument("--lab", required=True)
    e.add_argument("--node", required=True)
    e.add_argument("--pod", required=True)
    e.add_argument("cmd", nargs=argparse.REMAINDER)
    sub.add_parser("info")
    args = p.parse_args(argv)
    try:
        if args.verb == "pod-exec":
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            return pod_exec(args.lab, args.node, args.pod, cmd)
        if args.verb == "serve":
            # replies own stdout; anything else a library prints goes to stderr
            replies = os.fdopen(os.dup(1), "w")
            os.dup2(2, 1)
            return serve(load_spec(Path(args.spec)), args.node, sys.stdin, replies)
        if args.verb == "build-node":
            out = build_node(load_spec(Path(args.spec)), args.node, _nics(args.nics), servers=not args.no_servers)
        elif args.verb == "sync":
            out = sync_datapath(load_spec(Path(args.spec)), args.node)
        else:
            out = {"kernel": platform.release(), "modules": load_modules()}
    except (LabkitError, OSError, subprocess.CalledProcessError) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
