"""The eBPF datapaths (``ebpf`` socket-LB, ``ebpf-tc`` per-packet DNAT) on the real kernel.

Pure tests of the renderer come first (no root). The rest build their own small lab (root): a
routing node namespace, a client pod, an outsider and three backend pods, each on a veth pair to the
node (``lx-<pod>`` node side, ``eth0`` pod side), plus a cgroup folder for the "node" with the
client's folder inside. Every namespace and cgroup name starts with ``lktest-ebpf-<pid>``; the
finalizers remove all of it even when a test fails. Backends run a tiny Python TCP+UDP server that
answers with its pod name; clients run inside the client's namespace and, for socket-LB, its
cgroup, and print what answered (or the error) as JSON.

Variants: ``ebpf`` (cgroup hooks), ``ebpf-tc`` (tc on the node-side interfaces) and ``ebpf-tc-eni``
(pods declared without a node-side interface: tc inside each pod on its eth0). The last test builds
a node of its own with two pods and puts ``ebpf-tc`` and the ``ebpf`` policy engine on the same
interfaces (the eBPF runtime's one tc lifecycle, two clients).
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from labkit import nsexec
from labkit.datapath import ebpf_structs as S
from labkit.datapath.base import NodeContext, PodIface
from labkit.errors import DatapathError
from labkit.services import Endpoint, ServicePort, ServiceTable, diff
from pods import veth_pods

pytestmark = pytest.mark.timeout(180)

PREFIX = f"lktest-ebpf-{os.getpid()}"
PORT, TARGET = 80, 8080
BACKENDS = ("be0", "be1", "be2")


KERNEL = ("root", "bcc-compile", "cgroup2", "tc-clsact")  # compiles, loads and attaches real programs


def svc(name: str, ip: str, eps: list[str], proto: str = "TCP", port: int = PORT) -> ServicePort:
    return ServicePort("default", name, "", proto, ip, port, tuple(Endpoint(e, TARGET, e) for e in eps))


# ----------------------------------------------------------------------------- renderer (no root)

def _apply(ops, maps: dict):
    """Apply MapOps to dicts standing for the three maps, in ServiceMaps.write order."""
    svc_m, be_m, rnat_m = maps["svc"], maps["be"], maps["rnat"]
    be_m.update(zip(ops.be_keys, ops.be_vals))
    rnat_m.update(zip(ops.rnat_keys, ops.rnat_vals))
    svc_m.update(zip(ops.svc_keys, ops.svc_vals))
    for k in ops.svc_del:
        svc_m.pop(k)
    for k in ops.be_del:
        be_m.pop(k)
    for k in ops.rnat_del:
        rnat_m.pop(k)


def _contents(maps: dict):
    from labkit.datapath.ebpf import MapContents

    return MapContents({k: S.unpack_lb4_service(v) for k, v in maps["svc"].items()}, dict(maps["be"]),
                       set(maps["rnat"]))


def _resolve(maps: dict, ip: str, port: int, proto: int = 6) -> list[str] | None:
    raw = maps["svc"].get(S.pack_lb4_key(ip, port, proto))
    if raw is None:
        return None
    sid, count = S.unpack_lb4_service(raw)
    return [S.unpack_lb4_backend(maps["be"][S.pack_lb4_backend_key(sid, i)])[0] for i in range(count)]


def test_render_full_then_partial_matches_a_fresh_full_render():
    from labkit.datapath.ebpf import render_full, render_partial

    t1 = ServiceTable.of([svc("a", "10.96.0.1", ["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
                          svc("b", "10.96.0.2", ["10.0.0.1"]), svc("c", "10.96.0.3", [])])
    maps = {"svc": {}, "be": {}, "rnat": {}}
    ops, ids = render_full(t1, _contents(maps))
    _apply(ops, maps)
    assert _resolve(maps, "10.96.0.1", PORT) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert _resolve(maps, "10.96.0.3", PORT) == []

    # remove an endpoint (the others keep their slots where they can), drop b, rename c, add d
    t2 = ServiceTable.of([svc("a", "10.96.0.1", ["10.0.0.2", "10.0.0.3"]),
                          svc("c2", "10.96.0.3", ["10.0.0.9"]), svc("d", "10.96.0.4", ["10.0.0.4"])])
    ops = render_partial(diff(t1, t2), ids)
    assert len(ops.svc_keys) == 3 and len(ops.svc_del) == 1  # a, c2, d written; b deleted
    _apply(ops, maps)
    assert _resolve(maps, "10.96.0.1", PORT) == ["10.0.0.3", "10.0.0.2"]  # 10.0.0.2 kept slot 1
    assert _resolve(maps, "10.96.0.2", PORT) is None
    assert _resolve(maps, "10.96.0.3", PORT) == ["10.0.0.9"]
    assert _resolve(maps, "10.96.0.4", PORT) == ["10.0.0.4"]

    # a full render on top of what the maps hold converges to the same contents, keeping ids
    before = {k: dict(v) if isinstance(v, dict) else set(v) for k, v in maps.items()}
    ops, ids2 = render_full(t2, _contents(maps))
    _apply(ops, maps)
    assert maps == before and ids2.by_key == ids.by_key and ids2.backends == ids.backends == 4
    # and a full render of an empty table empties every map
    ops, _ = render_full(ServiceTable.of([]), _contents(maps))
    _apply(ops, maps)
    assert maps == {"svc": {}, "be": {}, "rnat": {}}


def test_render_refuses_what_the_maps_cannot_hold():
    from labkit.datapath.ebpf import MapContents, render_full

    dup = ServiceTable.of([svc("a", "10.96.0.1", []), svc("b", "10.96.0.1", [])])
    with pytest.raises(DatapathError, match="both use"):
        render_full(dup, MapContents({}, {}, set()))
    sctp = ServiceTable.of([svc("a", "10.96.0.1", [], proto="SCTP")])
    with pytest.raises(DatapathError, match="SCTP"):
        render_full(sctp, MapContents({}, {}, set()))
    big = ServiceTable.of([svc(f"s{i}", str(ipaddress.IPv4Address(0x0A600000 + i)), ["10.0.0.1"] * 5)
                           for i in range(S.BE_MAP_SIZE // 5 + 1)])
    with pytest.raises(DatapathError, match="exceed lk_be_v4"):
        render_full(big, MapContents({}, {}, set()))


# ----------------------------------------------------------------------------- the lab

SERVER = r"""
import socket, sys, threading
name = sys.argv[1].encode()
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", int(sys.argv[2])))
tcp.listen(1024)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", int(sys.argv[2])))
def serve_udp():
    while True:
        _, peer = udp.recvfrom(2048)
        udp.sendto(name, peer)
