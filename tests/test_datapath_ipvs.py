"""The ipvs datapath's partial-sync bookkeeping and its IPVS netlink requests, without ip_vs (pure).

The VM tests (tests/test_vagrant_lab.py -k ipvs) check the same against a real kernel; the attribute
values below are the ones the VM's kernel reported for services made by ``ipvsadm -R`` and by
:func:`ipvs.ipvs_restore` alike (a GET_SERVICE/GET_DEST dump: identical)."""

from __future__ import annotations

import os
import random
import socket
import struct

import pytest

from labkit import nsexec
from labkit.datapath import ipvs
from labkit.services import Endpoint, ServicePort, ServiceTable, diff


def _port(k: int, eps: tuple[Endpoint, ...], proto: str = "TCP") -> ServicePort:
    return ServicePort("ns", f"svc-{k // 2}", f"p{k % 2}", proto, f"10.96.0.{10 + k // 2}", 80 + k % 2, eps)


def test_partial_set_changes_equal_a_full_comparison_over_random_change_sets():
    """Reference counts kept across partial syncs: the entries added/deleted are exactly the full
    tables' difference, also for entries shared by ports (ClusterIPs of a service's two ports, the
    same endpoints behind many services); the changed ports' virtual servers give the same ipvsadm
    lines as the whole tables'."""
    rng = random.Random(7)
    pool = [Endpoint(f"10.244.1.{i}", 8080, f"be-{i}") for i in range(4)]
    table, refs = ServiceTable(), ipvs.set_refs(())
    for _ in range(300):
        ports = dict(table.ports)
        for _ in range(rng.randint(1, 4)):
            k = rng.randrange(24)
            sp = _port(k, tuple(rng.sample(pool, rng.randint(0, 3))), rng.choice(["TCP", "UDP"]))
            if sp.key in ports and rng.random() < 0.4:
                del ports[sp.key]
            else:
                ports[sp.key] = sp
        new = ServiceTable(ports)
        gone, came = ipvs.change_sides(diff(table, new))
        dels, adds = ipvs.set_delta(refs, gone, came)
        before, after = ipvs.set_refs(table), ipvs.set_refs(new)
        for name in ipvs.IPSETS:
            assert set(dels[name]) == set(before[name]) - set(after[name]), name
            assert set(adds[name]) == set(after[name]) - set(before[name]), name
        ipvs.update_refs(refs, gone, came)
        assert refs == after
        partial = ipvs.render_ipvsadm(ipvs.virtual_servers(gone), ipvs.virtual_servers(came)).splitlines()
        assert sorted(partial) == sorted(ipvs.render_ipvsadm(ipvs.virtual_servers(table),
                                                             ipvs.virtual_servers(new)).splitlines())
        table = new


def _attrs(data: bytes) -> dict[int, bytes]:
    out, off = {}, 0
    while off + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, off)
        out[kind & 0x7FFF] = data[off + 4:off + size]
        off += (size + 3) & ~3
    return out


def test_netlink_requests_carry_what_ipvsadm_sends():
    text = ("-A -u 10.96.0.11:53 -s rr\n-a -u 10.96.0.11:53 -r 10.244.1.3:53 -m -w 1\n"
            "-d -u 10.96.0.11:53 -r 10.244.1.3:53\n-D -u 10.96.0.11:53\n")
    msgs = ipvs.ipvs_messages(0x20, text, seq=5)
    assert [line for _, line in msgs] == text.splitlines()
    heads = [struct.unpack_from("=IHHIIBB", m) for m, _ in msgs]
    assert [(h[0], h[1], h[2], h[3], h[5], h[6]) for h in heads] == [
        (len(m), 0x20, 1, 5 + i, cmd, 1) for i, ((m, _), cmd) in enumerate(zip(msgs, (1, 5, 7, 3)))]
    new_svc = _attrs(_attrs(msgs[0][0][20:])[1])
    assert new_svc == {1: struct.pack("=H", 2), 2: struct.pack("=H", 17),
                       3: bytes([10, 96, 0, 11]) + bytes(12), 4: struct.pack("!H", 53), 6: b"rr\0",
                       7: struct.pack("=II", 0, 0xFFFFFFFF), 8: bytes(4), 9: b"\xff" * 4}
    add = _attrs(msgs[1][0][20:])
    assert _attrs(add[1]) == {k: new_svc[k] for k in (1, 2, 3, 4)}  # the virtual server's key only
    assert _attrs(add[2]) == {1: bytes([10, 244, 1, 3]) + bytes(12), 2: struct.pack("!H", 53),
                              11: struct.pack("=H", 2), 3: bytes(4), 4: struct.pack("=I", 1), 5: bytes(4),
                              6: bytes(4)}  # masquerading, weight 1, no thresholds
    assert _attrs(_attrs(msgs[2][0][20:])[2]) == {1: bytes([10, 244, 1, 3]) + bytes(12), 2: struct.pack("!H", 53),
                                                  11: struct.pack("=H", 2)}
    assert set(_attrs(msgs[3][0][20:])) == {1}


@pytest.mark.needs("root")
def test_interface_addresses_are_dumped_and_changed_in_batches(tmp_path):
    """kube-ipvs0's address helpers on the real kernel (``lo`` of a scratch namespace: this host has
    no dummy driver): more addresses than one batch and one dump buffer hold, replace of one already
    there, delete, and a failing request named in the error."""
    ns = f"lktest-ipvs-{os.getpid()}"
    nsexec.create_netns(ns)
    try:
        index = nsexec.in_netns(ns, lambda: socket.if_nametoindex("lo"))
        ips = [f"10.96.{i // 250}.{i % 250 + 1}" for i in range(3000)]
        nsexec.in_netns(ns, lambda: ipvs.change_addresses(index, ips, []))
        assert nsexec.in_netns(ns, lambda: ipvs.interface_addresses(index)) == dict.fromkeys(ips, 32)
        nsexec.in_netns(ns, lambda: ipvs.change_addresses(index, ips[:5], ips[5:10]))
        assert set(nsexec.in_netns(ns, lambda: ipvs.interface_addresses(index))) == set(ips) - set(ips[5:10])
        with pytest.raises(OSError, match="address del 10.99.9.9/32"):
            nsexec.in_netns(ns, lambda: ipvs.change_addresses(index, [], ["10.99.9.9"]))
    finally:
        nsexec.remove_netns(ns)
