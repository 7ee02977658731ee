"""labkit's agent on a remote machine: ``python3 -m labkit.remote.agent <verb>``, run as root there.

The machine is a whole node of a lab (a Vagrant VM, or a host): labkit's package, pyroute2 and the
native helpers are copied into ``/opt/labkit`` (:mod:`labkit.remote.payload`) and this module is
called over ssh (:mod:`labkit.remote.node`). It builds and runs the node with the node runtime
(:mod:`labkit.node`), exactly as the ``netns`` backend does in-process; the node's namespace is the
machine's own, pods are named namespaces inside it.

Verbs (each prints one JSON object on stdout, except ``pod-exec`` and ``serve``):
- ``build-node --spec S --node N --nics eth0=MAC,eni1=MAC… [--vm | --host]``: name the VPC NICs by MAC (any
  other NIC, such as the management one, is never touched), wire the node and its pods, start the
  in-pod servers, program the Service datapath. ``--vm``: the machine is a VM labkit made and will
  destroy, so its hostname and machine-wide ARP sysctls may be set; ``--host``: a machine labkit did not
  make, recorded first so that ``host-down`` restores it. Returns the kernel, the node's
  cgroup folder, timings and the datapath's sync result.
- ``sync --spec S --node N``: program the datapath again (a changed service table).
- ``pod-exec --lab L --node N --pod P -- ARGV…``: run ARGV in the pod's namespace and cgroup with the
  caller's stdin/stdout/stderr; exits with its code.
- ``serve --spec S --node N``: drive Service datapaths of this node from the host, one JSON request
  per line on stdin, one JSON reply per line on stdout (see :func:`serve`; the host side is
  :class:`labkit.remote.node.RemoteDatapath`). Lives until stdin closes, so that a datapath's state
  between syncs (the table applied, the eBPF service ids) persists as in one process.
- ``host-down --lab L``: restore a host from lab L's record (:mod:`.hostjournal`): the ``hosts``
  backend's ``down``.
- ``info``: kernel, loaded modules of interest.

The spec arrives validated by the host (it is not validated again: imports cost seconds under TCG).
Everything the agent creates is journaled in ``/run/labkit/<lab>`` on the machine.
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

from .. import modes, naming, nsexec, topology
from ..errors import BackendError, LabkitError
from ..node import NodeRuntime, lab_cgroup
from ..spec import Spec, load_spec
from ..state import LabState
from .payload import RUN_DIR
from .wire import apply_changes, changes_from_json, table_from_json

# (pyroute2 and yaml imports cost seconds under TCG; `labkit exec` and `check` use lkexec directly)

BASE_MODULES = ("veth", "br_netfilter", "nf_conntrack", "ip_vs", "ip_vs_rr")  # kube-proxy's, every node
# A VM's NICs share one L2 segment with the VPC router: without these, every NIC answers ARP for every
# address of the VM and the router may send an ENI's traffic to eth0, past the ENI's ipvlan slaves.
VM_SYSCTLS = {"net.ipv4.conf.all.arp_ignore": 1, "net.ipv4.conf.all.arp_announce": 2,
              "net.ipv4.conf.default.arp_ignore": 1, "net.ipv4.conf.default.arp_announce": 2}


def kernel_modules() -> tuple[str, ...]:
    return BASE_MODULES + tuple(dict.fromkeys(k for m in modes.MODES for k in m.kernel_modules))


# ------------------------------------------------------------------ NICs

def _links() -> dict[str, str]:
    """MAC -> interface name of every link of the machine (of this network namespace)."""
    ipr = nsexec.iproute(None)
    try:
        return {(link.get_attr("IFLA_ADDRESS") or "").lower(): link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    finally:
        ipr.close()


def rename_nics(wanted: dict[str, str]) -> dict[str, str]:
    """Give the NICs with the MACs in ``wanted`` (name -> MAC) their lab names (eth0, eni1…), via
    temporary names so that swaps (eth1 -> eth0 while eth0 exists) cannot collide."""
    links = _links()
    ipr = nsexec.iproute(None)
    try:
        missing = [f"{n} ({m})" for n, m in wanted.items() if m.lower() not in links]
        if missing:
            raise BackendError(f"the machine has no NIC with the MAC of {', '.join(missing)}; NICs: {links}")
        for mac, cur in links.items():
            # another NIC (the management one) must not hold a lab name: labkit's box calls it mgmt0
            if cur in wanted and mac != wanted[cur].lower() and mac not in {m.lower() for m in wanted.values()}:
                raise BackendError(f"{cur} (MAC {mac}) is not a VPC NIC but has the name labkit needs; "
                                   "rename it (labkit's box calls its management NIC mgmt0)")
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


def host_modules(spec: Spec) -> tuple[str, ...]:
    """The modules a lab needs on a host labkit did not make: not ``br_netfilter`` unless a pod mode
    bridges (loading it sends every bridge of the host through iptables)."""
    wanted = [m for m in BASE_MODULES if m != "br_netfilter" or any(modes.get(x).bridge for x in spec.modes())]
    return tuple(dict.fromkeys([*wanted, *(k for m in spec.modes() for k in modes.get(m).kernel_modules)]))


def load_modules(wanted: tuple[str, ...] | None = None) -> list[str]:
    """Load the lab's kernel modules in one ``modprobe -a`` (each exec costs under TCG); returns
    those present afterwards (built-in ones without parameters have no /sys/module entry)."""
    wanted = wanted or kernel_modules()
    subprocess.run(["modprobe", "-a", "-q", *wanted], capture_output=True)
    return [m for m in wanted if Path(f"/sys/module/{m}").exists()]


# ------------------------------------------------------------------ build

def build_node(spec: Spec, node_name: str, nics: dict[str, str], servers: bool = True, vm: bool = False,
               host: bool = False) -> dict:
    """Build node ``node_name`` on this machine. ``vm``: a VM labkit made (hostname, machine-wide ARP
    sysctls). ``host``: a machine labkit did not make: its state is recorded first
    (:func:`labkit.remote.hostjournal.begin`) so that ``host-down`` restores it, only the lab NICs get
    ARP settings, and only the modules the lab needs are loaded."""
    t0 = time.monotonic()
    runtime = NodeRuntime(spec, node_name, whole_machine=True)
    if host:
        from . import hostjournal

        hostjournal.begin(spec.name, nics, spec.to_yaml())
    if vm:
        set_hostname(node_name)
    modules = load_modules(host_modules(spec) if host else None)
    if vm:
        nsexec.write_sysctls(None, VM_SYSCTLS)
    rename_nics(nics)
    if host:  # the lab NICs share an L2 segment (the VPC): each answers ARP only for its own addresses
        nsexec.write_sysctls(None, {f"net.ipv4.conf.{n}.{k}": v for n in nics
                                    for k, v in (("arp_ignore", 1), ("arp_announce", 2))})
    state = LabState(spec.name)
    if state.exists:
        raise BackendError(f"node {node_name} of lab {spec.name} is built already")
    state.create(spec)
    ns = topology.open_netns(None)
    try:
        runtime.build(ns, state.record)
    finally:
        ns.close()
    # after the wiring: Debian's default rp_filter=2 on NICs that existed at boot
    here = set(_links().values())
    nsexec.write_sysctls(None, {f"net.ipv4.conf.{n}.rp_filter": 0 for n in nics if n in here})
    t_wire = time.monotonic() - t0
    if servers:
        runtime.start_servers(state, timeout=60)  # TCG: a first exec can take seconds
    t_servers = time.monotonic() - t0 - t_wire
    sync = _sync_result(runtime.sync_datapath())
    runtime.sync_policies()
    runtime.sync_host_routing()
    state.write_meta(status="ready", ready=time.time())
    state.close()
    return {"node": node_name, "kernel": platform.release(), "modules": modules, "cgroup": str(runtime.cgroup),
            "pods": {p.name: str(runtime.plan.pods[p.name].ip) for p in runtime.node.pods}, "datapath": sync,
            "seconds": {"wire": round(t_wire, 2), "servers": round(t_servers, 2),
                        "total": round(time.monotonic() - t0, 2)}}


def _sync_result(res) -> dict:
    if res is None:
        return {"datapath": "none"}
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(res).items()}


def sync_datapath(spec: Spec, node_name: str) -> dict:
    return _sync_result(NodeRuntime(spec, node_name, whole_machine=True).sync_datapath())


# ------------------------------------------------------------------ datapaths driven from the host

def serve(spec: Spec, node_name: str, requests, replies) -> int:
    """Answer datapath requests until ``requests`` ends. A request is
    ``{"op": "sync", "datapath": NAME, "table": [...]}`` (a whole table) or ``{..., "changes": {...}}``
    (a change set from the table this process applied last), ``{"op": "cleanup" | "describe" |
    "chain_order", ...}``, ``{"op": "walk", "key": ...}``; every request carries the datapath's
    constructor ``options`` (used when the datapath object is made);
    the reply ``{"result": ...}`` (for sync the :class:`SyncResult` fields) or ``{"error": "..."}``."""
    runtime = NodeRuntime(spec, node_name, whole_machine=True)
    paths = {}
    for line in requests:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            name = req["datapath"]
            if name not in paths:
                paths[name] = runtime.datapath(name, **req.get("options", {}))
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
            elif req["op"] == "chain_order":
                reply = {"result": dp.chain_order()}
            elif req["op"] == "walk":
                reply = {"result": dp.walk(req["key"])}
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
    proc = nsexec.spawn(argv, naming.netns_name(lab, pod), cgroup=lab_cgroup(lab) / node / pod, stdin=None,
                        stdout=None, stderr=None)
    return proc.wait()


# ------------------------------------------------------------------ CLI

def _nics(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, text.split(",")):
        name, _, mac = item.partition("=")
        out[name] = mac
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m labkit.remote.agent")
    sub = p.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("build-node")
    b.add_argument("--spec", required=True)
    b.add_argument("--node", required=True)
    b.add_argument("--nics", required=True)
    b.add_argument("--no-servers", action="store_true")
    b.add_argument("--vm", action="store_true", help="a VM labkit made: hostname and machine-wide sysctls may change")
    b.add_argument("--host", action="store_true", help="a host labkit did not make: record it first (host-down)")
    d = sub.add_parser("host-down")
    d.add_argument("--lab", required=True)
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
            return serve(load_spec(Path(args.spec), validate=False), args.node, sys.stdin, replies)
        if args.verb == "build-node":
            out = build_node(load_spec(Path(args.spec), validate=False), args.node, _nics(args.nics),
                             servers=not args.no_servers, vm=args.vm, host=args.host)
        elif args.verb == "host-down":
            from . import hostjournal

            out = hostjournal.restore(naming.check_lab_name(args.lab))
        elif args.verb == "sync":
            out = sync_datapath(load_spec(Path(args.spec), validate=False), args.node)
        else:
            out = {"kernel": platform.release(), "modules": load_modules()}
    except Exception as exc:  # noqa: BLE001 - one JSON error line for the host, the trace in the log
        log = _log_trace(args)
        msg = str(exc) if isinstance(exc, LabkitError) else f"{type(exc).__name__}: {exc}"
        print(json.dumps({"error": msg, "log": str(log) if log else ""}))
        return 2
    print(json.dumps(out))
    return 0


def _log_trace(args) -> Path | None:
    """The current exception's full traceback, appended to the lab's agent log on this machine."""
    import traceback

    lab = getattr(args, "lab", None)
    if lab is None and getattr(args, "spec", None):
        try:
            lab = load_spec(Path(args.spec), validate=False).name
        except Exception:  # noqa: BLE001 - the spec itself may be what failed
            lab = None
    # a lab's own folder only when it exists: an agent refused before it built anything (a host
    # holding another lab) must not leave a folder of that lab behind
    folder = LabState(lab).dir / "logs" if lab and LabState(lab).dir.exists() else Path(RUN_DIR)
    path = folder / "agent.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} agent {args.verb}\n{traceback.format_exc()}\n")
        return path
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
