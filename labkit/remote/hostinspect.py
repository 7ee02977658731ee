"""A read-only look at a host before labkit changes anything on it (the ``hosts`` backend's preflight).

This file's source is sent over ssh to ``python3 -`` on the host, so it uses the standard library
only and writes nothing. It prints one JSON object: who we are there (uid), Python and kernel, every
interface (MAC, state, whether it is enslaved to a bridge or bond, its IPv4 addresses), the devices
of the default routes, the interface the ssh session arrived on, and whether labkit's payload folder
and host records are there already. :mod:`labkit.backends.hosts` decides from it.
"""

import json
import os
import platform
import socket
import subprocess
import sys

REMOTE_ROOT = "/opt/labkit"
JOURNAL_DIR = "/run/labkit-host"


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _addresses():
    """Interface -> IPv4 addresses (``ip -j``: iproute2's JSON output), or None without iproute2."""
    try:
        out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return {i["ifname"]: [f"{a['local']}/{a['prefixlen']}" for a in i.get("addr_info", [])]
            for i in json.loads(out.stdout or "[]")}


def _default_devices():
    """Devices of the main table's default routes (/proc/net/route: the kernel's own table)."""
    devs = []
    for line in (_read("/proc/net/route") or "").splitlines()[1:]:
        cols = line.split()
        if len(cols) > 7 and cols[1] == "00000000" and cols[7] == "00000000":
            devs.append(cols[0])
    return devs


def _ssh_device(addrs):
    """The interface holding the address the ssh session arrived at ($SSH_CONNECTION's third field)."""
    conn = os.environ.get("SSH_CONNECTION", "").split()
    if len(conn) < 3 or addrs is None:
        return None
    for dev, items in addrs.items():
        if any(a.split("/")[0] == conn[2] for a in items):
            return dev
    return None


def inspect():
    links = {}
    addrs = _addresses()
    for name in sorted(os.listdir("/sys/class/net")):
        base = f"/sys/class/net/{name}"
        links[name] = {"mac": (_read(f"{base}/address") or "").lower(), "operstate": _read(f"{base}/operstate"),
                       "enslaved": os.path.exists(f"{base}/master"), "physical": os.path.exists(f"{base}/device"),
                       "addrs": (addrs or {}).get(name, [])}
    payload = "none"
    if os.path.isdir(REMOTE_ROOT):
        payload = "labkit" if os.path.exists(f"{REMOTE_ROOT}/spec.yaml") or not os.listdir(REMOTE_ROOT) else "other"
    records = sorted(f[:-5] for f in os.listdir(JOURNAL_DIR) if f.endswith(".json")) \
        if os.path.isdir(JOURNAL_DIR) else []
    return {"uid": os.getuid(), "python": list(sys.version_info[:2]), "kernel": platform.release(),
            "hostname": socket.gethostname(), "links": links, "addresses_known": addrs is not None,
            "default_devices": _default_devices(), "ssh_device": _ssh_device(addrs), "payload": payload,
            "records": records, "cgroup2": " cgroup2 " in (_read("/proc/mounts") or "")}


if __name__ == "__main__":
    print(json.dumps(inspect()))