threading.Thread(target=serve_udp, daemon=True).start()
print("ready", flush=True)
while True:
    conn, _ = tcp.accept()
    try:
        conn.sendall(name)
    finally:
        conn.close()
"""

CLIENT = r"""
import errno, json, socket, sys, time
mode, targets = sys.argv[1], json.loads(sys.argv[2])
opts = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
out = []
one = None
if mode == "udp-one-port":  # one socket, so one source port, for every message
    one = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    one.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    one.bind(("0.0.0.0", opts.get("sport", 0)))
    one.settimeout(1.5)
for ip, port in targets:
    try:
        if mode == "tcp":
            s = socket.create_connection((ip, port), timeout=1.5)
            s.settimeout(1.5)
            got = s.recv(64).decode()
        else:
            s = one or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(1.5)
            if mode == "udp-connected":
                s.connect((ip, port))
                s.send(b"x")
                data, src = s.recvfrom(64)
            else:
                s.sendto(b"x", (ip, port))
                data, src = s.recvfrom(64)
            got = f"{data.decode()}@{src[0]}:{src[1]}"
        if s is not one:
            s.close()
    except OSError as exc:
        got = "error:" + (errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else "timeout")
    out.append(got)
    time.sleep(opts.get("pause", 0))
print(json.dumps(out))
"""


@dataclass
class Lab:
    node: str
    netns: dict[str, str]  # pod -> namespace
    ips: dict[str, str]  # pod -> address
    cgroup: Path  # the fixture's folder (nothing attached here)
    node_cgroup: Path  # NodeContext.cgroup
    client_cgroup: Path  # inside node_cgroup
    state_dir: Path

    def ctx(self, variant: str, state_dir: Path | None = None) -> NodeContext:
        pods = tuple(PodIface(p, "" if variant == "ebpf-tc-eni" else f"lx-{p}", self.netns[p], self.ips[p],
                              "veth") for p in ("cli", *BACKENDS))
        return NodeContext(lab=PREFIX, prefix=f"lk-{PREFIX}", node="n1", netns=self.node,
                           pod_cidr="10.99.0.0/16", service_cidr="10.96.0.0/12",
                           state_dir=state_dir or self.state_dir / variant, cgroup=self.node_cgroup, pods=pods)

    def client(self, mode: str, targets: list[tuple[str, int]], pod: str = "cli", cgroup: Path | None = None,
               **opts) -> list[str]:
        """``opts``: ``pause`` (s after each target), ``sport`` (udp-one-port: its source port)."""
        cg = self.client_cgroup if cgroup is None else cgroup
        proc = nsexec.run([sys.executable, "-c", CLIENT, mode, json.dumps(targets), json.dumps(opts)],
                          self.netns[pod], cgroup=cg, timeout=120)
        return json.loads(proc.stdout)


def _build_lab(state_dir: Path, undo: list) -> Lab:
    node = f"{PREFIX}-node"
    nsexec.create_netns(node)
    undo.append(lambda: nsexec.remove_netns(node))
    nsexec.write_sysctls(node, {"net.ipv4.ip_forward": 1})
    netns, ips = veth_pods(node, ("cli", "out", *BACKENDS), PREFIX, "10.99", undo)
    assert "lx-" not in nsexec.run(["ip", "-br", "link"]).stdout  # all of it inside the lab

    cgroup = nsexec.cgroup2_root() / PREFIX
    cgroup.mkdir()
    undo.append(lambda: nsexec.remove_cgroup(cgroup))
    node_cg = cgroup / "node"
    client_cg = node_cg / "client"
    client_cg.mkdir(parents=True)
    lab = Lab(node, netns, ips, cgroup, node_cg, client_cg, state_dir)
    for pod in BACKENDS:
        proc = nsexec.spawn([sys.executable, "-u", "-c", SERVER, pod, str(TARGET)], netns[pod],
                            stdout=subprocess.PIPE)
        undo.append(lambda proc=proc: (proc.kill(), proc.wait()))
        assert proc.stdout.readline().strip() == b"ready"
    return lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    undo: list = []
    try:
        yield _build_lab(tmp_path_factory.mktemp(PREFIX), undo)
    finally:
        errors = []
        for fn in reversed(undo):
            try:
                fn()
            except Exception as exc:  # keep unwinding; report at the end
                errors.append(exc)
        assert not nsexec.list_netns(PREFIX)
        assert not errors, errors


@pytest.fixture(scope="module", params=["ebpf", "ebpf-tc", "ebpf-tc-eni"])
def dp(request, lab):
    from labkit.datapath import get

    variant = request.param
    datapath = get(variant.removesuffix("-eni"))(lab.ctx(variant))
    datapath.variant = variant
    try:
        yield datapath
    finally:
        datapath.cleanup()
        assert_nothing_left(lab, datapath)


def vip(k: int) -> str:
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.96.0.10")) + k))


def names(results: list[str]) -> list[str]:
    return [r.split("@")[0] for r in results]


# ----------------------------------------------------------------------------- inspection

def _lib():
    from labkit.ebpf.libbpf import lib

    return lib()


def attached_ids(lab: Lab, dp) -> set[int]:
    """Ids of labkit programs attached where this datapath attaches."""
    from labkit.ebpf.libbpf import cgroup_programs

    ids = set()
    if dp.name == "ebpf":
        fd = os.open(lab.node_cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for p in dp.programs:
                ids |= {i for i, n in cgroup_programs(fd, p.attach_type) if n.startswith("lk_")}
        finally:
            os.close(fd)
        return ids
    for h in dp.hooks():
        for direction in ("ingress", "egress"):
            out = nsexec.run(["tc", "-j", "filter", "show", "dev", h.ifname, direction], h.netns).stdout
            for f in json.loads(out or "[]"):
                prog = f.get("options", {}).get("prog", {})
                if str(prog.get("name", "")).startswith("lk_"):
                    ids.add(prog["id"])
    return ids


def pinned_map_ids(dp) -> set[int]:
    ids = set()
    for pin in dp.fs.maps.iterdir():
        fd = _lib().bpf_obj_get(str(pin).encode())
        info = ct.create_string_buffer(128)
        size = ct.c_uint32(len(info))
        assert _lib().bpf_obj_get_info_by_fd(fd, info, ct.byref(size)) == 0
        ids.add(int.from_bytes(info.raw[4:8], sys.byteorder))  # struct bpf_map_info.id
        os.close(fd)
    return ids


def _object_exists(kind: str, obj_id: int) -> bool:
    return nsexec.run(["bpftool", kind, "show", "id", str(obj_id)], check=False).returncode == 0


def assert_nothing_left(lab: Lab, dp, prog_ids: set[int] = frozenset(), map_ids: set[int] = frozenset()) -> None:
    """No program on the cgroup or interfaces, no qdisc we made, no pin, no mount, no state file;
    and the programs and maps that were there have been freed by the kernel."""
    assert not attached_ids(lab, dp)
    if dp.name == "ebpf":
        out = nsexec.run(["bpftool", "cgroup", "show", str(lab.node_cgroup)]).stdout
        assert "lk_" not in out
    else:
        for h in dp.hooks():
            assert "clsact" not in nsexec.run(["tc", "qdisc", "show", "dev", h.ifname], h.netns).stdout
    assert not dp.fs.mounted()
    assert not dp.fs.root.exists()
    assert not dp.state_file.exists()
    deadline = time.monotonic() + 5  # the kernel frees programs and maps after an RCU grace period
    while time.monotonic() < deadline:
        left = [("prog", i) for i in prog_ids if _object_exists("prog", i)]
        left += [("map", i) for i in map_ids if _object_exists("map", i)]
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"still in the kernel: {left}"


# ----------------------------------------------------------------------------- kernel tests

@pytest.mark.needs(*KERNEL)
def test_socket_lb_refuses_to_attach_outside_a_lab_cgroup(lab, tmp_path):
    from labkit.datapath.ebpf import SocketLB

    table = ServiceTable.of([svc("a", vip(0), [lab.ips["be0"]])])
    for cgroup, why in ((None, "no cgroup"), (nsexec.cgroup2_root(), "cgroup v2 root"),
                        (Path("/sys/fs/cgroup"), "not a folder of a cgroup v2"),
                        (lab.cgroup / "missing", "does not exist")):
        ctx = lab.ctx("ebpf", state_dir=tmp_path / "refused")
        ctx = NodeContext(**{**ctx.__dict__, "cgroup": cgroup})
        with pytest.raises(DatapathError, match=why):
            SocketLB(ctx).sync(table)
        assert not (tmp_path / "refused" / "bpffs").exists()  # refused before touching anything


@pytest.mark.needs(*KERNEL)
def test_tcp_to_cluster_ip_spreads_over_endpoints(lab, dp):
    dp.sync(ServiceTable.of([svc("web", vip(0), [lab.ips[b] for b in BACKENDS])]))
    got = names(lab.client("tcp", [(vip(0), PORT)] * 300))
    counts = {b: got.count(b) for b in BACKENDS}
    assert sum(counts.values()) == 300, got[:5]
    # binomial(300, 1/3): mean 100, sd 8.2; [59, 141] is +-5 sd (false alarm ~1e-6)
    assert all(59 <= c <= 141 for c in counts.values()), counts
    assert attached_ids(lab, dp)


@pytest.mark.needs(*KERNEL)
def test_udp_replies_come_from_the_cluster_ip(lab, dp):
    dp.sync(ServiceTable.of([svc("dns", vip(1), [lab.ips[b] for b in BACKENDS], proto="UDP")]))
    modes = ("udp", "udp-connected") if dp.name == "ebpf" else ("udp",)
    for mode in modes:
        got = lab.client(mode, [(vip(1), PORT)] * 30)
        assert all(r.endswith(f"@{vip(1)}:{PORT}") for r in got), got
        assert set(names(got)) <= set(BACKENDS) and len(set(names(got))) >= 2, got


@pytest.mark.needs(*KERNEL)
def test_a_udp_flow_keeps_its_backend_until_it_idles_out(lab, dp):
    """One UDP socket (one source port) talking to a Service. ebpf-tc (conntrack-lite): the flow
    keeps its backend while it is busy and is balanced afresh once idle past its lifetime (Cilium's
    60 s by default; 300 ms here, set through lk_ct_cfg). ebpf (socket-LB, unconnected UDP):
    sendmsg picks a backend per message, there is no flow to keep."""
    dp.sync(ServiceTable.of([svc("dns", vip(1), [lab.ips[b] for b in BACKENDS], proto="UDP")]))
    target = [(vip(1), PORT)]
    if dp.name == "ebpf":
        got = lab.client("udp-one-port", target * 60)
        assert all(r.endswith(f"@{vip(1)}:{PORT}") for r in got), got
        assert set(names(got)) == set(BACKENDS), got  # a backend missed 60 times: ~1e-10
        return

    def rounds(n: int) -> list[list[str]]:
        out = []
        for _ in range(n):  # 8 messages 20 ms apart, then idle 0.5 s (a new process, same port)
            got = lab.client("udp-one-port", target * 8, pause=0.02, sport=45678)
            assert all(r.endswith(f"@{vip(1)}:{PORT}") for r in got), got
            out.append(names(got))
            time.sleep(0.5)
        return out

    dp.set_ct_timeouts(nontcp_ms=300)
    try:
        busy = rounds(12)
        assert all(len(set(r)) == 1 for r in busy), busy  # a busy flow keeps its backend
        # idle past its lifetime, balanced afresh: one backend for all 12 rounds ~6e-6
        assert len({r[0] for r in busy}) >= 2, busy
    finally:
        dp.set_ct_timeouts()  # Cilium's defaults again: a UDP flow lives 60 s idle
    kept = rounds(4)
    assert len({b for r in kept for b in r}) == 1, kept


@pytest.mark.needs(*KERNEL)
def test_endpoint_removal_and_services_without_endpoints(lab, dp):
    all_eps = [lab.ips[b] for b in BACKENDS]
    t1 = ServiceTable.of([svc("web", vip(0), all_eps), svc("dns", vip(1), all_eps, proto="UDP")])
    dp.sync(t1)
    t2 = t1.with_ports(svc("web", vip(0), all_eps[1:]), svc("dns", vip(1), all_eps[1:], proto="UDP"))
    result = dp.sync(t2)
    assert not result.full and result.changed == 2
    got = names(lab.client("tcp", [(vip(0), PORT)] * 60))
    assert "be0" not in got and set(got) == {"be1", "be2"}, got
    got = names(lab.client("udp", [(vip(1), PORT)] * 20))
    assert "be0" not in got and set(got) <= {"be1", "be2"}, got

    # no endpoints: refused at once (socket-LB: connect() gets ECONNREFUSED from the hook; tc: an
    # ICMP port unreachable comes back from the ClusterIP), never a timeout
    dp.sync(t2.with_ports(svc("web", vip(0), []), svc("dns", vip(1), [], proto="UDP")))
    t0 = time.monotonic()
    assert lab.client("tcp", [(vip(0), PORT)] * 5) == ["error:ECONNREFUSED"] * 5
    udp_mode = "udp" if dp.name == "ebpf" else "udp-connected"  # an ICMP error reaches connected sockets
    assert lab.client(udp_mode, [(vip(1), PORT)] * 3) == ["error:ECONNREFUSED"] * 3
    assert time.monotonic() - t0 < 5
    dp.sync(t1)
    assert set(names(lab.client("tcp", [(vip(0), PORT)] * 30))) == set(BACKENDS)


@pytest.mark.needs(*KERNEL)
def test_twenty_thousand_services(lab, dp):
    n = 20000
    table = ServiceTable.of([svc(f"s{k}", vip(k), [lab.ips[BACKENDS[k % 3]]]) for k in range(n)])
    result = dp.sync(table)
    assert result.services == n
    assert result.seconds < 3, result  # benchmarks/bench_ebpf.py measures this properly
    picks = random.Random(7).sample(range(n), 20)
    got = names(lab.client("tcp", [(vip(k), PORT) for k in picks]))
    assert got == [BACKENDS[k % 3] for k in picks]
    # one more service at 20k is one small partial update
    extra = svc("extra", vip(n), [lab.ips["be1"]])
    result = dp.sync(table.with_ports(extra))
    assert not result.full and result.added == 1 and result.seconds < 0.05, result
    assert names(lab.client("tcp", [(vip(n), PORT)])) == ["be1"]
    dp.sync(ServiceTable.of([]))
    assert dp.describe()["map_services"] == 0 and dp.describe()["map_backends"] == 0


@pytest.mark.needs(*KERNEL)
def test_a_pod_reaches_itself_through_a_service(lab, dp):
    # hairpin: the client is the service's only endpoint (tc: its packets come back to it from the
    # ClusterIP, and its replies are turned round before they leave)
    dp.sync(ServiceTable.of([svc("self", vip(4), [lab.ips["be0"]]),
                             svc("self-udp", vip(4), [lab.ips["be0"]], proto="UDP")]))
    assert names(lab.client("tcp", [(vip(4), PORT)] * 5, pod="be0")) == ["be0"] * 5
    assert lab.client("udp", [(vip(4), PORT)] * 5, pod="be0") == [f"be0@{vip(4)}:{PORT}"] * 5


@pytest.mark.needs(*KERNEL)
def test_never_acts_outside_the_lab(lab, dp):
    dp.sync(ServiceTable.of([svc("web", vip(0), [lab.ips[b] for b in BACKENDS])]))
    if dp.name == "ebpf":
        # same namespace, but a process outside the node's cgroup: its connect() is not rewritten
        got = lab.client("tcp", [(vip(0), PORT)] * 2, cgroup=lab.cgroup)
    else:
        # a pod the datapath was not given: nothing attached on its interface
        got = lab.client("tcp", [(vip(0), PORT)] * 2, pod="out")
    # the ClusterIP is routed nowhere: the node answers "unreachable" (or, rate-limited, nothing)
    assert set(got) <= {"error:ENETUNREACH", "error:EHOSTUNREACH", "error:timeout"}, got
    # while the lab's own client is translated
    assert set(names(lab.client("tcp", [(vip(0), PORT)] * 20))) <= set(BACKENDS)


SURVIVOR = r"""
import json, os, signal, sys
from pathlib import Path
from labkit.datapath import get
from labkit.datapath.base import NodeContext, PodIface
from labkit.services import Endpoint, ServicePort, ServiceTable
args = json.loads(sys.argv[1])
ctx = NodeContext(**{**args["ctx"], "state_dir": Path(args["ctx"]["state_dir"]),
                     "cgroup": Path(args["ctx"]["cgroup"]), "pods": tuple(PodIface(*p) for p in args["ctx"]["pods"])})
