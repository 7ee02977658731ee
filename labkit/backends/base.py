"""What every backend offers: :class:`Backend`, the interface :class:`labkit.lab.Lab` and the
experiments use, so that nothing above a backend knows whether a node is a namespace here, a VM or
another machine (Mininet's cluster edition: the same ``Node`` API over SSH).

Lifecycle: :meth:`Backend.preflight` (every missing feature or tool, before anything exists),
:meth:`Backend.up` (nothing half built on failure) and :meth:`Backend.down` (every object of that lab
and only of that lab, found by the journal and the lab's prefix, also after a SIGKILL; safe twice).
Pods: :meth:`Backend.pod_run` / :meth:`Backend.pod_spawn` run a command in a pod's namespace and
cgroup wherever the pod is. Experiments: :meth:`Backend.datapath` (a node's Service datapath),
:meth:`Backend.client_session` / :meth:`Backend.run_client` (the load client in a pod; raw samples on
this machine) and :meth:`Backend.kernels` (each node's kernel, for the manifest).
"""

from __future__ import annotations

import subprocess
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from ..spec import Spec


class Backend(ABC):
    name: ClassVar[str]

    # ------------------------------------------------------------ lifecycle
    @abstractmethod
    def preflight(self, spec: Spec) -> None:
        """Raise :class:`~labkit.errors.MissingFeature` (with the fix) before creating anything."""

    @abstractmethod
    def up(self, spec: Spec, progress: bool = True, start_servers: bool = True):
        """Realise ``spec`` (validated by the caller); on failure remove what was made and raise."""

    @abstractmethod
    def down(self, name: str) -> dict[str, int]:
        """Remove lab ``name``; counts of what was removed."""

    # ------------------------------------------------------------ pods
    @abstractmethod
    def pod_netns(self, spec: Spec, pod: str) -> str:
        """The pod's namespace name (on whichever machine the pod is)."""

    @abstractmethod
    def pod_cgroup(self, spec: Spec, pod: str) -> Path:
        """The pod's cgroup folder (on whichever machine the pod is)."""

    @abstractmethod
    def pod_run(self, spec: Spec, pod: str, argv: Sequence[str], input=None, check: bool = True,
                timeout: float | None = 300, text: bool = True, cpus=None) -> subprocess.CompletedProcess:
        """Run ``argv`` in the pod's namespace and cgroup to completion, output captured. ``argv[0] ==
        sys.executable`` stands for labkit's own Python wherever the pod runs."""

    @abstractmethod
    def pod_spawn(self, spec: Spec, pod: str, argv: Sequence[str], **popen) -> subprocess.Popen:
        """Start ``argv`` in the pod without waiting (stdio as for :class:`subprocess.Popen`; ``cpus``
        pins it where the pod runs on this machine)."""

    # ------------------------------------------------------------ experiments
    @abstractmethod
    def datapath(self, spec: Spec, node: str, name: str, plan=None, **options):
        """Service datapath ``name`` of ``node`` (``sync``, ``sync_changes``, ``cleanup``, ``describe``,
        ``chain_order``, ``walk``); ``options`` as :meth:`labkit.node.NodeRuntime.datapath` takes them."""

    @abstractmethod
    def client_session(self, spec: Spec, pod: str, cpus=None):
        """``lkclient --serve`` kept in ``pod`` (:class:`labkit.measure.loadgen.ClientSession`)."""

    def run_client(self, spec: Spec, pod: str, mode: str, host: str, port: int, cpus=None, **kw) -> dict:
        """``lkclient`` once in ``pod``; options and result as :func:`labkit.measure.loadgen.run_client`."""
        with self.client_session(spec, pod, cpus) as session:
            return session.run(mode, host, port, **kw)

    @abstractmethod
    def kernels(self, spec: Spec) -> dict[str, str]:
        """The kernel release each node runs."""


__all__ = ["Backend"]
