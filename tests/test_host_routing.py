"""eBPF host routing (:mod:`labkit.hostrouting`, ``bpf/bpf_host.c``) on the real kernel.

The struct contract first (gcc's and bcc's views of ``bpf/lib/host_routing.h``), then what needs no
kernel (preflight, which pods it takes). The kernel tests share one labkit lab of two nodes, as a
lab's ``veth`` mode wires them: ``n1`` holds the routed-veth pods ``a`` and ``b`` and the bridged pod
``d`` (left to the node's stack), ``n2`` the routed-veth pod ``c``; the nodes meet at the lab's VPC
router; ``datapath: ebpf`` (socket-LB) serves a Service ``web`` on ``b`` and ``c``. Each test gets
host routing freshly synced on both nodes and removed again after it (fixture ``hosts``); the lab is
torn down at the end of the module, also on failure.

What proves the path a packet took: host routing's per-CPU counters (``redirect_peer``,
``redirect_neigh``, ``redirect_egress``), a counting iptables rule in each node's FORWARD chain and
the node's ``Ip: ForwDatagrams`` (/proc/net/snmp), which count while the node's stack forwards and
stay flat once host routing does.
"""

from __future__ import annotations

import ctypes as ct
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest
from structs import assert_c_layouts, fields

from labkit import nsexec
from labkit.datapath.base import PodIface
from labkit.errors import LabkitError

pytestmark = pytest.mark.timeout(240)

BPF_DIR = Path(__file__).resolve().parents[1] / "bpf"
KERNEL = ("root", "bcc-compile", "tc-clsact")
NODES = ("n1", "n2")
LAB = f"lkhr{os.getpid() % 10000}"
SPEC = {
    "name": LAB, "datapath": "ebpf", "policy_engine": "none",
    "nodes": [
        {"name": "n1", "pods": [{"name": "a"}, {"name": "b", "labels": {"app": "web"}},
                                {"name": "d", "mode": "bridge"}]},
        {"name": "n2", "pods": [{"name": "c", "labels": {"app": "web"}}]},
    ],
    "services": [{"name": "web", "port": 80, "target_port": 8080, "selector": {"app": "web"}}],
}
TC_VIP = "10.96.200.1"  # a Service only ebpf-tc knows (socket-LB leaves it alone)

# In a pod: one TCP connection to host:port; "echo": 5 messages of 64 bytes echoed back, prints ok;
# "who": an HTTP GET, prints the name of the pod that answered. An error prints error:<kind>.
CLIENT = r"""
import socket, sys
host, port, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    s = socket.create_connection((host, port), timeout=1.5)
    s.settimeout(1.5)
    if what == "who":
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        print(data.split(b"\r\n\r\n", 1)[1].decode().strip())
    else:
        for i in range(5):
            msg = bytes([65 + i]) * 64
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                chunk = s.recv(len(msg) - len(got))
                if not chunk:
                    raise ConnectionResetError("closed")
                got += chunk
            assert got == msg, got
        print("ok")
    s.close()
except OSError as exc:
    print("error:" + type(exc).__name__)
"""


# ---------------------------------------------------------------- struct contract

@pytest.mark.needs("gcc")
def test_c_layouts_match_as_gcc_sees_them(tmp_path):
    from labkit import hostrouting as H

    # only the declarations of lib/host_routing.h: its helpers need bcc's rewriter and kernel headers
    header = (BPF_DIR / "lib" / "host_routing.h").read_text().split("LK_MAP(")[0] + "\n#endif\n"
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "host_routing.h").write_text(header)
    shutil.copy(BPF_DIR / "lib" / "common.h", tmp_path / "lib" / "common.h")
    assert_c_layouts(H.C_STRUCTS, H.C_CONSTANTS, ['#include "lib/host_routing.h"'], tmp_path, tmp_path,
                     werror=False)
    assert set(H.C_CONSTANTS) >= {"HR_STAT_REDIRECT_PEER", "HR_STAT_REDIRECT_NEIGH", "HR_STAT_PASS"}
    ep = H.HostEndpoint(7, 1, (ct.c_uint8 * 6)(*range(6)), (ct.c_uint8 * 6)(*range(6, 12)), 0)
    packed = H.Endpoint("p", "10.0.0.1", "lx-p", 7, "00:01:02:03:04:05", "06:07:08:09:0a:0b", True).packed()
    assert packed == (bytes([10, 0, 0, 1]), bytes(ep))


