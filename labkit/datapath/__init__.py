"""Service datapaths behind one interface (see :mod:`labkit.datapath.base`).

Registered names: ``iptables-legacy``, ``iptables-nft`` (kube-proxy iptables mode on either
backend), ``ipvs`` (kube-proxy IPVS mode), ``nftables`` (kube-proxy nftables mode), ``ebpf``
(Cilium-style socket-level load balancing at cgroup connect4/sendmsg4/recvmsg4) and ``ebpf-tc``
(per-packet DNAT at tc). ``none`` installs nothing.
"""

from __future__ import annotations

from .base import DATAPATHS, Datapath, NodeContext, PodIface, SyncResult, get, register

__all__ = ["Datapath", "NodeContext", "PodIface", "SyncResult", "DATAPATHS", "get", "register"]
