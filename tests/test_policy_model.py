"""NetworkPolicy without a kernel: spec parsing and validation, the oracle's Kubernetes semantics,
compiled tables against the oracle, change tracking, and both engines' renderers (rule text,
packed map entries)."""

from __future__ import annotations

import ipaddress
import random

import pytest

from labkit.errors import SpecError
from labkit.policy import iptables as ipt
from labkit.policy import ebpf as pe
from labkit.policy import ebpf_structs as S
from labkit.policy.model import (EGRESS, INGRESS, Oracle, compile_table, diff, expand, matrix_ports,
                                 peer_cidrs)
from labkit.spec import load_spec, parse_spec

BASE = """
name: pm
nodes:
  - name: na
    enis: 1
    pods:
      - {name: web, labels: {app: web}}
      - {name: db, mode: bridge, labels: {app: db}}
      - {name: mac, mode: macvlan, labels: {app: mac}}
  - name: nb
    pods:
      - {name: cli, labels: {app: cli}}
      - {name: ov, mode: overlay, labels: {app: ov}}
      - {name: free, labels: {app: free}}
"""

POLICIES = """
policies:
  - name: web-in
    pod_selector: {app: web}
    ingress:
      - from: [{pod_selector: {app: cli}}]
        ports: [{protocol: TCP, port: 8080}]
      - from: [{ip_block: {cidr: 10.244.0.0/16, except: [10.244.1.0/24]}}]
        ports: [{protocol: TCP, port: 9090}]
  - name: db-in
    pod_selector: {app: db}
    ingress:
      - from: [{pod_selector: {app: web}}, {pod_selector: {app: mac}}]
  - name: mac-lock
    pod_selector: {app: mac}
    policy_types: [Ingress, Egress]
    ingress:
      - from: [{pod_selector: {}}]
        ports: [{protocol: UDP, port: 5353}]
    egress:
      - to: [{pod_selector: {app: db}}]
  - name: ov-egress
    pod_selector: {app: ov}
    policy_types: [Egress]
    egress:
      - to: [{ip_block: {cidr: 0.0.0.0/0, except: [10.10.0.0/16]}}]
        ports: [{protocol: TCP, port: 8080}, {protocol: UDP}]
"""


@pytest.fixture(scope="module")
def spec():
    return load_spec(BASE + POLICIES)


# ---------------------------------------------------------------- spec

def test_policies_round_trip_through_yaml(spec):
    assert load_spec(spec.to_yaml()) == spec
    assert spec.policy_engine == "iptables"
    web = spec.policies[0]
    assert web.types == ("Ingress",) and spec.policies[3].types == ("Egress",)
    assert web.ingress[1].peers[0].ip_block.except_ == ("10.244.1.0/24",)


def test_policy_problems_have_paths():
    bad = BASE + """
policy_engine: ebpff
policies:
  - name: p
    pod_selector: {app: web}
    policy_types: [Ingres]
    ingress:
      - from: [{namespace_selector: {}}, {ip_block: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]
        ports: [{protocol: SCTP, port: 70000}]
  - name: p
    count: 5
    rules: 100
    peer_cidr: 10.244.0.0/16
"""
    with pytest.raises(SpecError) as err:
        load_spec(bad)
    text = str(err.value)
    for want in ("policy_engine: unknown policy engine 'ebpff' (did you mean 'ebpf'?)",
                 "policies[0].policy_types[0]: unknown policy type 'Ingres'",
                 "policies[0].ingress[0].from[0].namespace_selector: unknown field (one namespace per lab",
                 "11.0.0.0/16 is not a strict subnet of cidr 10.0.0.0/8",
                 "policies[0].ingress[0].ports[0].protocol: unknown protocol 'SCTP'",
                 "policies[0].ingress[0].ports[0].port: port 70000 outside 1..65535",
                 "policies[1].name: duplicate policy 'p'",
                 "policies[1].rules: 100 rules per policy; 1 to 64",
                 "policies[1].peer_cidr: 10.244.0.0/16 overlaps the lab's 10.244.0.0/16"):
        assert want in text, text


def test_spec_without_policies_is_unchanged():
    s = load_spec(BASE)
    assert s.policies == () and "policies" not in s.to_dict() and "policy_engine" not in s.to_dict()


# ---------------------------------------------------------------- oracle (Kubernetes semantics)

