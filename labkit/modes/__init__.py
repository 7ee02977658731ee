"""Pod network modes as objects: one module per mode, one registry of modes (:data:`MODES`).

A mode knows everything about how a pod of its kind is built and used (Mininet's ``Intf``/``Link``
subclasses; see :class:`~labkit.modes.base.PodMode` for the attributes and hooks): which node NIC it
takes and where its address comes from, how it is wired, whether it has a node-side interface,
whether its traffic crosses the node (where NetworkPolicy and eBPF hooks must go), the kernel
features it needs and which Service datapaths can serve it. Nothing else in labkit asks for a mode
by name: adding a mode is one new module here.

The study's modes (Terway's ENI modes against the usual CNI ones), in :data:`MODES` order:
``eni-exclusive``, ``eni-ipvlan``, ``eni-policy-route``, ``veth``, ``bridge``, ``overlay``, ``macvlan``.
"""

from __future__ import annotations

from ..registry import Registry
from .base import PodMode

MODES: Registry[PodMode] = Registry("mode", __name__)


def get(name: str) -> PodMode:
    """The mode named ``name`` (:class:`~labkit.registry.UnknownName` lists the known ones)."""
    return MODES.get(name)


def names() -> list[str]:
    return MODES.names()


def enis_needed(modes: list[str]) -> int:
    """ENIs a node needs for pods of these modes (one entry per pod): one per exclusive pod, and one
    shared ENI when any pod needs one."""
    kinds = [get(m).nic for m in modes]
    return kinds.count("exclusive") + (1 if "shared" in kinds or "shared-or-primary" in kinds else 0)


__all__ = ["MODES", "PodMode", "get", "names", "enis_needed"]
