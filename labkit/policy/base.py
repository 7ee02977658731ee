"""One interface for every NetworkPolicy engine, with change tracking done here once.

Mirrors :mod:`labkit.datapath.base`: an engine programs one node (its namespace, and the namespaces
of its pods that have no node-side interface) so that the node's pods are isolated as a
:class:`~labkit.policy.model.PolicyTable` says. :meth:`PolicyEngine.sync` computes the
:class:`~labkit.policy.model.PolicyDiff` against the last table applied and hands it to the
subclass's :meth:`PolicyEngine.apply`, which renders and applies it in as few steps as the kernel
interface allows. A failed apply makes the next sync a full one. :meth:`PolicyEngine.cleanup`
removes everything the engine created and is safe to call twice.

Engines are chosen by name from :data:`ENGINES` (``policy_engine:`` in the spec): ``iptables``
(:mod:`.iptables`) and ``ebpf`` (:mod:`.ebpf`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from ..datapath.base import NodeContext, guarded_apply
from ..registry import Registry
from .model import PolicyDiff, PolicyTable, diff


@dataclass
class PolicySyncResult:
    engine: str
    node: str
    full: bool
    policies: int  # policies that select a pod of the node
    rules: int
    changes: dict
    seconds: float


class PolicyEngine(ABC):
    """Base of the policy engines. Subclasses set ``name``/``features``, implement :meth:`apply`
    and :meth:`cleanup`, and register with :func:`register`."""

    name: ClassVar[str]
    features: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: NodeContext, datapath: str = ""):
        self.ctx = ctx
        self.datapath = datapath  # the lab's Service datapath (engines may pick a matching backend)
        self._applied: PolicyTable | None = None

    @classmethod
    def preflight(cls, datapath: str = "") -> None:
        from .. import doctor

        for feature in cls.features:
            doctor.require(feature, f"policy engine {cls.name}")

    @property
    def applied(self) -> PolicyTable | None:
        return self._applied

    def sync(self, desired: PolicyTable) -> PolicySyncResult:
        changes = diff(self._applied, desired)
        t0 = time.perf_counter()
        if not changes.empty:
            guarded_apply(self, f"policy engine {self.name} on node {self.ctx.node}",
                          lambda: self.apply(desired, changes))
        self._applied = desired
        return PolicySyncResult(self.name, self.ctx.node, changes.full, len(desired), desired.rules(),
                                changes.counts(), time.perf_counter() - t0)

    @abstractmethod
    def apply(self, desired: PolicyTable, changes: PolicyDiff) -> None:
        """Make the kernel match ``desired``. ``changes.full``: assume nothing about current state."""

    @abstractmethod
    def cleanup(self) -> None:
        """Remove every rule, set, map, program and filter this engine created. Idempotent."""

    def close(self) -> None:
        """Drop this process's handles; what is installed stays."""

    def describe(self) -> dict:
        return {"engine": self.name, "node": self.ctx.node,
                "policies": None if self._applied is None else len(self._applied)}


ENGINES: Registry[type[PolicyEngine]] = Registry("policy engine", "labkit.policy")
register = ENGINES.register


def get(name: str) -> type[PolicyEngine]:
    """The engine registered as ``name``; a clear error listing the known ones otherwise."""
    return ENGINES.get(name)
