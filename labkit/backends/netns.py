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

import os
import platform
import signal
import time
from pathlib import Path

from tqdm.auto import tqdm

from .. import addressing, doctor, nsexec, topology
from ..datapath import NodeContext
from ..datapath import get as get_datapath
from ..errors import BackendError
from ..services import table_from_spec
from ..spec import Spec
from ..state import LabState

MODE_FEATURES = {"eni-ipvlan": ("ipvlan",), "macvlan": ("macvlan",), "overlay": ("vxlan", "bridge"),
                 "bridge": ("bridge",)}
SERVER_PORT = 8080


class NetnsBackend:
    name = "netns"

    # ------------------------------------------------------------ names
    @staticmethod
    def netns_name(lab: str, obj: str) -> str:
        return f"lk-{lab}.{obj}"

    @staticmethod
    def cgroup_dir(lab: str) -> Path:
        root = nsexec.cgroup2_root()
        if root is None:
            raise BackendError("no cgroup v2 hierarchy is mounted; see `labkit doctor` (cgroup2)")
        return root / f"lk-{lab}"

    def pod_netns(self, spec: Spec, pod: str) -> str:
        spec.pod(pod)  # KeyError with the list of pods if unknown
        return self.netns_name(spec.name, pod)

    def pod_cgroup(self, spec: Spec, pod: str) -> Path:
        node, _ = spec.pod(pod)
        return self.cgroup_dir(spec.name) / node.name / pod

    # ------------------------------------------------------------ preflight
    def preflight(self, spec: Spec) -> None:
        """Fail before creating anything if the kernel lacks what the spec needs."""
        doctor.require("root", "the netns backend")
        doctor.require("netns", "the netns backend")
        doctor.require("veth", "the netns backend")
        doctor.require("cgroup2", "the netns backend")
        for mode in sorted(spec.modes()):
            for feature in MODE_FEATURES.get(mode, ()):
                doctor.require(feature, f"pod mode {mode}")
        get_datapath(spec.datapath).preflight()
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
        cg = self.cgroup_dir(spec.name)
        record("cgroup", path=str(cg))
        for node in spec.nodes:
            for pod in node.pods:
                (cg / node.name / pod.name).mkdir(parents=True, exist_ok=True)
        n_pods = len(spec.pods())
        bar = tqdm(total=len(spec.nodes) + n_pods + (n_pods if start_servers else 0), desc=f"up {spec.name}",
                   unit="obj", disable=not progress, leave=False)
        router = topology.create_netns(self.netns_name(spec.name, "vpc"), record)
        nodes: dict[str, topology.Netns] = {}
        try:
            router.sysctl({"net.ipv4.ip_forward": 1, "net.ipv4.conf.all.send_redirects": 0,
                           "net.ipv4.conf.default.send_redirects": 0})
            router.addr("lo", plan.vpc_gateway, 32)
            for node in spec.nodes:
                nodes[node.name] = ns = topology.create_netns(self.netns_name(spec.name, node.name), record)
                for nic in plan.nodes[node.name].nics:
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
            wirings = []
            for node in spec.nodes:
                w = topology.NodeWiring(spec, plan, node, nodes[node.name],
                                        lambda pod: self.netns_name(spec.name, pod), record)
                w.setup_node()
                bar.update()
                for pod in node.pods:
                    w.add_pod(pod)
                    bar.update()
                wirings.append(w)
        finally:
            router.close()
            for ns in nodes.values():
                ns.close()
        if start_servers:
            self._start_servers(spec, state, bar)
        self._sync_datapaths(spec, plan, wirings)
        self._sync_policies(spec, plan)
        bar.close()

    def _start_servers(self, spec: Spec, state: LabState, bar) -> None:
        from ..native import binary

        exe = str(binary("lkserver"))
        logs = state.dir / "logs"
        logs.mkdir(exist_ok=True)
        ports = {SERVER_PORT} | {s.target_port for s in spec.services} | _policy_ports(spec)
        port_arg = ",".join(str(p) for p in sorted(ports))
        cpus = server_cpus()
        pending = {}
        for node, pod in spec.pods():
            log = open(logs / f"{pod.name}.log", "w")
            proc = nsexec.spawn([exe, "--name", pod.name, "--ports", port_arg], self.netns_name(spec.name, pod.name),
                                cgroup=self.pod_cgroup(spec, pod.name), cpus=cpus, stdout=log, stderr=log,
                                detach=True)
            log.close()
            state.record("process", pid=proc.pid, pod=pod.name)
            pending[pod.name] = proc
        deadline = time.monotonic() + 10
        for name, proc in pending.items():
            log = logs / f"{name}.log"
            while not log.read_text().startswith("ready"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BackendError(f"in-pod server of {name} did not start: {log.read_text().strip()[-500:]}")
                time.sleep(0.002)
            bar.update()

    # ------------------------------------------------------------ datapaths
    def node_context(self, spec: Spec, node_name: str, plan: addressing.AddressPlan | None = None) -> NodeContext:
        plan = plan or addressing.plan(spec)
        node = next(n for n in spec.nodes if n.name == node_name)
        pods = topology.pod_ifaces(spec, plan, node.name, lambda pod: self.netns_name(spec.name, pod))
        return NodeContext(lab=spec.name, prefix=spec.prefix, node=node.name,
                           netns=self.netns_name(spec.name, node.name), pod_cidr=spec.pod_cidr,
                           service_cidr=spec.service_cidr,
                           state_dir=LabState(spec.name).dir / "nodes" / node.name,
                           cgroup=self.cgroup_dir(spec.name) / node.name, pods=tuple(pods),
                           node_ip=str(plan.nodes[node.name].primary.ip))

    def datapath(self, spec: Spec, node: str, name: str, plan: addressing.AddressPlan | None = None):
        """Datapath ``name`` of ``node``, an object of this process (its state folder made)."""
        ctx = self.node_context(spec, node, plan)
        ctx.state_dir.mkdir(parents=True, exist_ok=True)
        return get_datapath(name)(ctx)

    def run_client(self, spec: Spec, pod: str, mode: str, host: str, port: int, **kw) -> dict:
        """``lkclient`` in the pod's namespace and cgroup: :func:`labkit.measure.loadgen.run_client`."""
        from ..measure import loadgen

        return loadgen.run_client(self.pod_netns(spec, pod), mode, host, port,
                                  cgroup=self.pod_cgroup(spec, pod), **kw)

    def client_session(self, spec: Spec, pod: str, cpus=None):
        """:class:`labkit.measure.loadgen.ClientSession` in the pod's namespace and cgroup."""
        from ..measure import loadgen

        return loadgen.ClientSession(self.pod_netns(spec, pod), self.pod_cgroup(spec, pod), cpus)

    def kernels(self, spec: Spec) -> dict[str, str]:
        return {node.name: platform.release() for node in spec.nodes}

    def _sync_datapaths(self, spec: Spec, plan: addressing.AddressPlan, wirings) -> None:
        if spec.datapath == "none":
            return
        table = table_from_spec(spec, plan)
        cls = get_datapath(spec.datapath)
        for node in spec.nodes:
            ctx = self.node_context(spec, node.name, plan)
            ctx.state_dir.mkdir(parents=True, exist_ok=True)
            cls(ctx).sync(table)

    def _sync_policies(self, spec: Spec, plan: addressing.AddressPlan) -> None:
        """NetworkPolicy enforcement per node, after the Service datapath (:mod:`labkit.policy`)."""
        if not spec.policies or spec.policy_engine == "none":
            return
        from ..policy import sync_node

        for node in spec.nodes:
            ctx = self.node_context(spec, node.name, plan)
            ctx.state_dir.mkdir(parents=True, exist_ok=True)
            sync_node(spec, ctx, plan)

    # ------------------------------------------------------------ down
    def down(self, name: str) -> dict[str, int]:
        """Remove lab ``name``: processes, mounts, namespaces, cgroups, state. Returns counts."""
        state = LabState(name)
        prefix = f"lk-{name}."
        journal = list(state.objects())
        names = {o["name"] for o in journal if o.get("kind") == "netns"}
        names |= set(nsexec.list_netns(prefix))
        names = {n for n in names if n.startswith(prefix)}  # never another lab's
        counts = {"processes": 0, "mounts": 0, "netns": 0, "cgroups": 0}
        # 1. processes: the lab's cgroup, journaled pids, and anything still inside its namespaces
        cg = nsexec.cgroup2_root()
        cgdir = cg / f"lk-{name}" if cg else None
        if cgdir and cgdir.exists():
            counts["processes"] += sum(len(p.read_text().split()) for p in cgdir.rglob("cgroup.procs"))
            nsexec.kill_cgroup(cgdir)
        inodes = [i for i in (nsexec.netns_inode(n) for n in names) if i]
        for _ in range(50):
            pids = [p for p in nsexec.pids_in_netns(inodes) if p != os.getpid()]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    counts["processes"] += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        # 2. mounts under the lab's state folder (bpffs instances of eBPF datapaths)
        for mnt in _mounts_under(state.dir):
            nsexec._libc.umount2(str(mnt).encode(), nsexec.MNT_DETACH)
            counts["mounts"] += 1
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


def _policy_ports(spec: Spec) -> set[int]:
    """Ports of the policy matrix (labkit check probes them on every pod)."""
    if not spec.policies:
        return set()
    from ..policy.model import server_ports

    return server_ports(spec)


def _mounts_under(path: Path) -> list[Path]:
    base = str(path.resolve()) if path.exists() else str(path)
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1].replace("\\040", " ")
            if mnt == base or mnt.startswith(base + "/"):
                out.append(Path(mnt))
    return sorted(out, key=lambda p: len(p.parts), reverse=True)


def lab_netns_names(name: str) -> list[str]:
    return nsexec.list_netns(f"lk-{name}.")

