"""The Python half of the C/Python struct contract of the eBPF datapaths.

Every class here mirrors one struct of ``bpf/lib/common.h`` field for field ("must match struct
lb4_key in bpf/lib/common.h"), and :data:`MAPS` mirrors every map the programs declare (name, type,
key, value, size). ``tests/test_bpf_structs.py`` compiles the C with bcc and checks that bcc's own
typed views of the maps have the same sizes, field names and offsets as these classes; change both
sides together.

Byte order, as in the C header: addresses and ports are stored in network order (what packets and
``struct bpf_sock_addr`` carry); ids, counts and slots in host order. The packers write the raw
bytes of many entries at once (a sync fills tens of thousands of entries, and packing bytes is
several times faster than building ctypes objects one by one); the test checks that each packer
produces exactly ``bytes()`` of its ctypes struct for the same values.
"""

from __future__ import annotations

import ctypes as ct
import socket
import struct
import sys

from ..ebpf.maps import MapSpec

IPPROTO = {"TCP": 6, "UDP": 17}

# max_entries of each map (LK_*_MAP_SIZE in bpf/lib/common.h)
SVC_MAP_SIZE = 65536
BE_MAP_SIZE = 262144
RNAT_MAP_SIZE = 65536
RNAT_SK_MAP_SIZE = 262144
CT_MAP_SIZE = 262144
MAX_BACKENDS_PER_SERVICE = 0xFFFF  # lb4_service.count is a __u16

CT_EGRESS, CT_REPLY = 0, 1  # ipv4_ct_tuple.flags
CT_F_HAIRPIN, CT_F_CLOSING = 1, 2  # ct_entry.flags
# conntrack-lite lifetimes in ms where lk_ct_cfg holds 0 (Cilium's defaults)
CT_TCP_MS, CT_SYN_MS, CT_CLOSE_MS, CT_NONTCP_MS = 21600000, 60000, 10000, 60000


class Lb4Key(ct.Structure):
    """lk_svc_v4 key. Must match ``struct lb4_key`` in bpf/lib/common.h."""

    _fields_ = [
        ("address", ct.c_uint32),  # ClusterIP, network order
        ("dport", ct.c_uint16),  # Service port, network order
        ("proto", ct.c_uint8),  # 6 TCP / 17 UDP
        ("pad", ct.c_uint8),
    ]


class Lb4Service(ct.Structure):
    """lk_svc_v4 value. Must match ``struct lb4_service``."""

    _fields_ = [
        ("rev_nat_index", ct.c_uint32),  # service id, host order, >= 1
        ("count", ct.c_uint16),  # backends in slots 0..count-1; 0 = refuse
        ("flags", ct.c_uint16),
    ]


class Lb4BackendKey(ct.Structure):
    """lk_be_v4 key. Must match ``struct lb4_backend_key``."""

    _fields_ = [
        ("rev_nat_index", ct.c_uint32),  # service id, host order
        ("slot", ct.c_uint32),  # host order
    ]


class Lb4Backend(ct.Structure):
    """lk_be_v4 value. Must match ``struct lb4_backend``."""

    _fields_ = [
        ("address", ct.c_uint32),  # pod IP, network order
        ("port", ct.c_uint16),  # target port, network order
        ("proto", ct.c_uint8),
        ("flags", ct.c_uint8),
    ]


class Lb4ReverseNat(ct.Structure):
    """lk_rnat_v4 value (key: ``__u32`` rev_nat_index). Must match ``struct lb4_reverse_nat``."""

    _fields_ = [
        ("address", ct.c_uint32),  # ClusterIP, network order
        ("port", ct.c_uint16),  # Service port, network order
        ("pad", ct.c_uint16),
    ]


class Ipv4RevnatTuple(ct.Structure):
    """lk_rnat_sk_v4 key. Must match ``struct ipv4_revnat_tuple``."""

    _fields_ = [
        ("cookie", ct.c_uint64),  # socket cookie
        ("address", ct.c_uint32),  # backend, network order
        ("port", ct.c_uint16),  # backend port, network order
        ("pad", ct.c_uint16),
    ]


