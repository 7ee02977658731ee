"""BPF maps as the loader sees them: a :class:`MapSpec` describes one map as the C declares it, and a
:class:`PinnedMap` opens it by its pin and reads or writes it in batches of packed entries.

One job: move raw entries between Python and a pinned map in as few syscalls as the kernel allows
(``BPF_MAP_{UPDATE,DELETE,LOOKUP}_BATCH``), plus single lookups and per-CPU reads. What the bytes
mean is the clients' business (``labkit.datapath.ebpf_structs``, ``labkit.policy.ebpf_structs``).
Map names are the C's (``lk_…``); a map's pin is ``<bpffs folder>/maps/<name>``.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .libbpf import lib, obj_get, possible_cpus, syscall_error


@dataclass(frozen=True)
class MapSpec:
    """One map as the C declares it."""

    name: str
    kind: str  # bcc table type: "hash" / "lru_hash" / "array" / "lpm_trie" / "percpu_array"
    key: type
    leaf: type
    max_entries: int


class PinnedMap:
    """A BPF map opened by its pin, written and read in batches of raw packed entries."""

    def __init__(self, spec: MapSpec, path: Path):
        self.spec, self.path = spec, path
        self.key_size, self.leaf_size = ct.sizeof(spec.key), ct.sizeof(spec.leaf)
        self.fd = obj_get(path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def update(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        """Insert or replace ``keys[i]`` -> ``values[i]`` (packed structs) in one syscall."""
        if not keys:
            return
        count = ct.c_uint32(len(keys))
        if lib().bpf_map_update_batch(self.fd, b"".join(keys), b"".join(values), ct.byref(count), None) != 0:
            raise syscall_error(f"update {self.spec.name} ({count.value}/{len(keys)} written)")

    def delete(self, keys: Sequence[bytes]) -> None:
        """Delete all ``keys`` in one syscall; keys already gone are skipped (the kernel stops at
        the first missing one: the rest is retried from there)."""
        rest = list(keys)
        while rest:
            buf = b"".join(rest)
            count = ct.c_uint32(len(rest))
            if lib().bpf_map_delete_batch(self.fd, buf, ct.byref(count), None) == 0:
                return
            err = ct.get_errno()
            if err != errno.ENOENT:
                raise syscall_error(f"delete {self.spec.name}")
            rest = rest[count.value + 1:]  # count = deleted before the missing key

    def dump(self, chunk: int = 16384) -> tuple[list[bytes], bytes]:
        """Every packed key (a list) and every packed value (one buffer, same order) in the map,
        read with ``BPF_MAP_LOOKUP_BATCH``."""
        cdll = lib()
        n = min(chunk, self.spec.max_entries)
        ks, vs = self.key_size, self.leaf_size
        keys = ct.create_string_buffer(n * ks)
        vals = ct.create_string_buffer(n * vs)
        in_batch, out_batch = ct.c_uint64(0), ct.c_uint64(0)  # hash maps use a u32 bucket cursor
        all_keys: list[bytes] = []
        all_vals: list[bytes] = []
        first = True
        while True:
            count = ct.c_uint32(n)
            res = cdll.bpf_map_lookup_batch(self.fd, None if first else ct.byref(in_batch),
                                            ct.byref(out_batch), keys, vals, ct.byref(count), None)
            if res != 0 and ct.get_errno() != errno.ENOENT:
                raise syscall_error(f"lookup {self.spec.name}")
            got = count.value
            kraw = keys.raw[: got * ks]
            all_keys += [kraw[i:i + ks] for i in range(0, len(kraw), ks)]
            all_vals.append(vals.raw[: got * vs])
            if res != 0:  # ENOENT: the whole map was read
                return all_keys, b"".join(all_vals)
            in_batch.value = out_batch.value
            first = False

    def items(self) -> list[tuple[bytes, bytes]]:
        keys, vals = self.dump()
        vs = self.leaf_size
        return [(k, vals[i * vs:(i + 1) * vs]) for i, k in enumerate(keys)]

    def get(self, key: bytes) -> bytes | None:
        val = ct.create_string_buffer(self.leaf_size)
        if lib().bpf_map_lookup_elem(self.fd, key, val) != 0:
            return None
        return val.raw

    def get_percpu(self, key: bytes) -> list[bytes]:
        """The value of ``key`` on every possible CPU, of a per-CPU map (the kernel hands them out
        one after the other, each padded to 8 bytes)."""
        stride = (self.leaf_size + 7) & ~7
        ncpu = possible_cpus()
        buf = ct.create_string_buffer(stride * ncpu)
        if lib().bpf_map_lookup_elem(self.fd, key, buf) != 0:
            raise syscall_error(f"lookup {self.spec.name}")
        raw = buf.raw
        return [raw[c * stride:c * stride + self.leaf_size] for c in range(ncpu)]

    def __len__(self) -> int:
        return len(self.dump()[0])
