"""The test run's leak check, a pytest plugin (``-p leakcheck``; tests/conftest.py loads it).

At the start of the session it takes a snapshot of every object a lab, a datapath, a doctor probe or
a test could leave on this machine; at the end (whatever ran, in whatever order) it takes another and
FAILS the run if anything is new: namespaces, host links, cgroup folders, bpffs and other mounts
under labkit's state, lab state folders, nftables tables and iptables rules of the host namespace,
processes of a lab or of labkit's tools, VMs, libvirt networks and volumes, a libvirtd labkit
started. Every such object carries labkit's prefix (``lk``: ``lk-<lab>``, ``lktest-…``, ``lkdoc-…``,
``lx-<pod>``), except the host's own tables and links, which are compared with the snapshot.
Objects already there at the start are reported too, as a warning (another run's, not this one's).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

PREFIXES = ("lk", "lx-")
TOOLS = re.compile(r"^(lkserver|lkclient|lkexec)(-[0-9a-f]+)?$|^iperf3$|^qemu-system")


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _ours(name: str) -> bool:
    return name.startswith(PREFIXES)


def snapshot() -> dict[str, set[str]]:
    """Every object of the kinds a lab makes, as ``kind -> names`` (the host's links and tables all;
    the rest only where they carry labkit's prefix)."""
    from pyroute2 import IPRoute

    from labkit import nsexec
    from labkit.state import STATE_ROOT

    out: dict[str, set[str]] = {}
    out["netns"] = {n for n in nsexec.list_netns() if _ours(n)}
    with IPRoute() as ipr:
        out["host links"] = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    root = nsexec.cgroup2_root()
    out["cgroups"] = {str(p) for p in root.rglob("lk*") if p.is_dir()} if root else set()
    mounts = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            mnt, (fstype, source) = left.split()[4], right.split()[:2]
            if mnt.startswith(str(STATE_ROOT)) or (fstype == "bpf" and source.startswith("lk")):
                mounts.add(f"{mnt} ({fstype})")
    out["mounts"] = mounts
    out["lab state"] = {p.name for p in STATE_ROOT.iterdir() if p.is_dir()} if STATE_ROOT.is_dir() else set()
    out["host nftables tables"] = {ln.strip() for ln in _run(["nft", "list", "tables"]).splitlines() if ln.strip()}
    rules = set()
    for tool in ("iptables-legacy-save", "iptables-nft-save", "ip6tables-legacy-save", "ip6tables-nft-save"):
        rules |= {f"{tool}: {ln}" for ln in _run([tool]).splitlines() if ln.startswith(("-A", ":LIBVIRT", ":KUBE",
                                                                                          ":LKPOL"))}
    out["host iptables"] = rules
    out["processes"] = _processes(nsexec)
    out["VMs and libvirt objects"] = _libvirt()
    return out


def _processes(nsexec) -> set[str]:
    """labkit's tools and anything inside a namespace of labkit's (by name and netns inode)."""
    inodes = {}
    for n in nsexec.list_netns():
        if _ours(n):
            ino = nsexec.netns_inode(n)
            if ino:
                inodes[ino] = n
    found = set()
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            comm = (proc / "comm").read_text().strip()
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            ino = os.stat(proc / "ns" / "net").st_ino
        except OSError:
            continue
        if ino in inodes:
            found.add(f"{comm} in {inodes[ino]}")
        elif TOOLS.match(comm) and (not comm.startswith("qemu") or " lk-" in cmd or "guest=lk-" in cmd):
            found.add(f"{comm}: {cmd[:100]}")
        elif comm in ("libvirtd", "virtlogd", "vagrant", "ruby") and ("/run/labkit" in cmd or comm.endswith("d")):
            found.add(f"{comm}: {cmd[:100]}")
    return found


def _libvirt() -> set[str]:
    if not Path("/run/libvirt/libvirt-sock").exists():
        return set()
    virsh = ["virsh", "-c", "qemu:///system", "-q"]
    out = {f"domain {d}" for d in _run([*virsh, "list", "--all", "--name"]).split() if _ours(d)}
    out |= {f"network {n}" for n in _run([*virsh, "net-list", "--all", "--name"]).split() if _ours(n)}
    out |= {f"volume {v.split()[0]}" for v in _run([*virsh, "vol-list", "default"]).splitlines()
            if v.split() and _ours(v.split()[0])}
    return out


def leaks(before: dict[str, set[str]], after: dict[str, set[str]]) -> dict[str, list[str]]:
    """What ``after`` holds that ``before`` did not, per kind."""
    return {k: sorted(after[k] - before.get(k, set())) for k in after if after[k] - before.get(k, set())}


_BEFORE: dict[str, set[str]] = {}
_ENABLED = os.geteuid() == 0


def pytest_sessionstart(session):
    if _ENABLED:
        _BEFORE.update(snapshot())


def pytest_sessionfinish(session, exitstatus):
    if not _ENABLED:
        return
    found = leaks(_BEFORE, snapshot())
    session.config._labkit_leaks = (found, {k: sorted(v) for k, v in _BEFORE.items()
                                            if v and k not in ("host links", "host nftables tables", "host iptables")})
    if found and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    found, earlier = getattr(config, "_labkit_leaks", ({}, {}))
    if earlier:
        terminalreporter.section("labkit objects already there when the run started (not this run's)")
        for kind, names in earlier.items():
            terminalreporter.write_line(f"{kind}: {', '.join(names[:20])}")
    if found:
        terminalreporter.section("LEAK: objects the test run left behind", red=True, bold=True)
        for kind, names in found.items():
            terminalreporter.write_line(f"{kind}: {', '.join(names[:20])}" + (" …" if len(names) > 20 else ""),
                                        red=True)
        terminalreporter.write_line("A test or a teardown leaks: the run fails. Find which (run files alone), fix the "
                                    "teardown, then remove the objects (labkit down, or by hand).", red=True)
