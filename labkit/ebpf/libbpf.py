"""libbpf's syscall wrappers through ctypes, and the kernel's numbers for program and attach types.

One job: reach the ``bpf(2)`` commands labkit needs (object get/pin, program attach/detach/query,
object info, map element and batch operations) without a compiled extension. The library is the
libbpf that bcc's libbcc links, opened with a CDLL of our own so that the ``argtypes`` declared here
never change bcc's. Constants are named as ``uapi/linux/bpf.h`` names them, without the ``BPF_``
prefix: ``PROG_<TYPE>``, ``ATTACH_<TYPE>``.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import sys
from collections.abc import Iterable
from pathlib import Path

# bpf_prog_type / bpf_attach_type (uapi/linux/bpf.h)
PROG_SCHED_CLS = 3
PROG_CGROUP_SOCK_ADDR = 18
ATTACH_CGROUP_INET4_CONNECT = 10
ATTACH_CGROUP_UDP4_SENDMSG = 14
ATTACH_CGROUP_UDP4_RECVMSG = 19

KERNEL_NAME_LEN = 15  # BPF_OBJ_NAME_LEN - 1: program names as the kernel reports them

_LIB: ct.CDLL | None = None


def lib() -> ct.CDLL:
    """libbpf's syscall wrappers, reached through bcc's libbcc (which links libbpf)."""
    global _LIB
    if _LIB is None:
        try:
            from bcc.libbcc import lib as bcclib

            name = bcclib._name
        except ImportError:  # cleanup must work even where bcc cannot be imported
            name = "libbpf.so.1"
        cdll = ct.CDLL(name, use_errno=True)  # own CDLL: argtypes here do not touch bcc's
        cdll.bpf_obj_get.argtypes = [ct.c_char_p]
        cdll.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
        cdll.bpf_prog_attach.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_uint]
        cdll.bpf_prog_detach2.argtypes = [ct.c_int, ct.c_int, ct.c_int]
        cdll.bpf_prog_query.argtypes = [ct.c_int, ct.c_int, ct.c_uint32, ct.POINTER(ct.c_uint32),
                                        ct.POINTER(ct.c_uint32), ct.POINTER(ct.c_uint32)]
        cdll.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]
        cdll.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
        cdll.bpf_map_update_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p,
                                              ct.POINTER(ct.c_uint32), ct.c_void_p]
        cdll.bpf_map_delete_batch.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32), ct.c_void_p]
        cdll.bpf_map_lookup_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_void_p,
                                              ct.c_void_p, ct.POINTER(ct.c_uint32), ct.c_void_p]
        cdll.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
        _LIB = cdll
    return _LIB


def syscall_error(what: str) -> OSError:
    """The OSError of the libbpf call that just failed (its errno), saying ``what`` was tried."""
    err = ct.get_errno() or errno.EIO
    return OSError(err, f"{what}: {os.strerror(err)}")


def obj_get(path: Path) -> int:
    """fd of a pinned BPF object (map or program)."""
    fd = lib().bpf_obj_get(str(path).encode())
    if fd < 0:
        raise syscall_error(f"bpf_obj_get {path}")
    return fd


def obj_pin(fd: int, path: Path) -> None:
    if lib().bpf_obj_pin(fd, str(path).encode()) != 0:
        raise syscall_error(f"bpf_obj_pin {path}")


def _prog_info(fd: int) -> bytes:
    """struct bpf_prog_info of a loaded program (id at offset 4, name at 64)."""
    info = ct.create_string_buffer(256)
    size = ct.c_uint32(len(info))
    if lib().bpf_obj_get_info_by_fd(fd, info, ct.byref(size)) != 0:
        raise syscall_error("bpf_obj_get_info_by_fd")
    return info.raw


def prog_name(fd: int) -> str:
    """The kernel's name of a program (struct bpf_prog_info.name)."""
    return _prog_info(fd)[64:80].split(b"\0", 1)[0].decode()


def prog_id(fd: int) -> int:
    """The kernel's id of a loaded program (struct bpf_prog_info.id)."""
    return int.from_bytes(_prog_info(fd)[4:8], sys.byteorder)


def named_programs(ids: Iterable[int]) -> list[tuple[int, str]]:
    """(id, kernel name) of programs by id, in the order given; those gone meanwhile left out."""
    out = []
    for pid in ids:
        fd = lib().bpf_prog_get_fd_by_id(pid)
        if fd < 0:
            continue  # detached and freed meanwhile
        try:
            out.append((pid, prog_name(fd)))
        finally:
            os.close(fd)
    return out


def cgroup_programs(cgroup_fd: int, attach_type: int) -> list[tuple[int, str]]:
    """(id, name) of the programs attached directly to a cgroup for one attach type."""
    ids = (ct.c_uint32 * 64)()
    cnt, flags = ct.c_uint32(64), ct.c_uint32(0)
    if lib().bpf_prog_query(cgroup_fd, attach_type, 0, ct.byref(flags), ids, ct.byref(cnt)) != 0:
        raise syscall_error("bpf_prog_query")
    return named_programs(ids[: cnt.value])


def possible_cpus() -> int:
    """How many CPUs the kernel may bring up: the number of values a per-CPU map holds per key."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n