@pytest.mark.needs("root", "bcc-compile")
def test_bcc_typed_views_of_the_maps_match():
    bcc = pytest.importorskip("bcc")
    from labkit import hostrouting as H
    from labkit.ebpf.loader import flatten_source

    types = {"hash": 1, "percpu_array": 6}
    bpf = bcc.BPF(text=flatten_source(BPF_DIR / "bpf_host.c").encode())
    try:
        for spec in H.MAPS:
            table = bpf[spec.name.encode()]
            assert table.ttype == types[spec.kind], spec.name
            assert table.max_entries == spec.max_entries, spec.name
            leaf = table.Leaf._type_ if spec.kind.startswith("percpu") else table.Leaf
            for ours, theirs in ((spec.key, table.Key), (spec.leaf, leaf)):
                assert ct.sizeof(theirs) == ct.sizeof(ours), spec.name
                if issubclass(ours, ct.Structure):
                    assert fields(theirs) == fields(ours), f"{spec.name}: {ours.__name__}"
        for prog in H.PROGRAMS:  # and the verifier takes both programs
            bpf.load_func(prog.name.encode(), bcc.BPF.SCHED_CLS)
    finally:
        bpf.cleanup()


HELPERS = {"skb_store_bytes": 9, "l3_csum_replace": 10, "redirect": 23, "skb_load_bytes": 26,
           "redirect_neigh": 152, "redirect_peer": 155}  # BPF_FUNC_* of uapi/linux/bpf.h


def helper_calls(code: bytes) -> list[int]:
    """The BPF_FUNC_* ids a program's bytecode (before the verifier) calls."""
    insns = (struct.unpack_from("<BBhi", code, i) for i in range(0, len(code), 8))
    return [imm for op, regs, _, imm in insns if op == 0x85 and regs >> 4 == 0]  # BPF_JMP|BPF_CALL, a helper


@pytest.mark.needs("root", "bcc-compile")
def test_programs_touch_headers_in_place():
    """Every packet of a pod's round trip runs both programs (issue 14): they read and rewrite the
    headers in place, without a helper call per field (bpf_skb_load_bytes / _store_bytes /
    bpf_l3_csum_replace: about half their run time before), and forward to a resolved next hop with
    bpf_redirect and the FIB's MAC addresses, bpf_redirect_neigh only when it is not resolved."""
    bcc = pytest.importorskip("bcc")
    from labkit import hostrouting as H
    from labkit.ebpf.loader import flatten_source

    bpf = bcc.BPF(text=flatten_source(BPF_DIR / "bpf_host.c").encode())
    try:
        calls = {p.name: helper_calls(bpf.dump_func(p.name.encode())) for p in H.PROGRAMS}
    finally:
        bpf.cleanup()
    slow = {HELPERS[h] for h in ("skb_store_bytes", "l3_csum_replace", "skb_load_bytes")}
    assert not {name: slow & set(ids) for name, ids in calls.items() if slow & set(ids)}, calls
    assert {HELPERS["redirect"], HELPERS["redirect_neigh"]} <= set(calls[H.FROM_CONTAINER]), calls
    # in a netkit device's own list the program runs in the pod's transmit, where the kernel drops a
    # bpf_redirect_peer (tc ingress only): local pods are reached through their device's egress there
    assert HELPERS["redirect_peer"] in calls[H.FROM_CONTAINER], calls
    assert HELPERS["redirect_peer"] not in calls[H.FROM_NETKIT], calls
    assert {HELPERS["redirect"], HELPERS["redirect_neigh"]} <= set(calls[H.FROM_NETKIT]), calls


