"""The node runtime: one node of a lab, on the machine where the node is.

The same code builds and runs a node whether the node is a network namespace on this machine (the
``netns`` backend calls it in-process) or a whole machine (a Vagrant VM or a real host: labkit's
agent calls it there, :mod:`labkit.remote.agent`). It knows:

- names: the node's and its pods' namespaces (:mod:`labkit.naming`), the cgroup folder
  ``lk-<lab>/<node>/<pod>`` under this machine's cgroup v2 mount, the node's state folder
- :meth:`NodeRuntime.context`: the :class:`~labkit.datapath.base.NodeContext` datapaths and policy
  engines act on (built here and nowhere else)
- :meth:`NodeRuntime.build`: the node's wiring and its pods (:class:`labkit.topology.NodeWiring`)
- :meth:`NodeRuntime.start_servers`: the in-pod server on every port the lab's checks and Services
  use, pinned where measurements want it, journaled for ``down``
- :meth:`NodeRuntime.sync_datapath` / :meth:`NodeRuntime.sync_policies`: program the node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from . import addressing, naming, nsexec, topology
from .datapath.base import NodeContext, SyncResult
from .errors import BackendError, DatapathError
from .spec import Spec
from .state import LabState

SERVER_PORT = 8080  # every pod serves here (labkit check's pod-to-pod rows)


def cgroup_root() -> Path:
    root = nsexec.cgroup2_root()
    if root is None:
        raise BackendError("no cgroup v2 hierarchy is mounted; see `labkit doctor` (cgroup2)")
    return root


def lab_cgroup(lab: str) -> Path:
    """The lab's cgroup folder on this machine."""
    return cgroup_root() / naming.lab_prefix(lab)


