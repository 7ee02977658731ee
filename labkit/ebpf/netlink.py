"""Netlink round trips inside a network namespace, and the tc queries the eBPF runtime builds on.

One job: talk rtnetlink (pyroute2) in the right namespace. Every function takes or opens a pyroute2
socket *inside* the namespace it acts on: pyroute2 0.9 keeps sockets per thread, so a socket built
in one namespace's thread and used from another thread may quietly talk to that other thread's
namespace. :func:`netlink` does the whole round trip in the namespace's helper thread. A namespace
is named as :mod:`labkit.nsexec` names it (None: this one); tc directions by their clsact parent
handle (``ffff:fff2`` ingress, ``ffff:fff3`` egress).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from .. import nsexec

T = TypeVar("T")
MISSING = (errno.ENOENT, errno.EINVAL, errno.ENODEV)  # no clsact / no such filter / no interface


def netlink(netns: str | None, fn: Callable[[Any], T]) -> T:
    """``fn(ipr)`` with an IPRoute socket opened, used and closed inside ``netns`` (None: here)."""
    from pyroute2 import IPRoute

    def work() -> T:
        ipr = IPRoute()
        try:
            return fn(ipr)
        finally:
            ipr.close()

    return nsexec.in_netns(netns, work)


def by_netns(hooks: Iterable[Any]) -> dict[str | None, list[Any]]:
    """Group objects with a ``netns`` attribute by it (one netlink session per namespace)."""
    out: dict[str | None, list[Any]] = {}
    for h in hooks:
        out.setdefault(h.netns, []).append(h)
    return out


def ifindex(ipr, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def ensure_clsact(ipr, index: int) -> bool:
    """Add the clsact qdisc unless present. True if this call created it."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        ipr.tc("add", "clsact", index)
        return True
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise
        return False


def filters(ipr, index: int, parent: str) -> list:
    """The tc filters on one direction (``parent`` "ffff:fff2" ingress, "ffff:fff3" egress); none
    when the interface or its clsact qdisc is gone."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return list(ipr.get_filters(index=index, parent=int(parent.replace(":", ""), 16)))
    except NetlinkError as exc:
        if exc.code in MISSING:
            return []
        raise


def ignore_missing(fn: Callable[[], Any]) -> None:
    """Run a removal, treating "already gone" as done (cleanups are safe to repeat)."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        fn()
    except NetlinkError as exc:
        if exc.code not in MISSING:
            raise