def test_clients_order_on_a_netkit_list():
    """On a netkit device the clients' programs share one list per direction; each goes before the
    first program of a client that runs later (tc's priority order), whoever attached first, and
    programs of no labkit client do not move it."""
    from labkit import hostrouting
    from labkit.datapath import ebpf as dp
    from labkit.ebpf.tc import CLIENTS, client_of, netkit_position
    from labkit.policy import ebpf as pol

    assert pol.TC_PREF < dp.TC_PREF < hostrouting.TC_PREF  # policy, Service NAT, host routing
    assert [client_of(n) for n in ("lk_pol_from_pod", "lk_from_contain", "lk_host_from_ne", "cil_from_co")] == [
        "lk_pol_", "lk_", "lk_host_", None]  # kernel names are cut at 15 characters
    listed = [(7, 70, "lk_from_contain"), (9, 90, "lk_host_from_ne")]
    assert netkit_position(listed, CLIENTS["lk_pol_"]) == 7  # the policy engine attached last goes first
    assert netkit_position(listed, CLIENTS["lk_"]) == 9  # a re-attached Service program: before host routing
    assert netkit_position(listed, CLIENTS["lk_host_"]) is None  # host routing: at the end
    assert netkit_position([(3, 30, "cil_from_co"), *listed], CLIENTS["lk_pol_"]) == 7
    assert netkit_position([], CLIENTS["lk_"]) is None


# ---------------------------------------------------------------- no kernel

def test_preflight_refuses_what_it_would_bypass():
    from labkit.hostrouting import BpfHostRouting

    for datapath in ("iptables-nft", "iptables-legacy", "ipvs", "nftables"):
        with pytest.raises(LabkitError, match=f"datapath {datapath} translates Services"):
            BpfHostRouting.preflight(datapath)
    with pytest.raises(LabkitError, match="policy engine iptables enforces"):
        BpfHostRouting.preflight("ebpf", "iptables")


def test_which_pods_it_takes():
    from labkit.hostrouting import why_not

    def pod(mode: str, ifname: str = "lx-p") -> PodIface:
        return PodIface("p", ifname, "lk-x.p", "10.0.0.2", mode)

    assert why_not(pod("veth")) is None
    assert why_not(pod("eni-policy-route")) is None
    assert "not a routed veth" in why_not(pod("bridge"))
    assert "not a routed veth" in why_not(pod("overlay"))
    assert why_not(pod("eni-exclusive", "")) == "no node-side veth"
    assert why_not(pod("macvlan", "")) == "no node-side veth"


# ---------------------------------------------------------------- the lab

@pytest.fixture(scope="module")
def lab():
    from labkit import lab as labmod
    from labkit.spec import parse_spec

    labmod.down(LAB)
    try:
        yield labmod.up(parse_spec(SPEC), progress=False)
    finally:
        labmod.down(LAB)
        assert not nsexec.list_netns(f"lk-{LAB}.")


def _ctx(lab, node: str):
    ctx = lab.backend.node_context(lab.spec, node, lab.plan)
    ctx.state_dir.mkdir(parents=True, exist_ok=True)
    return ctx


@pytest.fixture
def hosts(lab):
    """Host routing synced on both nodes; removed after the test, whatever happened."""
    from labkit.hostrouting import BpfHostRouting

    made = {node: BpfHostRouting(_ctx(lab, node)) for node in NODES}
    try:
        for hr in made.values():
            hr.sync()
        yield made
    finally:
        for hr in made.values():
            hr.cleanup()


def ip(lab, pod: str) -> str:
    return str(lab.plan.pods[pod].ip)


def client(lab, pod: str, host: str, port: int = 8080, what: str = "echo") -> str:
    return lab.exec(pod, [sys.executable, "-c", CLIENT, host, str(port), what]).stdout.strip()


def node_ns(node: str) -> str:
    return f"lk-{LAB}.{node}"


def forwarded(node: str) -> int:
    """Ip: ForwDatagrams of a node: packets its IP stack forwarded."""
    lines = [ln.split() for ln in nsexec.run(["cat", "/proc/net/snmp"], node_ns(node)).stdout.splitlines()
             if ln.startswith("Ip:")]
    return int(lines[1][lines[0].index("ForwDatagrams")])


def netfilter_seen(node: str) -> int:
    """Packets the counting rule in the node's FORWARD chain has seen."""
    out = nsexec.run(["iptables-nft", "-w", "-nvxL", "FORWARD"], node_ns(node)).stdout
    return sum(int(ln.split()[0]) for ln in out.splitlines() if "lkhr-count" in ln)


