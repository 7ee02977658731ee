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


def plan_enis(modes: list[str]) -> tuple[int, list[int | None]]:
    """For pods of these modes on one node (one entry per pod): how many ENIs the node needs, and the
    shared ENI each pod should name (None: it takes no shared ENI). Exclusive pods take one ENI each;
    the others share, one shared ENI per kind of slave device (Linux refuses macvlan and ipvlan slaves
    on one parent), pods without slaves on the first."""
    kinds = [get(m) for m in modes]
    exclusive = sum(m.nic == "exclusive" for m in kinds)
    groups = list(dict.fromkeys(m.slave_kind for m in kinds if m.nic in ("shared", "shared-or-primary")
                                and m.slave_kind)) or [None]
    shared = any(m.nic in ("shared", "shared-or-primary") for m in kinds)
    picks = [exclusive + 1 + groups.index(m.slave_kind if m.slave_kind in groups else groups[0])
             if m.nic in ("shared", "shared-or-primary") else None for m in kinds]
    return exclusive + (len(groups) if shared else 0), picks


def enis_needed(modes: list[str]) -> int:
    """ENIs a node needs for pods of these modes (one entry per pod): see :func:`plan_enis`."""
    return plan_enis(modes)[0]


__all__ = ["MODES", "PodMode", "get", "names", "enis_needed", "plan_enis"]
