"""Throwaway topologies shared by the datapath tests: pod namespaces joined to a node namespace by
veth pairs, as a lab's ``veth`` mode wires them, without the lab machinery around them."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from labkit import nsexec
from labkit.ebpf.netlink import netlink


def veth_pods(node: str, pods: Iterable[str], ns_prefix: str, net: str, undo: list[Callable[[], None]],
              first: int = 1) -> tuple[dict[str, str], dict[str, str]]:
    """A namespace ``<ns_prefix>-<pod>`` per pod, the i-th (from ``first``) wired to ``node`` by a veth
    pair: ``lx-<pod>`` in the node with ``<net>.<i>.1/24``, ``eth0`` in the pod with ``<net>.<i>.2``
    and a default route through the node. Returns (namespace by pod, address by pod); each removal is
    appended to ``undo`` as soon as there is something to remove."""
    netns, ips = {}, {}
    for i, pod in enumerate(pods, start=first):
        ns = f"{ns_prefix}-{pod}"
        nsexec.create_netns(ns)
        undo.append(lambda ns=ns: nsexec.remove_netns(ns))

        def node_side(ipr, pod=pod, ns=ns, i=i):
            ipr.link("add", ifname=f"lx-{pod}", kind="veth", peer={"ifname": f"tmp-{pod}"})
            ipr.link("set", index=ipr.link_lookup(ifname=f"tmp-{pod}")[0], net_ns_fd=str(nsexec.netns_path(ns)))
            host = ipr.link_lookup(ifname=f"lx-{pod}")[0]
            ipr.addr("add", index=host, address=f"{net}.{i}.1", prefixlen=24)
            ipr.link("set", index=host, state="up")

        def pod_side(ipr, pod=pod, i=i):
            idx = ipr.link_lookup(ifname=f"tmp-{pod}")[0]
            ipr.link("set", index=idx, ifname="eth0")
            ipr.addr("add", index=idx, address=f"{net}.{i}.2", prefixlen=24)
            ipr.link("set", index=idx, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=f"{net}.{i}.1")

        netlink(node, node_side)
        netlink(ns, pod_side)
        netns[pod], ips[pod] = ns, f"{net}.{i}.2"
    return netns, ips