@pytest.fixture
def counting_rules(lab):
    for node in NODES:
        nsexec.run(["iptables-nft", "-w", "-A", "FORWARD", "-m", "comment", "--comment", "lkhr-count"], node_ns(node))
    try:
        yield
    finally:
        for node in NODES:
            nsexec.run(["iptables-nft", "-w", "-D", "FORWARD", "-m", "comment", "--comment", "lkhr-count"],
                       node_ns(node), check=False)


def stack_counts() -> dict[str, tuple[int, int]]:
    return {node: (forwarded(node), netfilter_seen(node)) for node in NODES}


def deltas(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {node: {k: after[node][k] - before[node][k] for k in after[node]} for node in after}


def tc_filters(netns: str, ifname: str, direction: str = "ingress") -> list[tuple[int, str]]:
    """(priority, name) of the bpf filters on one hook, in the order tc runs them."""
    text = nsexec.run(["tc", "-j", "filter", "show", "dev", ifname, direction], netns).stdout
    return sorted((f["pref"], f["options"]["bpf_name"]) for f in json.loads(text or "[]")
                  if f.get("kind") == "bpf" and "options" in f)


# ---------------------------------------------------------------- kernel tests

@pytest.mark.needs(*KERNEL, "iptables-nft")
def test_pod_traffic_skips_the_node_stack(lab, counting_rules):
    """Kernel routing first (the probes count), then host routing: same-node traffic goes by
    bpf_redirect_peer only, cross-node by bpf_redirect_neigh out and bpf_redirect_peer in, and
    neither node's stack forwards a packet or shows one to netfilter."""
    from labkit.hostrouting import BpfHostRouting

    before = stack_counts()
    assert client(lab, "a", ip(lab, "b")) == "ok"
    assert client(lab, "a", ip(lab, "c")) == "ok"
    kernel = stack_counts()
    assert kernel["n1"][0] - before["n1"][0] >= 20 and kernel["n1"][1] - before["n1"][1] >= 20, (before, kernel)
    assert kernel["n2"][0] - before["n2"][0] >= 10 and kernel["n2"][1] - before["n2"][1] >= 10, (before, kernel)

    hrs = {node: BpfHostRouting(_ctx(lab, node)) for node in NODES}
    try:
        for hr in hrs.values():
            res = hr.sync()
            assert res.via_egress == 0 and res.written == res.endpoints
        assert hrs["n1"].describe()["endpoints"] == {"a": "peer", "b": "peer"}
        assert hrs["n1"].describe()["skipped"] == {"d": "mode bridge is not a routed veth"}
        assert tc_filters(node_ns("n1"), "lx-a") == [(0x4C52, "lk_host_from_container")]
        assert tc_filters(node_ns("n1"), "eth0") == [(0x4C52, "lk_host_from_netdev")]

        stats0 = {node: hr.stats() for node, hr in hrs.items()}
        stack0 = stack_counts()
        assert client(lab, "a", ip(lab, "b")) == "ok"
        same = deltas(stats0, {node: hr.stats() for node, hr in hrs.items()})
        # a SYN, 5 messages, FIN and their answers, each way: all straight into the other pod
        assert same["n1"]["redirect_peer"] >= 14 and same["n1"]["redirect_neigh"] == 0, same
        assert same["n2"]["redirect_peer"] == same["n2"]["redirect_neigh"] == 0, same
        assert stack_counts() == stack0

        stats1 = {node: hr.stats() for node, hr in hrs.items()}
        assert client(lab, "a", ip(lab, "c")) == "ok"
        cross = deltas(stats1, {node: hr.stats() for node, hr in hrs.items()})
        for node in NODES:  # out through the FIB's next hop, in through the peer
            assert cross[node]["redirect_neigh"] >= 7 and cross[node]["redirect_peer"] >= 7, cross
            assert cross[node]["redirect_egress"] == 0, cross
        assert stack_counts() == stack0, "the node's stack forwarded pod traffic"
    finally:
        for hr in hrs.values():
            hr.cleanup()
    # without it the nodes forward again
    assert client(lab, "a", ip(lab, "c")) == "ok"
    assert stack_counts() != stack0


def pod_ip_counts(lab, pod: str) -> dict[str, int]:
    """The pod's Ip: OutRequests (IPv4 packets its stack sent) and InReceives (received)."""
    head, values = [ln.split() for ln in nsexec.run(["cat", "/proc/net/snmp"], lab.pod_netns(pod)).stdout.splitlines()
                    if ln.startswith("Ip:")][:2]
    return {k: int(values[head.index(k)]) for k in ("OutRequests", "InReceives")}


@pytest.mark.needs(*KERNEL, "gcc")  # gcc: lkclient
def test_every_packet_of_a_cross_node_exchange_takes_the_fast_path(lab, hosts):
    """A TCP_RR exchange from a (n1) to c (n2), counted packet by packet: every IPv4 packet a sent
    left n1 by the FIB path and entered c by bpf_redirect_peer on n2, and back the same way; none
    was left to a node's stack (Ip: ForwDatagrams flat). With the next hop's neighbour resolved the
    programs write the MACs themselves (bpf_redirect: ``neigh_unresolved`` stays 0); with n1's
    neighbours flushed, bpf_redirect_neigh resolves the gateway and the exchange still completes."""
    from labkit.measure import loadgen

    def exchange(samples: int) -> tuple[dict, dict, dict]:
        stats0 = {node: hr.stats() for node, hr in hosts.items()}
        pods0 = {pod: pod_ip_counts(lab, pod) for pod in ("a", "c")}
        fwd0 = {node: forwarded(node) for node in NODES}
        res = loadgen.run_client(lab.pod_netns("a"), "rr", ip(lab, "c"), 8080, samples=samples, warmup=0)
        assert res["errors"] == 0, res
        stats = deltas(stats0, {node: hr.stats() for node, hr in hosts.items()})
        pods = {pod: {k: v - pods0[pod][k] for k, v in pod_ip_counts(lab, pod).items()} for pod in ("a", "c")}
        assert {node: forwarded(node) - fwd0[node] for node in NODES} == {"n1": 0, "n2": 0}
        return stats, pods, res

    exchange(20)  # neighbours resolved
    stats, pods, _ = exchange(500)
    assert pods["a"]["OutRequests"] >= 500 and pods["c"]["OutRequests"] >= 500, pods
    assert stats["n1"]["redirect_neigh"] == pods["a"]["OutRequests"] == stats["n2"]["redirect_peer"], (stats, pods)
    assert stats["n2"]["redirect_neigh"] == pods["c"]["OutRequests"] == stats["n1"]["redirect_peer"], (stats, pods)
    assert pods["c"]["InReceives"] == pods["a"]["OutRequests"] and pods["a"]["InReceives"] == pods["c"]["OutRequests"]
    assert all(s["neigh_unresolved"] == 0 and s["redirect_egress"] == 0 for s in stats.values()), stats

    nsexec.run(["ip", "neigh", "flush", "dev", "eth0"], node_ns("n1"))
    stats, pods, _ = exchange(50)
    assert stats["n1"]["neigh_unresolved"] >= 1, stats  # the first packet to the gateway
    assert stats["n1"]["redirect_neigh"] == pods["a"]["OutRequests"], (stats, pods)


@pytest.mark.needs(*KERNEL, "cgroup2")
def test_lab_check_and_a_service_through_socket_lb(lab, hosts):
    """Every pair of pods (the bridged pod too, left to the node's stack), the Service through
    socket-LB from every pod: all answer with host routing on."""
    rows = lab.check()
    bad = [f"{r.kind} {r.src}->{r.dst}: expected {r.expected}, got {r.observed}" for r in rows if not r.ok]
    assert not bad, bad
    assert {r.kind for r in rows} == {"pod", "service"} and len(rows) >= 16
    vip = next(iter(lab.services())).cluster_ip
    seen = {client(lab, "a", vip, 80, "who") for _ in range(20)}
    assert seen == {"b", "c"}, seen  # both backends, one on each node
    stats = {node: hr.stats() for node, hr in hosts.items()}
    assert all(s["redirect_peer"] > 0 and s["redirect_neigh"] > 0 for s in stats.values()), stats


@pytest.mark.needs(*KERNEL, "cgroup2")
def test_runs_after_the_policy_engine_and_ebpf_tc(lab, hosts):
    """The ebpf policy engine (0x4C40) and ebpf-tc (0x4C4B) on n1's pod veths, host routing after
    them (0x4C52): ebpf-tc's DNAT happens before host routing forwards; a pod whose veth egress holds
    other filters is delivered through that egress, so b's ingress policy still holds; host
    routing's cleanup leaves exactly their filters."""
    from labkit.datapath.ebpf import TcLB
    from labkit.policy.ebpf import EbpfPolicy
    from labkit.policy.model import CompiledPolicy, PodPolicy, PolicyTable
    from labkit.services import Endpoint, ServicePort, ServiceTable

    ctx = _ctx(lab, "n1")
    ctx = type(ctx)(**{**ctx.__dict__, "pods": tuple(p for p in ctx.pods if p.pod in ("a", "b"))})
    hr = hosts["n1"]
    others = {"service": TcLB(ctx), "policy": EbpfPolicy(ctx, "ebpf-tc")}
    ns = node_ns("n1")
    try:
        others["service"].sync(ServiceTable.of([ServicePort("default", "tc-web", "", "TCP", TC_VIP, 80,
                                                            (Endpoint(ip(lab, "c"), 8080, "c"),))]))
        others["policy"].sync(PolicyTable({"deny-b": CompiledPolicy("deny-b", (), None)}, {}, {
            "a": PodPolicy("a", ip(lab, "a"), "veth", None, None),
            "b": PodPolicy("b", ip(lab, "b"), "veth", ("deny-b",), None)}))
        assert hr.describe()["stale"]  # other filters on the veths' egress since host routing synced
        res = hr.sync()
        assert res.via_egress == 2 and not hr.describe()["stale"]
        assert hr.describe()["endpoints"] == {"a": "egress", "b": "egress"}
        ingress = [(0x4C40, "lk_pol_from_pod"), (0x4C4B, "lk_from_container"), (0x4C52, "lk_host_from_container")]
        for ifname in ("lx-a", "lx-b"):
            assert tc_filters(ns, ifname) == ingress
            assert tc_filters(ns, ifname, "egress") == [(0x4C40, "lk_pol_to_pod"), (0x4C4B, "lk_to_container")]

        s0 = hr.stats()
        assert client(lab, "a", ip(lab, "b")) == "error:TimeoutError"  # dropped at lx-b's egress, by policy
        assert others["policy"].describe()["stats"]["denied"] >= 1
        assert hr.stats()["redirect_egress"] - s0["redirect_egress"] >= 1  # host routing took it there
        s1 = hr.stats()
        # to the ClusterIP only ebpf-tc knows: DNATed to c at lx-a, then forwarded by host routing; c's
        # replies come in at eth0 and go to a through lx-a's egress, where ebpf-tc restores the ClusterIP
        assert client(lab, "a", TC_VIP, 80, "who") == "c"
        assert client(lab, "a", TC_VIP, 80) == "ok"
        s2 = hr.stats()
        assert s2["redirect_neigh"] - s1["redirect_neigh"] >= 7 and s2["redirect_egress"] - s1["redirect_egress"] >= 7
        assert client(lab, "b", ip(lab, "a")) == "ok"  # b is isolated for ingress only

        hr.cleanup()
        for ifname in ("lx-a", "lx-b"):
            assert tc_filters(ns, ifname) == ingress[:2]
            assert tc_filters(ns, ifname, "egress") == [(0x4C40, "lk_pol_to_pod"), (0x4C4B, "lk_to_container")]
        assert tc_filters(ns, "eth0") == []
        assert client(lab, "a", ip(lab, "b")) == "error:TimeoutError"
        assert client(lab, "a", TC_VIP, 80, "who") == "c"
    finally:
        for other in others.values():
            other.cleanup()
        # host routing made the clsact qdiscs, and left before the others: the last one out keeps
        # them (the tc lifecycle removes only the qdiscs its client made); the next tests want none
        for ifname in ("lx-a", "lx-b"):
            nsexec.run(["tc", "qdisc", "del", "dev", ifname, "clsact"], ns, check=False)
    assert tc_filters(ns, "lx-a") == [] and client(lab, "a", ip(lab, "b")) == "ok"


@pytest.mark.needs(*KERNEL)
def test_sync_follows_the_pods_it_is_given(lab, hosts):
    """A pod no longer given loses its filter and its map entry: traffic to it goes by the FIB
    (bpf_redirect_neigh to its veth), its own by the node's stack; given again, by the peer."""
    hr = hosts["n1"]
    pods = {p.pod: p for p in hr.ctx.pods}
    res = hr.sync([pods["a"]])
    assert res.endpoints == 1 and res.deleted == 1
    assert tc_filters(node_ns("n1"), "lx-b") == [] and tc_filters(node_ns("n1"), "lx-a") != []
    assert [ep.pod for ep in hr.recorded()] == ["a"]
    s0 = hr.stats()
    assert client(lab, "a", ip(lab, "b")) == "ok"
    s1 = hr.stats()
    # a's packets to b by the FIB (the /32 route over lx-b); b's replies by the node's stack
    assert s1["redirect_neigh"] - s0["redirect_neigh"] >= 7 and s1["redirect_peer"] == s0["redirect_peer"]
    res = hr.sync()
    assert res.endpoints == 2 and res.written == 1 and res.compile_seconds is None  # pinned: not recompiled
    assert client(lab, "a", ip(lab, "b")) == "ok"
    s2 = hr.stats()
    assert s2["redirect_peer"] - s1["redirect_peer"] >= 14 and s2["redirect_neigh"] == s1["redirect_neigh"]


@pytest.mark.needs(*KERNEL)
def test_cleanup_from_another_instance_leaves_nothing(lab, hosts):
    from labkit.hostrouting import BpfHostRouting

    hr = hosts["n1"]
    assert hr.describe()["attached"]
    fresh = BpfHostRouting(hr.ctx)  # what a later process sees: the journal and the pins
    assert fresh.describe()["endpoints"] == {"a": "peer", "b": "peer"} and fresh.describe()["attached"]
    fresh.cleanup()
    fresh.cleanup()  # twice is fine
    ns = node_ns("n1")
    for ifname in ("lx-a", "lx-b", "eth0"):
        assert tc_filters(ns, ifname) == []
        assert "clsact" not in nsexec.run(["tc", "qdisc", "show", "dev", ifname], ns).stdout  # it made them
    assert not fresh.state_file.exists() and not (fresh.fs.dir).exists()
    assert not fresh.describe()["attached"] and not fresh.describe()["pinned"]
    assert client(lab, "a", ip(lab, "b")) == "ok" and client(lab, "a", ip(lab, "c")) == "ok"


@pytest.mark.needs(*KERNEL)
def test_the_spec_field_builds_it_and_down_removes_it():
    """``host_routing: bpf`` in a spec: ``up`` attaches host routing on every node after the Service
    datapath, the lab's own check passes through it (Services included), cross-node pod traffic no
    longer goes through the nodes' IP forwarding, and ``down`` leaves nothing."""
    from labkit import lab as labmod
    from labkit.hostrouting import BpfHostRouting
    from labkit.spec import parse_spec

    name = f"lkhs{os.getpid() % 10000}"
    labmod.down(name)
    try:
        lb = labmod.up(parse_spec({**SPEC, "name": name, "host_routing": "bpf"}), progress=False)
        for node in NODES:
            described = BpfHostRouting(_ctx(lb, node)).describe()
            assert described["attached"], (node, described)
        results = lb.check()
        assert results and all(r.ok for r in results), [r for r in results if not r.ok]
        ns = f"lk-{name}.n1"

        def forwarded_here() -> int:
            head, values = [ln.split() for ln in nsexec.run(["cat", "/proc/net/snmp"], ns).stdout.splitlines()
                            if ln.startswith("Ip:")][:2]
            return int(values[head.index("ForwDatagrams")])

        before = forwarded_here()
        for _ in range(5):
            assert client(lb, "a", ip(lb, "c")) == "ok"
        assert forwarded_here() - before < 5  # 5 connections of ~20 packets each went past the node's stack
    finally:
        labmod.down(name)
    assert not nsexec.list_netns(f"lk-{name}.")