def test_oracle_semantics(spec):
    o = Oracle(spec)
    assert o.allowed("cli", "web", 8080) and not o.allowed("free", "web", 8080)  # podSelector + port
    assert not o.allowed("cli", "web", 9090)  # cli is in the except (node nb's 10.244.1.0/24)
    assert o.allowed("db", "web", 9090)  # 10.244.0.x: inside the ipBlock
    assert o.allowed("web", "db", 1234, "UDP")  # rule without ports: every port and protocol
    assert not o.allowed("free", "db", 8080)
    assert o.allowed("mac", "db", 8080) and not o.allowed("mac", "web", 8080)  # mac's egress
    assert o.allowed("cli", "mac", 5353, "UDP") and not o.allowed("cli", "mac", 5353, "TCP")
    assert not o.allowed("ov", "mac", 5353, "UDP")  # ov's egress excepts the VPC
    assert o.allowed("ov", "cli", 4000, "UDP") and not o.allowed("ov", "cli", 9090)
    assert o.allowed("free", "cli", 1)  # neither side isolated
    assert o.isolated("mac", EGRESS) and not o.isolated("web", EGRESS) and o.isolated("web", INGRESS)


def test_empty_ingress_is_default_deny():
    s = load_spec(BASE + "policies:\n  - {name: deny, pod_selector: {}}\n")
    o = Oracle(s)
    assert not any(o.allowed(a, b, 8080) for a in o.pods for b in o.pods if a != b)


def test_matrix_ports(spec):
    assert matrix_ports(spec) == [("TCP", 8080), ("TCP", 9090), ("UDP", 5353), ("UDP", 8080)]


# ---------------------------------------------------------------- compiled tables

def test_peer_cidrs_subtract_excepts_and_split_all():
    peers = parse_spec({"name": "x", "nodes": [{"name": "n", "pods": [{"name": "a"}]}], "policies": [
        {"name": "p", "ingress": [{"from": [{"ip_block": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}},
                                           {"ip_block": {"cidr": "10.1.0.0/16"}}]}]}]}).policies[0].ingress[0].peers
    nets = peer_cidrs(peers, {})
    covered = lambda ip: any(ipaddress.IPv4Address(ip) in n for n in nets)  # noqa: E731
    assert covered("10.1.2.3") and not covered("10.2.0.1") and covered("11.0.0.0") and covered("200.1.1.1")
    assert all(n.prefixlen >= 1 for n in nets)  # no /0: ipset hash:net cannot hold it
    assert len(nets) == len(set(nets)) and all(not a.overlaps(b) for a in nets for b in nets if a != b)


def test_compiled_table_agrees_with_oracle(spec):
    """Evaluate the compiled table (what engines install) for random addresses and ports and compare
    with the oracle: the compile must lose nothing of the semantics."""
    table = compile_table(spec)
    o = Oracle(spec)
    rng = random.Random(7)

    def table_allows(pod, direction, peer_ip, proto, port):
        pp = table.pods.get(pod)
        names = None if pp is None else (pp.ingress if direction == INGRESS else pp.egress)
        if names is None:
            return True
        for name in names:
            pol = table.policies[name]
            for rule in (pol.ingress if direction == INGRESS else pol.egress):
                peer_ok = rule.peers is None or any(
                    ipaddress.IPv4Address(peer_ip) in ipaddress.IPv4Network(c) for c in table.sets[rule.peers].cidrs)
                port_ok = not rule.ports or any(m.protocol == proto and m.port in (None, port) for m in rule.ports)
                if peer_ok and port_ok:
                    return True
        return False

    candidates = [str(o.ip(p)) for p in o.pods] + ["10.10.0.99", "10.244.1.77", "10.244.0.200", "8.8.8.8"]
    for _ in range(3000):
        pod = rng.choice(list(o.pods))
        peer_ip = rng.choice(candidates)
        proto, port = rng.choice([("TCP", 8080), ("TCP", 9090), ("UDP", 5353), ("UDP", 53), ("TCP", 1)])
        peer_pod = o.by_ip.get(peer_ip)
        if peer_pod == pod:
            continue
        # ingress of `pod` from peer, and egress of `pod` to peer, one side at a time
        want_in = o.allowed_ip(None, peer_ip, pod, str(o.ip(pod)), port, proto) if peer_pod is None else \
            _one_side(o, peer_pod, pod, INGRESS, port, proto)
        assert table_allows(pod, INGRESS, peer_ip, proto, port) == want_in, (pod, peer_ip, proto, port)
        want_out = o.allowed_ip(pod, str(o.ip(pod)), None, peer_ip, port, proto) if peer_pod is None else \
            _one_side(o, pod, peer_pod, EGRESS, port, proto)
        assert table_allows(pod, EGRESS, peer_ip, proto, port) == want_out, (pod, peer_ip, proto, port)


def _one_side(o: Oracle, src: str, dst: str, direction: str, port: int, proto: str) -> bool:
    from labkit.policy.model import _side_allows

    if direction == INGRESS:
        return _side_allows(o.policies, o.pods[dst].labels, INGRESS, o.ip(src), o.pods[src].labels, proto, port)
    return _side_allows(o.policies, o.pods[src].labels, EGRESS, o.ip(dst), o.pods[dst].labels, proto, port)


