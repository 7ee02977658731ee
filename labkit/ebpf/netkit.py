"""netkit's own attach points: BPF links on a netkit pair, created, listed and detached with bpf(2).

One job: put a ``sched_cls`` program into a netkit device's program list (kernel 6.7+,
``drivers/net/netkit.c``) and take it out again. A netkit device runs its programs inside its
``ndo_start_xmit``, in the sender's context, before the packet reaches the other end: nothing is
queued, and a program that redirects (to the uplink, or to another pod's device) does so before any
backlog. Both lists are reached through the *primary* device's ifindex, in the primary's namespace:

  ``BPF_NETKIT_PEER``     runs when the peer transmits: what the pod sends (a veth's tc ingress
                          of the node side)
  ``BPF_NETKIT_PRIMARY``  runs when the primary transmits: what goes into the pod (a veth's tc
                          egress of the node side)

A program sees the packet with ``skb->dev`` (``ctx->ifindex``) the receiving end, so the primary
for ``BPF_NETKIT_PEER``; ``ctx->ingress_ifindex`` is not the primary's (the packet was not received
yet), and ``bpf_redirect_peer`` is refused (it is for tc ingress only). Verdicts are tc's numbers:
``NETKIT_NEXT`` (-1, ``TC_ACT_UNSPEC``) runs the next program, then passes; ``NETKIT_PASS`` (0),
``NETKIT_DROP`` (2), ``NETKIT_REDIRECT`` (7) end the list.

Links are created with ``BPF_LINK_CREATE`` (the list's order is the kernel's ``bpf_mprog``: a link
goes before a given program with ``BPF_F_BEFORE | BPF_F_ID``, else at the end) and live as long as
someone holds them: labkit pins each in the client's bpffs folder. ``BPF_LINK_DETACH`` takes a
program out at once, whoever else holds the link; deleting the device detaches its links too.

The calls go straight to ``bpf(2)`` through libc (Debian 12's libbpf 1.1 has no netkit options), so
every function must run in the namespace of the primary (``target_ifindex`` is resolved there).
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import platform
import struct

from .libbpf import named_programs

ATTACH_NETKIT_PRIMARY = 54  # enum bpf_attach_type (uapi/linux/bpf.h, 6.7+)
ATTACH_NETKIT_PEER = 55

# bpf(2) commands and flags (uapi/linux/bpf.h)
_PROG_QUERY = 16
_LINK_CREATE = 28
_LINK_GET_FD_BY_ID = 30
_LINK_DETACH = 34
F_BEFORE = 1 << 3
F_ID = 1 << 5
_NR_BPF = {"x86_64": 321, "aarch64": 280}
_ATTR_SIZE = 128  # bytes passed as union bpf_attr (zeroed past the fields used: the kernel checks)
MAX_PROGS = 64  # programs one list is read for

_LIBC: ct.CDLL | None = None


def _bpf(cmd: int, attr: ct.Array, what: str) -> int:
    """``bpf(cmd, attr, sizeof attr)``; raises OSError naming ``what`` on failure."""
    global _LIBC
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"{what}: bpf(2)'s number on {platform.machine()} is not known to labkit")
    if _LIBC is None:
        _LIBC = ct.CDLL(None, use_errno=True)
        _LIBC.syscall.restype = ct.c_long
    ret = _LIBC.syscall(ct.c_long(nr), ct.c_int(cmd), attr, ct.c_uint(len(attr)))
    if ret < 0:
        err = ct.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def link_create(prog_fd: int, ifindex: int, attach_type: int, before_prog_id: int | None = None) -> int:
    """fd of a new link putting ``prog_fd`` into netkit ``ifindex``'s list ``attach_type``: before the
    program with id ``before_prog_id``, or at the end (None)."""
    attr = ct.create_string_buffer(_ATTR_SIZE)
    flags = F_BEFORE | F_ID if before_prog_id else 0
    # link_create: prog_fd, target_ifindex, attach_type, flags; netkit: relative_id, expected_revision
    struct.pack_into("=IIIII", attr, 0, prog_fd, ifindex, attach_type, flags, before_prog_id or 0)
    return _bpf(_LINK_CREATE, attr, f"netkit link on ifindex {ifindex} ({_side(attach_type)})")


def query(ifindex: int, attach_type: int) -> list[tuple[int, int]]:
    """(program id, link id) of netkit ``ifindex``'s list ``attach_type``, in the order they run
    (link id 0: attached without a link). Empty when the device is gone."""
    ids = (ct.c_uint32 * MAX_PROGS)()
    links = (ct.c_uint32 * MAX_PROGS)()
    attr = ct.create_string_buffer(_ATTR_SIZE)
    # query: target_ifindex, attach_type, query_flags, attach_flags, prog_ids, count, (pad),
    # prog_attach_flags, link_ids
    struct.pack_into("=IIIIQI4xQQ", attr, 0, ifindex, attach_type, 0, 0, ct.addressof(ids), MAX_PROGS, 0,
                     ct.addressof(links))
    try:
        _bpf(_PROG_QUERY, attr, f"netkit programs of ifindex {ifindex} ({_side(attach_type)})")
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            return []
        raise
    count = struct.unpack_from("=I", attr, 24)[0]
    return [(ids[i], links[i]) for i in range(min(count, MAX_PROGS))]


def programs(ifindex: int, attach_type: int) -> list[tuple[int, int, str]]:
    """(program id, link id, kernel name) of a list, in order (programs gone meanwhile left out)."""
    listed = query(ifindex, attach_type)
    names = dict(named_programs(pid for pid, _ in listed))
    return [(pid, link_id, names[pid]) for pid, link_id in listed if pid in names]


def link_detach_id(link_id: int) -> bool:
    """Take the program of link ``link_id`` out of its list (the link object stays while pinned or
    held, defunct). False when no such link exists any more."""
    attr = ct.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=I", attr, 0, link_id)
    try:
        fd = _bpf(_LINK_GET_FD_BY_ID, attr, f"bpf link {link_id}")
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    try:
        attr = ct.create_string_buffer(_ATTR_SIZE)
        struct.pack_into("=I", attr, 0, fd)
        try:
            _bpf(_LINK_DETACH, attr, f"detaching bpf link {link_id}")
        except OSError as exc:
            if exc.errno not in (errno.ENOLINK, errno.ENOENT):  # detached already (device gone)
                raise
        return True
    finally:
        os.close(fd)


def _side(attach_type: int) -> str:
    return {ATTACH_NETKIT_PRIMARY: "into the pod", ATTACH_NETKIT_PEER: "from the pod"}.get(attach_type, "?")
