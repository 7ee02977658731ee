"""The ``netns`` backend: a whole lab as network namespaces on this host.

Objects and names (``P`` = ``lk-<lab>``, the lab's prefix):
- ``P.vpc``: the VPC's virtual router. Every node NIC (primary ``eth0``, ENIs ``eni<k>``) is a veth
  whose other end ``<node>-e<k>`` sits here. It routes /32s to NICs and ENI secondary addresses, node
  pod subnets to node primaries (the cloud route table), answers ARP for the VPC (proxy ARP) and owns
  the VPC gateway address, as a cloud VPC's vSwitch/vRouter does.
- ``P.<node>``: a node; ``P.<pod>``: a pod. Wiring inside nodes is :mod:`labkit.topology`.
- cgroup v2 folder ``P/<node>/<pod>`` holding each pod's processes (the in-pod server and anything
  ``labkit exec`` starts), so that socket-level eBPF hooks apply to exactly the lab's processes.
- state in ``/run/labkit/<lab>`` (:mod:`labkit.state`).

Nothing is created in the host's namespace and no host sysctl, rule or route changes: the only host
objects are the namespace mount points in ``/run/netns`` and the cgroup folder. Every object is
journaled before it is created; :meth:`NetnsBackend.down` removes journaled objects and everything
found by the prefix, in reverse order, and is safe to run twice or after a SIGKILL of the builder.
"""

from __future__ import annotations

import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from .. import addressing, doctor, modes, naming, nsexec, topology
from ..datapath import NodeContext
from ..datapath import get as get_datapath
from ..node import NodeRuntime, lab_cgroup
from ..spec import Spec
from ..state import LabState
from . import BACKENDS
from .base import Backend