def test_tables_are_per_node_and_share_peer_sets(spec):
    na, nb = compile_table(spec, "na"), compile_table(spec, "nb")
    assert set(na.pods) == {"web", "db", "mac"} and set(nb.pods) == {"ov"}
    assert set(na.policies) == {"web-in", "db-in", "mac-lock"}
    same = load_spec(BASE + """
policies:
  - {name: a, pod_selector: {app: web}, ingress: [{from: [{pod_selector: {app: cli}}]}]}
  - {name: b, pod_selector: {app: db}, ingress: [{from: [{pod_selector: {app: cli}}]}]}
""")
    assert len(compile_table(same).sets) == 1


def test_bulk_expansion_and_diff():
    s = load_spec(BASE + "policies:\n  - {name: bulk, pod_selector: {app: web}, count: 50, rules: 3}\n")
    pols = expand(s.policies)
    assert len(pols) == 50 and pols[0].name == "bulk-0" and len(pols[49].ingress) == 3
    assert pols[0].ingress[1].peers[0].ip_block.cidr == "100.64.0.1/32"
    assert pols[0].ingress[2].ports[0].port == 10002
    t1 = compile_table(s)
    assert t1.rules() == 150 and t1.pods["web"].ingress[-1] == "bulk-49"
    t2 = compile_table(s, policies=pols[:49])
    d = diff(t1, t2)
    assert d.policies_removed == ("bulk-49",) and d.pods_changed == ("web",) and len(d.sets_removed) == 3
    assert diff(t1, t1).empty and diff(None, t1).full


# ---------------------------------------------------------------- iptables renderer

def test_iptables_full_restore(spec):
    table = compile_table(spec, "na")
    targets = ipt.targets("lk-pm.na", _ifaces(spec, "na"))
    node = ipt.subset(table, [p.pod for p in targets[0].pods])
    text = ipt.render_restore(targets[0], node, diff(None, node), missing_jumps=["FORWARD"], stale={"LKPOL-IN-OLD"})
    web_in, db_in = ipt.pod_chain("web", INGRESS), ipt.pod_chain("db", INGRESS)
    lines = text.splitlines()
    assert lines[0] == "*filter" and lines[-1] == "COMMIT"
    assert "-I FORWARD 1 -j LKPOL-FORWARD" in lines
    assert "-A LKPOL-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN" in lines
    assert f"-A LKPOL-FORWARD -o lx-web -j {web_in}" in lines
    assert f"-A LKPOL-FORWARD -d {spec_ip(spec, 'db')}/32 -j {db_in}" in lines  # a bridge port: by address
    assert lines[-2] == "-X LKPOL-IN-OLD" and ":LKPOL-IN-OLD - [0:0]" in lines
    pi = ipt.policy_chain("web-in", INGRESS)
    s8080 = node.policies["web-in"].ingress[0].peers
    assert f"-A {pi} -p tcp -m tcp --dport 8080 -m set --match-set {s8080} src -j MARK --set-xmark 0x20000/0x20000" in lines
    assert lines.index(f"-A {web_in} -j {pi}") < lines.index(
        f'-A {web_in} -m comment --comment "default deny ingress of web" -j DROP')
    assert "mac" not in {p.pod for p in targets[0].pods}  # macvlan: enforced in its own namespace
    mac = ipt.subset(table, ["mac"])
    mac_text = ipt.render_restore(targets[1], mac, diff(None, mac)).splitlines()
    assert "-A LKPOL-OUTPUT -o lo -j RETURN" in mac_text
    assert f"-A LKPOL-OUTPUT -j {ipt.pod_chain('mac', EGRESS)}" in mac_text


def test_iptables_partial_restore_touches_only_changes(spec):
    table = compile_table(spec, "na")
    target = ipt.targets("lk-pm.na", _ifaces(spec, "na"))[0]
    old = ipt.subset(table, [p.pod for p in target.pods])
    pols = [p for p in expand(spec.policies) if p.name != "db-in"]
    new = ipt.subset(compile_table(spec, "na", policies=pols), [p.pod for p in target.pods])
    text = ipt.render_restore(target, new, diff(old, new), old=old)
    assert ipt.policy_chain("web-in", INGRESS) not in text  # unchanged policy: not rewritten
    assert f"-X {ipt.policy_chain('db-in', INGRESS)}" in text and f"-X {ipt.pod_chain('db', INGRESS)}" in text
    sets = ipt.render_sets(new, list(new.sets)).splitlines()
    assert sets[0].startswith("create LKPOL-S-") and any(line.startswith("swap LKPOL-T-") for line in sets)