dp = get(args["datapath"])(ctx)
dp.sync(ServiceTable.of([ServicePort("default", "web", "", "TCP", args["vip"], args["port"],
                                     tuple(Endpoint(ip, args["target"]) for ip in args["eps"]))]))
print("synced", flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: what a crash leaves
"""


@pytest.mark.needs(*KERNEL)
def test_state_survives_the_loading_process(lab, dp):
    dp.cleanup()  # this test wants the loader to be another process
    ctx = dp.ctx
    args = {"datapath": dp.name, "vip": vip(2), "port": PORT, "target": TARGET,
            "eps": [lab.ips["be0"], lab.ips["be1"]],
            "ctx": {**ctx.__dict__, "state_dir": str(ctx.state_dir), "cgroup": str(ctx.cgroup),
                    "pods": [list(p.__dict__.values()) for p in ctx.pods]}}
    proc = subprocess.run([sys.executable, "-c", SURVIVOR, json.dumps(args)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == -signal.SIGKILL and "synced" in proc.stdout, proc.stderr[-3000:]

    # the loader is gone: its programs are still attached and its maps still answer
    assert set(names(lab.client("tcp", [(vip(2), PORT)] * 30))) == {"be0", "be1"}
    prog_ids = attached_ids(lab, dp)
    assert prog_ids

    # a fresh instance (another process's view) finds the pinned maps and updates them in place
    from labkit.datapath import get

    fresh = get(dp.name)(ctx)
    assert fresh.describe()["map_services"] == 1 and fresh.describe()["attached"]
    t2 = ServiceTable.of([svc("web", vip(2), [lab.ips["be2"]]), svc("db", vip(3), [lab.ips["be1"]])])
    result = fresh.sync(t2)
    assert result.full and fresh.compile_seconds is None  # nothing recompiled
    assert attached_ids(lab, fresh) == prog_ids  # nothing reattached
    assert names(lab.client("tcp", [(vip(2), PORT)] * 10)) == ["be2"] * 10
    assert names(lab.client("tcp", [(vip(3), PORT)])) == ["be1"]

    map_ids = pinned_map_ids(fresh)
    fresh.cleanup()
    fresh.cleanup()  # twice is fine
    assert_nothing_left(lab, fresh, prog_ids, map_ids)
    got = lab.client("tcp", [(vip(2), PORT)])
    assert got[0].startswith("error:"), got


def _tc_filters(netns: str, ifnames: list[str]) -> dict[tuple[str, str], set[tuple[int, str]]]:
    """(interface, direction) -> {(priority, name)} of the bpf filters there, as tc(8) lists them."""
    out = {}
    for ifname in ifnames:
        for direction in ("ingress", "egress"):
            text = nsexec.run(["tc", "-j", "filter", "show", "dev", ifname, direction], netns).stdout
            out[ifname, direction] = {(f["pref"], f["options"]["bpf_name"]) for f in json.loads(text or "[]")
                                      if f.get("kind") == "bpf" and "options" in f}
    return out


def _recognised(client, netns: str, hooks) -> set[str]:
    """Names of the filters that ``client``'s tc lifecycle takes for its own at ``hooks``."""
    from labkit.ebpf.netlink import ifindex, netlink

    return netlink(netns, lambda ipr: {name for h in hooks
                                       for name in client.attachments.ours(ipr, ifindex(ipr, h.ifname), h.parent)})


@pytest.mark.needs(*KERNEL)
def test_tc_clients_never_remove_each_others_filters(tmp_path):
    """``ebpf-tc`` (priority 0x4C4B, ``lk_…``) and the ``ebpf`` policy engine (0x4C40, ``lk_pol_…``)
    on the same interfaces, through one tc lifecycle: each takes only its own filters for its own,
    so each one's cleanup leaves the other's filters (and the clsact qdisc under them) working."""
    from labkit.datapath.ebpf import TcLB
    from labkit.policy.ebpf import EbpfPolicy
    from labkit.policy.model import CompiledPolicy, PodPolicy, PolicyTable

    undo: list = []
    try:
        node = f"{PREFIX}-tcnode"
        nsexec.create_netns(node)
        undo.append(lambda: nsexec.remove_netns(node))
        nsexec.write_sysctls(node, {"net.ipv4.ip_forward": 1})
        netns, ips = veth_pods(node, ("a", "b"), f"{PREFIX}-tc", "10.98", undo)
        ctx = NodeContext(lab=PREFIX, prefix=f"lk-{PREFIX}", node="n2", netns=node, pod_cidr="10.98.0.0/16",
                          service_cidr="10.96.0.0/12", state_dir=tmp_path,
                          pods=tuple(PodIface(p, f"lx-{p}", netns[p], ips[p], "veth") for p in ("a", "b")))
        clients = {"service": TcLB(ctx), "policy": EbpfPolicy(ctx)}
        undo.append(lambda: [c.cleanup() for c in clients.values()])

        def a_to_b() -> str:
            out = nsexec.run([sys.executable, "-c", CLIENT, "tcp", json.dumps([(ips["b"], 9)])], netns["a"]).stdout
            return json.loads(out)[0]

        ifnames = ["lx-a", "lx-b"]
        service_filters = {(k, d): {(0x4C4B, "lk_from_container" if d == "ingress" else "lk_to_container")}
                           for k in ifnames for d in ("ingress", "egress")}
        policy_filters = {(k, d): {(0x4C40, "lk_pol_from_pod" if d == "ingress" else "lk_pol_to_pod")}
                          for k in ifnames for d in ("ingress", "egress")}
        both = {k: service_filters[k] | policy_filters[k] for k in service_filters}
        # the service datapath first (it adds the clsact qdiscs), then the policy engine: b isolated
        clients["service"].sync(ServiceTable.of([]))
        clients["policy"].sync(PolicyTable({"deny-b": CompiledPolicy("deny-b", (), None)}, {}, {
            "a": PodPolicy("a", ips["a"], "veth", None, None),
            "b": PodPolicy("b", ips["b"], "veth", ("deny-b",), None)}))
        assert _tc_filters(node, ifnames) == both
        assert a_to_b() == "error:timeout"  # dropped at lx-b's egress
        stats = clients["policy"].describe()["stats"]  # per-CPU counters summed
        assert stats["allowed"] >= 1 and stats["denied"] >= 1, stats

        hooks = {name: c.hooks() for name, c in clients.items()}
        assert {h.ifname for h in hooks["service"]} == {h.ifname for h in hooks["policy"]} == set(ifnames)
        # on the same interfaces, each takes only its own filters for its own (the Service
        # datapath's "lk_" prefix alone would take the policy engine's too)
        assert _recognised(clients["service"], node, hooks["service"]) == {"lk_from_container", "lk_to_container"}
        assert _recognised(clients["policy"], node, hooks["policy"]) == {"lk_pol_from_pod", "lk_pol_to_pod"}

        clients["service"].cleanup()
        assert _tc_filters(node, ifnames) == policy_filters
        assert clients["policy"].attachments.attached(hooks["policy"])
        assert a_to_b() == "error:timeout"  # still enforced: the qdisc the service datapath added stays
        assert all("clsact" in nsexec.run(["tc", "qdisc", "show", "dev", k], node).stdout for k in ifnames)

        clients["service"] = TcLB(ctx)
        clients["service"].sync(ServiceTable.of([]))
        assert _tc_filters(node, ifnames) == both
        clients["policy"].cleanup()
        assert _tc_filters(node, ifnames) == service_filters
        assert clients["service"].describe()["attached"]
        assert a_to_b() == "error:ECONNREFUSED"  # no policy left: b's kernel answers
        clients["service"].cleanup()
        assert _tc_filters(node, ifnames) == {k: set() for k in both}
    finally:
        for fn in reversed(undo):
            fn()


@pytest.mark.needs(*KERNEL)
def test_ebpf_tc_a_direct_connection_reusing_a_service_flows_port_is_not_rewritten(make_lab, lab_name):
    """A pod opening thousands of connections a second reuses its ports within seconds. A service flow
    from port P to backend B leaves a reply entry {B -> pod:P} while it closes; a direct connection
    from P to B must not get its replies rewritten to the ClusterIP (its socket would never see them:
    every such connection stalled, found by the rate metric's pod floor)."""
    import sys as _sys

    from labkit.spec import parse_spec

    spec = parse_spec({"name": lab_name, "datapath": "ebpf-tc", "nodes": [{"name": "n1", "pods": [
        {"name": "cli"}, {"name": "web", "labels": {"app": "web"}}]}],
        "services": [{"name": "web", "port": 80, "target_port": 8080, "selector": {"app": "web"}}]})
    lb = make_lab(spec)
    cip, web = lb.services().at(0).cluster_ip, str(lb.plan.pods["web"].ip)
    script = f"""
import socket, struct
def get(host, port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))  # RST, as lkclient's crr
    s.bind(('0.0.0.0', 40123))
    s.settimeout(2)
    s.connect((host, port))
    s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')
    data = s.recv(4096)
    s.close()
    return data.split(b'\\r\\n\\r\\n', 1)[-1].strip().decode()
print(get('{cip}', 80), get('{web}', 8080))
"""
    out = lb.exec("cli", [_sys.executable, "-c", script], check=False, timeout=30)
    assert out.returncode == 0 and out.stdout.split() == ["web", "web"], out.stderr[-500:]
