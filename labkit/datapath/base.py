"""One interface for every Service datapath, with change tracking done here once.

A datapath programs one node (a network namespace on the ``netns`` backend, a VM on ``vagrant``) so
that connections to ``ClusterIP:port`` reach an endpoint. :meth:`Datapath.sync` computes the
difference between the last table applied and the desired one and hands it to the subclass's
:meth:`Datapath.apply`, which renders and applies it in one step (one ``iptables-restore``, one
``nft -f`` transaction, one batch of map updates). If applying fails the subclass must leave the
previous kernel state as it was (restore/transactions do); the base then forgets what it applied so
the next sync is a full one (kube-proxy's ``needFullSync`` after a failed sync).
:meth:`Datapath.cleanup` removes everything the datapath created and is safe to call twice.

Datapaths are chosen by name from :data:`DATAPATHS` (``datapath:`` in the spec); each module of this
package registers its classes.
"""

from __future__ import annotations

import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .. import nsexec
from ..errors import DatapathError, LabkitError
from ..registry import Registry
from ..services import ServiceTable, TableDiff, diff


@dataclass(frozen=True)
class PodIface:
    """A pod as the node sees it: the node-side interface facing it (``lx-<pod>``, or ``""`` when the
    pod hangs off an ENI with no node-side interface) and the pod's own namespace and address."""

    pod: str
    ifname: str  # node-side interface in the node's namespace ("" if none)
    netns: str | None  # the pod's namespace
    ip: str
    mode: str

    @property
    def pod_mode(self):
        """The pod's :class:`~labkit.modes.base.PodMode` (where its traffic goes, what it allows)."""
        from .. import modes

        return modes.get(self.mode)


@dataclass(frozen=True)
class NodeContext:
    """Everything a datapath needs to act on one node, and nothing about how the node was built."""

    lab: str
    prefix: str  # "lk-<lab>": every object a datapath creates outside the node's own namespace carries it
    node: str
    netns: str | None  # the node's namespace; None when the node is this machine (inside a VM)
    pod_cidr: str  # cluster CIDR: traffic from outside it is masqueraded (kube-proxy --cluster-cidr)
    service_cidr: str
    state_dir: Path  # per-node folder for datapath state (e.g. a bpffs mount); removed by `labkit down`
    cgroup: Path | None = None  # cgroup v2 folder holding this node's pod processes (socket-LB hooks)
    pods: tuple[PodIface, ...] = ()
    node_ip: str = ""  # the node's primary VPC address

    def run(self, argv: Sequence[str], input: str | None = None, check: bool = True,
            timeout: float | None = 600) -> subprocess.CompletedProcess:
        """Run a command inside the node (its namespace)."""
        return nsexec.run(argv, self.netns, input=input, check=check, timeout=timeout)


@dataclass
class SyncResult:
    datapath: str
    node: str
    full: bool
    added: int
    removed: int
    changed: int
    services: int
    seconds: float


class Datapath(ABC):
    """Base of all Service datapaths. Subclasses set ``name``/``features`` and implement
    :meth:`apply` and :meth:`cleanup`; they register with :func:`register`."""

    name: ClassVar[str]
    features: ClassVar[tuple[str, ...]] = ()  # `labkit doctor` names this datapath needs
    # which pods' ClusterIP traffic it sees: "node" (rules in the node's stack: pods whose traffic
    # crosses the node), "pod" (in each pod's cgroup or on its own interface: every pod), "none"
    scope: ClassVar[str] = "node"
    # constructor keywords a class takes beyond the NodeContext, with the values each takes (None: any
    # int); a runtime passes only these (labkit.node.NodeRuntime.datapath)
    options: ClassVar[dict[str, tuple[str, ...] | None]] = {}

    def __init__(self, ctx: NodeContext):
        self.ctx = ctx
        self._applied: ServiceTable | None = None

    @classmethod
    def preflight(cls) -> None:
        """Raise :class:`MissingFeature` (with the doctor's fix) if this machine cannot run it."""
        from .. import doctor

        for feature in cls.features:
            doctor.require(feature, f"datapath {cls.name}")

    @property
    def applied(self) -> ServiceTable | None:
        """The table last applied successfully (None: unknown; the next sync is full)."""
        return self._applied

    def sync(self, desired: ServiceTable) -> SyncResult:
        """Make the kernel match ``desired``, applying only what changed since the last sync."""
        return self.sync_changes(desired, diff(self._applied, desired))

    def sync_changes(self, desired: ServiceTable, changes: TableDiff) -> SyncResult:
        """Apply ``changes`` that the caller already knows led to ``desired`` (kube-proxy's change
        trackers accumulate them from watch events instead of comparing whole tables). With no
        known previous state the change set is ignored and the sync is full."""
        if self._applied is None and not changes.full:
            changes = diff(None, desired)
        t0 = time.perf_counter()
        if not changes.empty:
            guarded_apply(self, f"{self.name} on node {self.ctx.node}", lambda: self.apply(desired, changes))
        self._applied = desired
        return SyncResult(self.name, self.ctx.node, changes.full, len(changes.added), len(changes.removed),
                          len(changes.changed), len(desired), time.perf_counter() - t0)

    @abstractmethod
    def apply(self, desired: ServiceTable, changes: TableDiff) -> None:
        """Make the kernel match ``desired``. ``changes.full``: assume nothing about current state."""

    @abstractmethod
    def cleanup(self) -> None:
        """Remove every rule, table, map, program and folder this datapath created. Idempotent."""

    def describe(self) -> dict:
        """Counts for `labkit` inspection (rules, map entries …); subclasses add what they know."""
        return {"datapath": self.name, "node": self.ctx.node,
                "services": None if self._applied is None else len(self._applied)}

    def chain_order(self) -> list[str]:
        """The service ports (keys) in the order a new connection's lookup meets them: install order
        unless a datapath writes its table otherwise (kube-proxy's Go map order)."""
        if self._applied is None:
            raise DatapathError(f"{self.name} on node {self.ctx.node}: nothing applied yet")
        return [sp.key for sp in self._applied if sp.endpoints]

    def walk(self, key: str | None) -> dict:
        """What a new connection to service port ``key`` (None: to an address no service has, such as
        a pod's) walks, for the experiments' rules axis, as result columns (``rules_walked``,
        ``nat_rules``, ``set_elements``, ``map_entries``); computed from the last sync. A datapath
        says what it knows; the base knows nothing."""
        return {}


def guarded_apply(owner, label: str, apply) -> None:
    """Run ``apply()``; if it fails, forget what ``owner`` last applied (``owner._applied = None``) so
    that its next sync is full, as kube-proxy does after a failed sync, and raise a DatapathError
    that carries the tool's stderr."""
    try:
        apply()
    except LabkitError:
        owner._applied = None
        raise
    except (OSError, subprocess.SubprocessError) as exc:
        owner._applied = None
        detail = getattr(exc, "stderr", "") or ""
        raise DatapathError(f"{label}: {exc} {detail}".strip()) from exc


DATAPATHS: Registry[type[Datapath]] = Registry("datapath", "labkit.datapath")
register = DATAPATHS.register


def get(name: str) -> type[Datapath]:
    """The datapath class registered as ``name``; a clear error listing the known ones otherwise."""
    return DATAPATHS.get(name)