def test_iptables_cleanup_render():
    save = """*filter
:FORWARD ACCEPT [0:0]
:KUBE-FORWARD - [0:0]
:LKPOL-FORWARD - [0:0]
:LKPOL-IN-X - [0:0]
-A FORWARD -j LKPOL-FORWARD
-A FORWARD -j KUBE-FORWARD
-A LKPOL-FORWARD -o lx-a -j LKPOL-IN-X
COMMIT
"""
    assert ipt.parse_save(save) == ({"LKPOL-FORWARD", "LKPOL-IN-X"}, {"FORWARD"})
    text = ipt.render_cleanup(save).splitlines()
    assert "-D FORWARD -j LKPOL-FORWARD" in text and "-X LKPOL-IN-X" in text and "KUBE-FORWARD" not in "".join(text)
    assert ipt.render_cleanup("*filter\nCOMMIT\n") is None


# ---------------------------------------------------------------- eBPF renderer

def test_ebpf_flatten_entries(spec):
    table = compile_table(spec, "na")
    flat = pe.flatten(table)
    web = flat[ipaddress.IPv4Address(spec_ip(spec, "web")).packed]
    iso, npol = S.POLICY_ENDPOINT.unpack(web.endpoint)
    assert iso == S.POL_INGRESS and npol == 1
    cli = ipaddress.IPv4Address(spec_ip(spec, "cli")).packed
    key = S.pack_key(ipaddress.IPv4Address(spec_ip(spec, "web")).packed, S.POL_INGRESS, 6, 8080, cli, 32)
    assert key in web.rules
    mac = flat[ipaddress.IPv4Address(spec_ip(spec, "mac")).packed]
    assert S.POLICY_ENDPOINT.unpack(mac.endpoint)[0] == S.POL_INGRESS | S.POL_EGRESS
    mac_ip = ipaddress.IPv4Address(spec_ip(spec, "mac")).packed
    assert lpm_allows(mac.rules, mac_ip, S.POL_INGRESS, 17, 5353, cli)  # pod_selector {}: every pod
    assert not lpm_allows(mac.rules, mac_ip, S.POL_INGRESS, 6, 5353, cli)
    assert not lpm_allows(mac.rules, mac_ip, S.POL_INGRESS, 17, 5353, bytes([8, 8, 8, 8]))
    db = flat[ipaddress.IPv4Address(spec_ip(spec, "db")).packed]
    assert {k[9] for k in db.rules} == {0}  # a rule without ports: proto 0 (every protocol)


def test_ebpf_render_partial_ops(spec):
    t1 = compile_table(spec, "na")
    pols = [p for p in expand(spec.policies) if p.name != "db-in"]
    t2 = compile_table(spec, "na", policies=pols)
    d = diff(t1, t2)
    pods = pe.affected_pods(t1, t2, d)
    assert pods == {"db"}
    ops = pe.render(pe.flatten(t1, pods), pe.flatten(t2, pods))
    assert ops.ep_del == [ipaddress.IPv4Address(spec_ip(spec, "db")).packed] and not ops.rule_upd
    assert len(ops.rule_del) == len(pe.flatten(t1, ["db"])[ops.ep_del[0]].rules)
    assert not pe.render(pe.flatten(t1), pe.flatten(t1)).counts()["rule_upd"]


def test_struct_packers_match_ctypes():
    import ctypes as ct

    for cls, packer in S.PACKERS.items():
        assert ct.sizeof(cls) == packer.size, cls.__name__
    k = S.PolicyKey(96, 0x0100000A, 1, 6, 0x901F, 0x0200000A)  # 10.0.0.1, port 8080, 10.0.0.2 (LE host)
    assert bytes(k) == S.pack_key(bytes([10, 0, 0, 1]), 1, 6, 8080, bytes([10, 0, 0, 2]), 32)


# ---------------------------------------------------------------- helpers

def lpm_allows(rules: dict[bytes, bytes], ep: bytes, direction: int, proto: int, port: int, peer: bytes) -> bool:
    """policy_allows() of bpf/lib/policy.h over packed entries: exact port, any port, any protocol,
    each a longest-prefix match on (endpoint, dir, proto, dport, peer)."""
    def match(proto_, port_):
        want = int.from_bytes(S.pack_key(ep, direction, proto_, port_, peer, 32)[4:], "big")
        for key in rules:
            bits = S.POLICY_KEY.unpack(key)[0]
            if int.from_bytes(key[4:], "big") >> (96 - bits) == want >> (96 - bits):
                return True
        return False

    return (port and match(proto, port)) or match(proto, 0) or match(0, 0)


def spec_ip(spec, pod: str) -> str:
    from labkit import addressing

    return str(addressing.plan(spec).pods[pod].ip)


def _ifaces(spec, node: str):
    from labkit.datapath.base import PodIface

    out = []
    for n, p in spec.pods():
        if n.name == node:
            host = "" if p.mode in ("eni-ipvlan", "macvlan") else f"lx-{p.name}"
            out.append(PodIface(p.name, host, f"lk-pm.{p.name}", spec_ip(spec, p.name), p.mode))
    return out
