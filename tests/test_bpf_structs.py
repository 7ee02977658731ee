"""The C/Python struct contract of the eBPF datapaths: ``bpf/lib/common.h`` ↔
``labkit/datapath/ebpf_structs.py``.

Three layers: the packers against the ctypes structs (pure Python); the C layouts as gcc sees them
(``offsetof``/``sizeof`` of every field the Python side names, no root); and bcc's own typed views of
every map of both entry programs (root: bcc creates the maps), which also catch a C field the Python
side lacks, a wrong map type or size.
"""

from __future__ import annotations

import ctypes as ct
from pathlib import Path

import pytest

from labkit.datapath import ebpf_structs as S
from structs import assert_c_layouts, fields

BPF_DIR = Path(__file__).resolve().parents[1] / "bpf"


def test_packers_write_exactly_the_ctypes_bytes():
    ip, port = "10.96.1.2", 8443
    cases = [
        (S.pack_lb4_key(ip, port, 6), S.Lb4Key(S.be32(ip), S.be16(port), 6, 0)),
        (S.pack_lb4_service(7, 3), S.Lb4Service(7, 3, 0)),
        (S.pack_lb4_backend_key(7, 2), S.Lb4BackendKey(7, 2)),
        (S.pack_lb4_backend(ip, port, 17), S.Lb4Backend(S.be32(ip), S.be16(port), 17, 0)),
        (S.pack_lb4_reverse_nat(ip, port), S.Lb4ReverseNat(S.be32(ip), S.be16(port), 0)),
        (S.pack_u32(123456), ct.c_uint32(123456)),
    ]
    for packed, struct in cases:
        assert packed == bytes(struct), type(struct).__name__
    for cls, packer in S.PACKERS.items():
        assert packer.size == ct.sizeof(cls), cls.__name__
    # and back
    assert S.unpack_lb4_key(S.pack_lb4_key(ip, port, 6)) == (ip, port, 6)
    assert S.unpack_lb4_backend(S.pack_lb4_backend(ip, port, 17)) == (ip, port, 17)
    assert S.unpack_lb4_service(S.pack_lb4_service(7, 3)) == (7, 3)


def test_every_map_value_and_key_type_is_a_known_struct():
    known = set(S.C_STRUCTS.values()) | {ct.c_uint32}
    for spec in S.MAPS.values():
        assert spec.key in known and spec.leaf in known, spec.name


@pytest.mark.needs("gcc")
def test_c_layouts_match_as_gcc_sees_them(tmp_path):
    assert_c_layouts(S.C_STRUCTS, S.C_CONSTANTS, ['#include "lib/common.h"'], BPF_DIR, tmp_path)


@pytest.mark.needs("root", "bcc")  # bcc creates the maps
@pytest.mark.parametrize("source,maps", [("bpf_sock.c", S.SOCK_MAPS), ("bpf_lxc.c", S.LXC_MAPS)])
def test_bcc_typed_views_of_every_map_match(source, maps):
    from bcc import BPF

    from labkit.ebpf.loader import flatten_source

    types = {"hash": 1, "array": 2, "lru_hash": 9}  # BPF_MAP_TYPE_*
    bpf = BPF(text=flatten_source(BPF_DIR / source).encode())
    try:
        assert _num_tables(bpf) == len(maps)  # no map the Python side does not know
        for spec in maps:
            table = bpf[spec.name.encode()]
            assert table.ttype == types[spec.kind], spec.name
            assert table.max_entries == spec.max_entries, spec.name
            for ours, theirs in ((spec.key, table.Key), (spec.leaf, table.Leaf)):
                assert ct.sizeof(theirs) == ct.sizeof(ours), f"{spec.name}: {theirs} vs {ours.__name__}"
                if issubclass(ours, ct.Structure):
                    assert fields(theirs) == fields(ours), f"{spec.name}: {ours.__name__}"
    finally:
        bpf.cleanup()


def _num_tables(bpf) -> int:
    from bcc.libbcc import lib as bcclib

    lib = ct.CDLL(bcclib._name)  # own handle: declaring argtypes here leaves bcc's alone
    lib.bpf_num_tables.argtypes, lib.bpf_num_tables.restype = [ct.c_void_p], ct.c_size_t
    return lib.bpf_num_tables(bpf.module)
