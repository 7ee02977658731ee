"""What backends whose nodes are whole machines share (:class:`RemoteNodesBackend`): every node is a
:class:`~labkit.remote.node.RemoteNode` reached over ssh, and pods, datapaths and the load client go
through it. A subclass says only how to reach each machine (:meth:`RemoteNodesBackend.machine`) and
how machines come and go: the ``vagrant`` backend makes VMs, the ``hosts`` backend borrows machines
that exist.
"""

from __future__ import annotations

import subprocess
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path

from .. import addressing, naming
from ..datapath import NodeContext
from ..datapath import get as get_datapath
from ..remote.node import RemoteNode
from ..remote.ssh import Machine
from ..spec import Spec
from ..state import LabState
from .base import Backend


class RemoteNodesBackend(Backend):
    """A backend whose nodes are machines driven by labkit's agent over ssh."""

    @abstractmethod
    def machine(self, lab: str, node: str) -> Machine:
        """How to reach the machine of node ``node`` of lab ``lab``."""

    def remote(self, spec: Spec, node: str) -> RemoteNode:
        """Node ``node`` of the lab, on its machine (its cgroup as the agent reported it at build)."""
        cgroup = LabState(spec.name).meta().get("nodes", {}).get(node, {}).get("cgroup")
        return RemoteNode(self.machine(spec.name, node), spec, node, cgroup)

    def pod_netns(self, spec: Spec, pod: str) -> str:
        spec.pod(pod)
        return naming.netns_name(spec.name, pod)

    def pod_cgroup(self, spec: Spec, pod: str) -> Path:
        node, _ = spec.pod(pod)
        return self.remote(spec, node.name).pod_cgroup(pod)

    def pod_run(self, spec: Spec, pod: str, argv: Sequence[str], input=None, check: bool = True,
                timeout: float | None = 300, text: bool = True, cpus=None) -> subprocess.CompletedProcess:
        node, _ = spec.pod(pod)
        return self.remote(spec, node.name).pod_run(pod, argv, input=input, check=check, timeout=timeout, text=text)

    def pod_spawn(self, spec: Spec, pod: str, argv: Sequence[str], **popen) -> subprocess.Popen:
        node, _ = spec.pod(pod)
        return self.remote(spec, node.name).pod_spawn(pod, argv, **popen)

    def client_session(self, spec: Spec, pod: str, cpus=None):
        """``lkclient --serve`` in ``pod`` on its machine. ``cpus`` (this host's CPU plan) does not apply
        there: the machine's CPUs are the node's own."""
        node, _ = spec.pod(pod)
        return self.remote(spec, node.name).client_session(pod)

    def datapath(self, spec: Spec, node: str, name: str, plan: addressing.AddressPlan | None = None, **options):
        """Datapath ``name`` of ``node``, run by the agent on its machine and driven from here."""
        get_datapath(name)  # a known name, or the registry's error listing them
        return self.remote(spec, node).datapath(name, **options)

    def node_context(self, spec: Spec, node_name: str, plan: addressing.AddressPlan | None = None) -> NodeContext:
        """The datapath's view of a node as seen from here: ``run()`` goes over ssh to its machine."""
        return self.remote(spec, node_name).context(plan)

    def kernels(self, spec: Spec) -> dict[str, str]:
        """The kernel release of every node's machine (reported by the agent when it built the node)."""
        return dict(LabState(spec.name).meta().get("kernels", {}))


__all__ = ["RemoteNodesBackend"]