@BACKENDS.register
class NetnsBackend(Backend):
    name = "netns"

    # ------------------------------------------------------------ names
    def node(self, spec: Spec, node: str, plan: addressing.AddressPlan | None = None) -> NodeRuntime:
        return NodeRuntime(spec, node, plan)

    def pod_netns(self, spec: Spec, pod: str) -> str:
        spec.pod(pod)  # KeyError with the list of pods if unknown
        return naming.netns_name(spec.name, pod)

    def pod_cgroup(self, spec: Spec, pod: str) -> Path:
        node, _ = spec.pod(pod)
        return lab_cgroup(spec.name) / node.name / pod

    # ------------------------------------------------------------ preflight
    def preflight(self, spec: Spec) -> None:
        """Fail before creating anything if the kernel lacks what the spec needs."""
        for feature in ("root", "netns", "veth", "cgroup2"):
            doctor.require(feature, "the netns backend")
        for mode in sorted(spec.modes()):
            for feature in modes.get(mode).features:
                doctor.require(feature, f"pod mode {mode}")
        get_datapath(spec.datapath).preflight()
        if spec.host_routing == "bpf":
            from ..hostrouting import BpfHostRouting

            BpfHostRouting.preflight(spec.datapath, spec.policy_engine if spec.policies else "none")
        if spec.policies and spec.policy_engine != "none":
            from ..policy import get as get_policy_engine

            get_policy_engine(spec.policy_engine).preflight(spec.datapath)

    # ------------------------------------------------------------ up
    def up(self, spec: Spec, progress: bool = True, start_servers: bool = True) -> LabState:
        self.preflight(spec)
        state = LabState(spec.name)
        state.create(spec)
        try:
            self._build(spec, state, progress, start_servers)
        except BaseException:
            self.down(spec.name)
            raise
        state.write_meta(status="ready", ready=time.time())
        state.close()
        return state

    def _build(self, spec: Spec, state: LabState, progress: bool, start_servers: bool) -> None:
        plan = addressing.plan(spec)
        record = state.record
        record("cgroup", path=str(lab_cgroup(spec.name)))
        runtimes = [self.node(spec, node.name, plan) for node in spec.nodes]
        n_pods = len(spec.pods())
        bar = tqdm(total=len(spec.nodes) + n_pods + (n_pods if start_servers else 0), desc=f"up {spec.name}",
                   unit="obj", disable=not progress, leave=False)
        router = topology.create_netns(naming.netns_name(spec.name, "vpc"), record)
        nodes: dict[str, topology.Netns] = {}
        try:
            router.sysctl({"net.ipv4.ip_forward": 1, "net.ipv4.conf.all.send_redirects": 0,
                           "net.ipv4.conf.default.send_redirects": 0})
            router.addr("lo", plan.vpc_gateway, 32)
            for rt in runtimes:
                nodes[rt.node.name] = ns = topology.create_netns(rt.netns, record)
                for nic in plan.nodes[rt.node.name].nics:
                    router.ipr.link("add", ifname=nic.router_ifname, kind="veth",
                                    peer={"ifname": nic.ifname, "net_ns_fd": ns.name})
                    router.up(nic.router_ifname)
                    router.sysctl({f"net.ipv4.conf.{nic.router_ifname}.proxy_arp": 1})
            for dst, via in topology.vpc_routes(plan):
                kw = {"oif": router.index(via["dev"])}
                if "gateway" in via:
                    kw["gateway"] = via["gateway"]
                else:
                    kw["scope"] = topology.RT_SCOPE_LINK
                router.route(dst, **kw)
            for rt in runtimes:
                rt.build(nodes[rt.node.name], record)
                bar.update(1 + len(rt.node.pods))
        finally:
            router.close()
            for ns in nodes.values():
                ns.close()
        if start_servers:
            cpus = server_cpus()
            for rt in runtimes:
                rt.start_servers(state, cpus)
                bar.update(len(rt.node.pods))
        for rt in runtimes:
            rt.sync_datapath()
        for rt in runtimes:
            rt.sync_policies()
        for rt in runtimes:
            rt.sync_host_routing()
        bar.close()

    # ------------------------------------------------------------ pods
    def pod_run(self, spec: Spec, pod: str, argv: Sequence[str], input=None, check: bool = True,
                timeout: float | None = 300, text: bool = True, cpus=None) -> subprocess.CompletedProcess:
        return nsexec.run(argv, self.pod_netns(spec, pod), cgroup=self.pod_cgroup(spec, pod), input=input,
                          check=check, timeout=timeout, text=text, cpus=cpus)

    def pod_spawn(self, spec: Spec, pod: str, argv: Sequence[str], **popen) -> subprocess.Popen:
        return nsexec.spawn(argv, self.pod_netns(spec, pod), cgroup=self.pod_cgroup(spec, pod), **popen)

    # ------------------------------------------------------------ datapaths, measurement
    def node_context(self, spec: Spec, node_name: str, plan: addressing.AddressPlan | None = None) -> NodeContext:
        return self.node(spec, node_name, plan).context()

    def datapath(self, spec: Spec, node: str, name: str, plan: addressing.AddressPlan | None = None, **options):
        """Datapath ``name`` of ``node``, an object of this process (its state folder made)."""
        return self.node(spec, node, plan).datapath(name, **options)

    def client_session(self, spec: Spec, pod: str, cpus=None):
        """:class:`labkit.measure.loadgen.ClientSession` in the pod's namespace and cgroup."""
        from ..measure import loadgen

        return loadgen.ClientSession(self.pod_netns(spec, pod), self.pod_cgroup(spec, pod), cpus)

    def kernels(self, spec: Spec) -> dict[str, str]:
        return {node.name: platform.release() for node in spec.nodes}

    # ------------------------------------------------------------ down
    def down(self, name: str) -> dict[str, int]:
        """Remove lab ``name``: processes, mounts, namespaces, cgroups, state. Returns counts."""
        state = LabState(name)
        prefix = naming.netns_name(name, "")
        journal = list(state.objects())
        names = {o["name"] for o in journal if o.get("kind") == "netns"}
        names |= set(nsexec.list_netns(prefix))
        names = {n for n in names if n.startswith(prefix)}  # never another lab's
        counts = {"processes": 0, "mounts": 0, "netns": 0, "cgroups": 0}
        # 1. processes: the lab's cgroup, journaled pids, and anything still inside its namespaces
        cgdir = lab_cgroup(name) if nsexec.cgroup2_root() else None
        if cgdir and cgdir.exists():
            counts["processes"] += sum(len(p.read_text().split()) for p in cgdir.rglob("cgroup.procs"))
            nsexec.kill_cgroup(cgdir)
        counts["processes"] += nsexec.kill_in_netns(names)
        # 2. mounts under the lab's state folder (bpffs instances of eBPF datapaths)
        for mnt in nsexec.mounts_under(state.dir):
            counts["mounts"] += nsexec.unmount(mnt)
        # 3. namespaces, pods before nodes before the router
        for ns in sorted(names, key=lambda n: (n.endswith(".vpc"), n), reverse=False):
            if nsexec.remove_netns(ns):
                counts["netns"] += 1
        # 4. cgroups (after their processes are gone)
        if cgdir and nsexec.remove_cgroup(cgdir):
            counts["cgroups"] += 1
        state.remove()
        return counts


def server_cpus() -> list[int] | None:
    """CPUs for in-pod servers: the load CPUs of the measurement plan (the client's too), so that a
    request and its reply never cross CPUs; no pinning when the machine has a single CPU."""
    from ..measure.cpus import plan_cpus

    plan = plan_cpus()
    return list(plan.load_cpus) if plan.pinned else None