class Ipv4RevnatEntry(ct.Structure):
    """lk_rnat_sk_v4 value. Must match ``struct ipv4_revnat_entry``."""

    _fields_ = [
        ("address", ct.c_uint32),  # ClusterIP, network order
        ("port", ct.c_uint16),  # Service port, network order
        ("pad", ct.c_uint16),
        ("rev_nat_index", ct.c_uint32),
    ]


class Ipv4CtTuple(ct.Structure):
    """lk_ct_v4 key. Must match ``struct ipv4_ct_tuple``."""

    _fields_ = [
        ("daddr", ct.c_uint32),
        ("saddr", ct.c_uint32),
        ("dport", ct.c_uint16),
        ("sport", ct.c_uint16),
        ("nexthdr", ct.c_uint8),
        ("flags", ct.c_uint8),  # CT_EGRESS / CT_REPLY
        ("pad", ct.c_uint16),
    ]


class CtEntry(ct.Structure):
    """lk_ct_v4 value. Must match ``struct ct_entry``."""

    _fields_ = [
        ("backend_address", ct.c_uint32),
        ("backend_port", ct.c_uint16),
        ("flags", ct.c_uint16),  # CT_F_HAIRPIN
        ("rev_nat_index", ct.c_uint32),
        ("slot", ct.c_uint32),
        ("lifetime", ct.c_uint32),  # expiry, ms of bpf_ktime_get_ns() as a wrapping u32
    ]


class CtConfig(ct.Structure):
    """lk_ct_cfg value (key 0). Must match ``struct ct_config``: lifetimes in ms, 0 = default."""

    _fields_ = [
        ("tcp_ms", ct.c_uint32),
        ("syn_ms", ct.c_uint32),
        ("close_ms", ct.c_uint32),
        ("nontcp_ms", ct.c_uint32),
    ]


SERVICE_MAPS = (
    MapSpec("lk_svc_v4", "hash", Lb4Key, Lb4Service, SVC_MAP_SIZE),
    MapSpec("lk_be_v4", "hash", Lb4BackendKey, Lb4Backend, BE_MAP_SIZE),
    MapSpec("lk_rnat_v4", "hash", ct.c_uint32, Lb4ReverseNat, RNAT_MAP_SIZE),
)  # written by the loader; the LRU maps below only by the programs
SOCK_MAPS = SERVICE_MAPS + (
    MapSpec("lk_rnat_sk_v4", "lru_hash", Ipv4RevnatTuple, Ipv4RevnatEntry, RNAT_SK_MAP_SIZE),
)
LXC_MAPS = SERVICE_MAPS + (
    MapSpec("lk_ct_v4", "lru_hash", Ipv4CtTuple, CtEntry, CT_MAP_SIZE),
    MapSpec("lk_ct_cfg", "array", ct.c_uint32, CtConfig, 1),
)
MAPS = {m.name: m for m in SOCK_MAPS + LXC_MAPS}

# --------------------------------------------------------------------------- packers
# Network-order fields are packed big-endian ("!", addresses as their 4 raw bytes); host-order
# fields in native order without padding ("="). Each format spans its whole struct.

LB4_KEY = struct.Struct("!4sHBB")  # address, dport, proto, pad
LB4_SERVICE = struct.Struct("=IHH")  # rev_nat_index, count, flags
LB4_BACKEND_KEY = struct.Struct("=II")  # rev_nat_index, slot
LB4_BACKEND = struct.Struct("!4sHBB")  # address, port, proto, flags
LB4_REVERSE_NAT = struct.Struct("!4sHH")  # address, port, pad
U32 = struct.Struct("=I")

PACKERS = {  # ctypes struct -> its packer (cross-checked by tests/test_bpf_structs.py)
    Lb4Key: LB4_KEY,
    Lb4Service: LB4_SERVICE,
    Lb4BackendKey: LB4_BACKEND_KEY,
    Lb4Backend: LB4_BACKEND,
    Lb4ReverseNat: LB4_REVERSE_NAT,
}


