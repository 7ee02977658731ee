"""Service datapaths behind one interface (see :mod:`labkit.datapath.base`).

Registered names: ``iptables-legacy``, ``iptables-nft`` (kube-proxy iptables mode on either
backend), ``ipvs`` (kube-proxy IPVS mode), ``nftables`` (kube-proxy nftables mode), ``ebpf``
(Cilium-style socket-level load balancing at cgroup connect4/sendmsg4/recvmsg4) and ``ebpf-tc``
(per-packet DNAT at tc). ``none`` installs nothing.
"""

from __future__ import annotations

import importlib

from .base import REGISTRY, Datapath, NodeContext, PodIface, SyncResult, get, register

_MODULES = ("none", "iptables", "nftables", "ipvs", "ebpf")


def load_all() -> None:
    """Import every datapath module so that it registers itself (missing ones are skipped)."""
    for mod in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{mod}":
                raise


__all__ = ["Datapath", "NodeContext", "PodIface", "SyncResult", "REGISTRY", "get", "register", "load_all"]