class NodeRuntime:
    """Node ``node`` of ``spec`` on this machine: the lab's namespace for it, or, with
    ``whole_machine``, this machine's own namespace (the node is a VM or a host)."""

    def __init__(self, spec: Spec, node: str, plan: addressing.AddressPlan | None = None,
                 whole_machine: bool = False):
        self.spec = spec
        self.node = next((n for n in spec.nodes if n.name == node), None)
        if self.node is None:
            raise BackendError(f"no node {node!r} in lab {spec.name!r}")
        self.plan = plan or addressing.plan(spec)
        self.netns = None if whole_machine else naming.netns_name(spec.name, node)

    # ------------------------------------------------------------ names
    def pod_netns(self, pod: str) -> str:
        return naming.netns_name(self.spec.name, pod)

    @property
    def cgroup(self) -> Path:
        """This node's cgroup folder: its pods' folders are inside."""
        return lab_cgroup(self.spec.name) / self.node.name

    def pod_cgroup(self, pod: str) -> Path:
        return self.cgroup / pod

    @property
    def state_dir(self) -> Path:
        """Per-node folder for datapath state (e.g. a bpffs mount); removed with the lab's state."""
        return LabState(self.spec.name).dir / "nodes" / self.node.name

    def context(self) -> NodeContext:
        """What datapaths and policy engines need to act on this node."""
        spec, node = self.spec, self.node
        return NodeContext(lab=spec.name, prefix=spec.prefix, node=node.name, netns=self.netns,
                           pod_cidr=spec.pod_cidr, service_cidr=spec.service_cidr, state_dir=self.state_dir,
                           cgroup=self.cgroup, pods=topology.pod_ifaces(spec, self.plan, node.name, self.pod_netns),
                           node_ip=str(self.plan.nodes[node.name].primary.ip))

    # ------------------------------------------------------------ build
    def build(self, ns: topology.Netns, record) -> None:
        """Wire the node inside ``ns`` (holding ``eth0`` and the ``eni<k>`` NICs, no addresses yet)
        and every pod; ``record`` journals each object before it is created."""
        for pod in self.node.pods:
            self.pod_cgroup(pod.name).mkdir(parents=True, exist_ok=True)
        wiring = topology.NodeWiring(self.spec, self.plan, self.node, ns, self.pod_netns, record)
        with self._naming(f"node {self.node.name}"):
            wiring.setup_node()
        for pod in self.node.pods:
            with self._naming(f"pod {pod.name} ({pod.mode}) on node {self.node.name}"):
                wiring.add_pod(pod)

    @staticmethod
    @contextlib.contextmanager
    def _naming(what: str):
        """A kernel's refusal while building ``what`` becomes one BackendError naming it and the
        kernel's message (the traceback stays in the lab's log, not on a user's terminal)."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            yield
        except NetlinkError as exc:
            raise BackendError(f"building {what}: the kernel refused ({exc.code}: {os.strerror(exc.code)}; "
                               f"{exc.args[1] if len(exc.args) > 1 else exc})") from exc
        except (OSError, LookupError) as exc:
            raise BackendError(f"building {what}: {exc}") from exc

    def server_ports(self) -> list[int]:
        """Every port a pod serves: labkit check's, the Services' target ports, the policy matrix's."""
        ports = {SERVER_PORT} | {s.target_port for s in self.spec.services}
        if self.spec.policies:
            from .policy.model import server_ports

            ports |= server_ports(self.spec)
        return sorted(ports)

    def start_servers(self, state: LabState, cpus: list[int] | None = None, timeout: float = 10) -> None:
        """Start every pod's server (:mod:`labkit.workloads`): ``lkserver`` on the lab's ports but the
        one a user's or the packaged server owns, and that server; each in the pod's namespace and
        cgroup, pinned to ``cpus``, journaled; then wait until each is ready (``lkserver`` says so,
        another server accepts a connection on its port)."""
        from .native import binary
        from .workloads import server_argv

        logs = state.dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        lab_ports = self.server_ports()
        pending: list[tuple[str, subprocess.Popen, Path, int | None, list[str]]] = []
        for pod in self.node.pods:
            server = self.spec.server_of(pod)
            if server.kind == "none":
                continue
            ports = [p for p in lab_ports if p != server.serves]
            argvs = [([str(binary("lkserver")), "--name", pod.name, "--ports", ",".join(map(str, ports))],
                      logs / f"{pod.name}.log", None)] if ports else []
            own = server_argv(server, pod.name, state.dir / "servers" / pod.name)
            if own:
                argvs.append((own, logs / f"{pod.name}.{server.kind}.log", server.serves))
            for argv, log_path, port in argvs:
                with open(log_path, "w") as log:
                    proc = nsexec.spawn(argv, self.pod_netns(pod.name), cgroup=self.pod_cgroup(pod.name), cpus=cpus,
                                        stdout=log, stderr=log, detach=True)
                state.record("process", pid=proc.pid, pod=pod.name)
                pending.append((pod.name, proc, log_path, port, argv))
        deadline = time.monotonic() + timeout
        for name, proc, log_path, port, argv in pending:
            while not (log_path.read_text().startswith("ready") if port is None
                       else self._listens(name, port)):
                if proc.poll() is not None or time.monotonic() > deadline:
                    what = "in-pod server" if port is None else f"server on port {port} (`{shlex.join(argv)}`)"
                    raise BackendError(f"{what} of pod {name} did not start: {log_path.read_text().strip()[-500:]}")
                time.sleep(0.002 if port is None else 0.02)

    def _listens(self, pod: str, port: int) -> bool:
        """Whether something accepts TCP connections on ``port`` of the pod's address, in the pod."""
        ip = str(self.plan.pods[pod].ip)

        def connect() -> bool:
            with socket.socket() as s:
                s.settimeout(0.2)
                return s.connect_ex((ip, port)) == 0

        return nsexec.in_netns(self.pod_netns(pod), connect)

    # ------------------------------------------------------------ program
    def datapath(self, name: str, pods: Sequence[str] | None = None, **options):
        """Service datapath ``name`` of this node, an object of this process (state folder made).
        ``pods``: the node's pods it serves (default: every pod; a per-pod datapath such as
        ``ebpf-tc`` then goes on those pods' interfaces only, as pod-modes' ``+ebpf-tc`` variants
        use it); a name that is not a pod of this node is refused. ``options``: the class's
        constructor keywords (``Datapath.options``: e.g. ``order``); the spec's ``kube_proxy`` is
        passed to a datapath that takes it. Keywords a class does not take are left out."""
        from .datapath import get

        cls = get(name)
        wanted = {"kube_proxy": self.spec.kube_proxy, **options}
        ctx = self.context()
        if pods is not None:
            if isinstance(pods, str) or not all(isinstance(p, str) for p in pods):
                raise DatapathError(f"datapath {name} on node {self.node.name}: pods must be a list of pod names")
            wanted_pods = set(pods)
            unknown = sorted(wanted_pods - {p.pod for p in ctx.pods})
            if unknown:
                raise DatapathError(f"datapath {name} on node {self.node.name}: no pod {', '.join(unknown)} on "
                                    f"this node (its pods: {', '.join(p.pod for p in ctx.pods)})")
            ctx = dataclasses.replace(ctx, pods=tuple(p for p in ctx.pods if p.pod in wanted_pods))
        ctx.state_dir.mkdir(parents=True, exist_ok=True)
        return cls(ctx, **{k: v for k, v in wanted.items() if k in cls.options})

    def sync_datapath(self) -> SyncResult | None:
        """Program the spec's datapath with the spec's services (nothing for ``none``)."""
        if self.spec.datapath == "none":
            return None
        from .services import table_from_spec

        return self.datapath(self.spec.datapath).sync(table_from_spec(self.spec, self.plan))

    def sync_host_routing(self):
        """eBPF host routing on this node (``host_routing: bpf``), after the Service datapath and the
        policy engine attached (it must know what sits on the pods' veths)."""
        if self.spec.host_routing != "bpf":
            return None
        from .hostrouting import sync_node

        ctx = self.context()
        ctx.state_dir.mkdir(parents=True, exist_ok=True)
        return sync_node(ctx, self.spec.datapath, self.spec.policy_engine)

    def sync_policies(self):
        """Enforce the spec's NetworkPolicies on this node (after the Service datapath)."""
        if not self.spec.policies or self.spec.policy_engine == "none":
            return None
        from .policy import sync_node

        ctx = self.context()
        ctx.state_dir.mkdir(parents=True, exist_ok=True)
        return sync_node(self.spec, ctx, self.plan)


__all__ = ["NodeRuntime", "SERVER_PORT", "lab_cgroup", "cgroup_root"]