def pack_lb4_key(ip: str, port: int, proto: int) -> bytes:
    return LB4_KEY.pack(socket.inet_aton(ip), port, proto, 0)


def pack_lb4_service(rev_nat_index: int, count: int) -> bytes:
    return LB4_SERVICE.pack(rev_nat_index, count, 0)


def pack_lb4_backend_key(rev_nat_index: int, slot: int) -> bytes:
    return LB4_BACKEND_KEY.pack(rev_nat_index, slot)


def pack_lb4_backend(ip: str, port: int, proto: int) -> bytes:
    return LB4_BACKEND.pack(socket.inet_aton(ip), port, proto, 0)


def pack_lb4_reverse_nat(ip: str, port: int) -> bytes:
    return LB4_REVERSE_NAT.pack(socket.inet_aton(ip), port, 0)


def pack_u32(value: int) -> bytes:
    return U32.pack(value)


def unpack_lb4_key(raw: bytes) -> tuple[str, int, int]:
    """(ClusterIP, port, proto) of a packed lb4_key."""
    addr, port, proto, _ = LB4_KEY.unpack(raw)
    return socket.inet_ntoa(addr), port, proto


def unpack_lb4_service(raw: bytes) -> tuple[int, int]:
    """(rev_nat_index, count) of a packed lb4_service."""
    rev_nat_index, count, _ = LB4_SERVICE.unpack(raw)
    return rev_nat_index, count


def unpack_lb4_backend_key(raw: bytes) -> tuple[int, int]:
    """(rev_nat_index, slot) of a packed lb4_backend_key."""
    return LB4_BACKEND_KEY.unpack(raw)


def unpack_lb4_backend(raw: bytes) -> tuple[str, int, int]:
    """(pod IP, port, proto) of a packed lb4_backend."""
    addr, port, proto, _ = LB4_BACKEND.unpack(raw)
    return socket.inet_ntoa(addr), port, proto


def unpack_u32(raw: bytes) -> int:
    return U32.unpack(raw)[0]


def be32(ip: str) -> int:
    """An IPv4 address as ctypes shows a ``__be32`` field: its network-order bytes read natively."""
    return int.from_bytes(socket.inet_aton(ip), sys.byteorder)


def be16(port: int) -> int:
    """A port as ctypes shows a ``__be16`` field."""
    return int.from_bytes(port.to_bytes(2, "big"), sys.byteorder)


C_STRUCTS = {  # name in bpf/lib/common.h -> its mirror here
    "lb4_key": Lb4Key,
    "lb4_service": Lb4Service,
    "lb4_backend_key": Lb4BackendKey,
    "lb4_backend": Lb4Backend,
    "lb4_reverse_nat": Lb4ReverseNat,
    "ipv4_revnat_tuple": Ipv4RevnatTuple,
    "ipv4_revnat_entry": Ipv4RevnatEntry,
    "ipv4_ct_tuple": Ipv4CtTuple,
    "ct_entry": CtEntry,
    "ct_config": CtConfig,
}

C_CONSTANTS = {  # macro in bpf/lib/common.h -> value here
    "LK_SVC_MAP_SIZE": SVC_MAP_SIZE,
    "LK_BE_MAP_SIZE": BE_MAP_SIZE,
    "LK_RNAT_MAP_SIZE": RNAT_MAP_SIZE,
    "LK_RNAT_SK_MAP_SIZE": RNAT_SK_MAP_SIZE,
    "LK_CT_MAP_SIZE": CT_MAP_SIZE,
    "CT_EGRESS": CT_EGRESS,
    "CT_REPLY": CT_REPLY,
    "CT_F_HAIRPIN": CT_F_HAIRPIN,
    "CT_F_CLOSING": CT_F_CLOSING,
    "LK_CT_TCP_MS": CT_TCP_MS,
    "LK_CT_SYN_MS": CT_SYN_MS,
    "LK_CT_CLOSE_MS": CT_CLOSE_MS,
    "LK_CT_NONTCP_MS": CT_NONTCP_MS,
}
