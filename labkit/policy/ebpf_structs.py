"""The Python half of the C/Python struct contract of the eBPF policy engine.

Every class mirrors one struct of ``bpf/lib/policy.h`` field for field, :data:`MAPS` every map it
declares, and the packers write the raw bytes of many entries at once. ``tests/test_policy_engines.py``
checks sizes, field names and offsets as gcc sees the header and against bcc's typed views of
``bpf/bpf_policy.c`` compiled, and ``tests/test_policy_model.py`` each packer against ``bytes()`` of
its ctypes struct; change both sides together.

Byte order as in the C header: addresses and ports in network order, the rest in host order.
"""

from __future__ import annotations

import ctypes as ct
import struct

from ..ebpf.maps import MapSpec

EP_MAP_SIZE = 65536
POLICY_MAP_SIZE = 1048576
FLOW_MAP_SIZE = 262144
POL_INGRESS, POL_EGRESS = 1, 2
PREFIX_FIXED = 64  # bits of policy_key before the peer address
STATS = ("established", "allowed", "denied")  # lk_pol_stats slots (POL_STAT_*)
IPPROTO = {"TCP": 6, "UDP": 17}


class PolicyEndpoint(ct.Structure):
    """lk_pol_ep value (key: ``__be32`` pod address). Must match ``struct policy_endpoint``."""

    _fields_ = [
        ("isolated", ct.c_uint8),  # POL_INGRESS | POL_EGRESS bits
        ("pad", ct.c_uint8 * 3),
        ("policies", ct.c_uint32),  # host order
    ]


class PolicyKey(ct.Structure):
    """lk_pol_v4 key (LPM trie). Must match ``struct policy_key``."""

    _fields_ = [
        ("prefixlen", ct.c_uint32),  # host order: 64 + peer prefix length
        ("endpoint", ct.c_uint32),  # pod address, network order
        ("dir", ct.c_uint8),
        ("proto", ct.c_uint8),  # 0 = every protocol
        ("dport", ct.c_uint16),  # network order; 0 = every port
        ("peer", ct.c_uint32),  # network order
    ]


class PolicyEntry(ct.Structure):
    """lk_pol_v4 value. Must match ``struct policy_entry``."""

    _fields_ = [("policy", ct.c_uint32), ("pad", ct.c_uint32)]


class PolicyFlowKey(ct.Structure):
    """lk_pol_flow key. Must match ``struct policy_flow_key``."""

    _fields_ = [
        ("saddr", ct.c_uint32),  # network order
        ("daddr", ct.c_uint32),
        ("sport", ct.c_uint16),  # network order
        ("dport", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("dir", ct.c_uint8),
        ("pad", ct.c_uint16),
    ]


class PolicyFlow(ct.Structure):
    """lk_pol_flow value. Must match ``struct policy_flow``."""

    _fields_ = [("created", ct.c_uint64)]


MAPS = (
    MapSpec("lk_pol_ep", "hash", ct.c_uint32, PolicyEndpoint, EP_MAP_SIZE),
    MapSpec("lk_pol_v4", "lpm_trie", PolicyKey, PolicyEntry, POLICY_MAP_SIZE),
    MapSpec("lk_pol_flow", "lru_hash", PolicyFlowKey, PolicyFlow, FLOW_MAP_SIZE),
    MapSpec("lk_pol_stats", "percpu_array", ct.c_uint32, ct.c_uint64, len(STATS)),
)
BY_NAME = {m.name: m for m in MAPS}

# ---------------------------------------------------------------- packers
POLICY_ENDPOINT = struct.Struct("=B3xI")  # isolated, pad[3], policies
POLICY_KEY = struct.Struct("=I4sBB2s4s")  # prefixlen (host), endpoint, dir, proto, dport (be, pre-packed), peer
POLICY_ENTRY = struct.Struct("=II")  # policy, pad
POLICY_FLOW_KEY = struct.Struct("!4s4sHHBBH")  # saddr, daddr, sport, dport, proto, dir, pad

PACKERS = {PolicyEndpoint: POLICY_ENDPOINT, PolicyKey: POLICY_KEY, PolicyEntry: POLICY_ENTRY,
           PolicyFlowKey: POLICY_FLOW_KEY}

C_STRUCTS = {"policy_endpoint": PolicyEndpoint, "policy_key": PolicyKey, "policy_entry": PolicyEntry,
             "policy_flow_key": PolicyFlowKey, "policy_flow": PolicyFlow}
C_CONSTANTS = {"LK_POL_EP_MAP_SIZE": EP_MAP_SIZE, "LK_POL_MAP_SIZE": POLICY_MAP_SIZE,
               "LK_POL_FLOW_MAP_SIZE": FLOW_MAP_SIZE, "POL_INGRESS": POL_INGRESS, "POL_EGRESS": POL_EGRESS,
               "POL_PREFIX_FIXED": PREFIX_FIXED, "POL_STAT_MAX": len(STATS)}


def pack_key(endpoint: bytes, direction: int, proto: int, port: int, peer: bytes, prefixlen: int) -> bytes:
    """A packed policy_key: ``endpoint``/``peer`` as 4 network-order bytes, ``prefixlen`` of the peer."""
    return POLICY_KEY.pack(PREFIX_FIXED + prefixlen, endpoint, direction, proto, port.to_bytes(2, "big"), peer)
