"""The host side of a VM lab that libvirt provides: its daemons, networks and the KVM/TCG choice.

- **libvirtd / virtlogd** are started (``-d``) when nothing runs them (no service manager here) and
  stopped by the ``down`` of the last lab that needed them, with the ``LIBVIRT_*`` iptables chains
  libvirt adds to the host if they were not there before (``/run/labkit/.libvirt.json``).
- **Networks** are transient (``virsh net-create``), never forwarded or NATed.
- **Driver**: ``kvm`` only when KVM can run a guest here (probed once, cached), else ``qemu`` (TCG).
  ``LABKIT_VM_DRIVER`` forces one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError

from ... import nsexec
from ...errors import BackendError
from ...state import STATE_ROOT, LabState
from . import box

DAEMONS_FILE = STATE_ROOT / ".libvirt.json"
LIBVIRT_SOCK = Path("/run/libvirt/libvirt-sock")
LIBVIRT_CHAINS = {"filter": {"INPUT": ["LIBVIRT_INP"], "OUTPUT": ["LIBVIRT_OUT"],
                             "FORWARD": ["LIBVIRT_FWX", "LIBVIRT_FWI", "LIBVIRT_FWO"]},
                  "nat": {"POSTROUTING": ["LIBVIRT_PRT"]}, "mangle": {"POSTROUTING": ["LIBVIRT_PRT"]}}
_daemon_lock = threading.Lock()


def _run(argv: list[str], check: bool = True, timeout: float | None = 120, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    if check and proc.returncode != 0:
        raise BackendError(f"{' '.join(argv[:4])} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["virsh", "-c", "qemu:///system", "-q", *args], check=check)


def _pidfile(name: str) -> int | None:
    try:
        pid = int(Path(f"/run/{name}.pid").read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def load_daemons() -> dict:
    try:
        return json.loads(DAEMONS_FILE.read_text())
    except (OSError, json.JSONDecodeError):
        return {"started": {}, "users": [], "chains_before": None}


def _save_daemons(d: dict) -> None:
    DAEMONS_FILE.parent.mkdir(parents=True, exist_ok=True)
    tmp = DAEMONS_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(d, indent=1))
    tmp.replace(DAEMONS_FILE)


def _libvirt_chains() -> list[str]:
    found = []
    for tool in ("iptables", "ip6tables"):
        for table in LIBVIRT_CHAINS:
            proc = subprocess.run([tool, "-t", table, "-S"], capture_output=True, text=True)
            found += [f"{tool}:{table}:{ln.split()[1]}" for ln in proc.stdout.splitlines()
                      if ln.startswith("-N LIBVIRT_")]
    return found + [f"nft:{t}" for t in _host_nft_tables()]


def _host_nft_tables() -> list[str]:
    """``family name`` of every nftables table in the host namespace."""
    proc = subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, text=True)
    try:
        items = json.loads(proc.stdout or "{}").get("nftables", [])
    except json.JSONDecodeError:
        return []
    return [f"{i['table']['family']} {i['table']['name']}" for i in items if "table" in i]


def ensure_libvirtd(lab: str) -> None:
    """Start virtlogd and libvirtd unless running; remember that we did and that ``lab`` uses them."""
    with _daemon_lock:
        d = load_daemons()
        if not LIBVIRT_SOCK.exists() or _pidfile("libvirtd") is None and not libvirtd_answers():
            d["chains_before"] = _libvirt_chains()
            for name in ("virtlogd", "libvirtd"):
                if _pidfile(name) is None:
                    _run([shutil.which(name, path="/usr/sbin:/sbin:" + os.environ.get("PATH", "")) or name, "-d"])
                    for _ in range(100):
                        if _pidfile(name):
                            break
                        time.sleep(0.1)
                    d["started"][name] = _pidfile(name)
            for _ in range(300):
                if LIBVIRT_SOCK.exists() and libvirtd_answers():
                    break
                time.sleep(0.1)
            else:
                raise BackendError("libvirtd did not come up (no answer on /run/libvirt/libvirt-sock)")
        if lab not in d["users"]:
            d["users"].append(lab)
        _save_daemons(d)


def libvirtd_answers() -> bool:
    return subprocess.run(["virsh", "-c", "qemu:///system", "-q", "version"], capture_output=True,
                          timeout=30).returncode == 0


def release_libvirtd(lab: str) -> int:
    """Forget ``lab``; stop the daemons labkit started once no lab and no domain needs them."""
    with _daemon_lock:
        d = load_daemons()
        d["users"] = [u for u in d["users"] if u != lab and LabState(u).exists]
        stopped = 0
        if not d["users"] and d["started"]:
            domains = virsh("list", "--all", "--name", check=False).stdout.split() if LIBVIRT_SOCK.exists() else []
            if not domains:
                for name in ("libvirtd", "virtlogd"):
                    pid = d["started"].get(name)
                    if pid and _pidfile(name) == pid:
                        os.kill(pid, signal.SIGTERM)
                        for _ in range(100):
                            try:
                                os.kill(pid, 0)
                            except ProcessLookupError:
                                break
                            time.sleep(0.1)
                        stopped += 1
                _remove_libvirt_chains(d.get("chains_before") or [])
                d = {"started": {}, "users": [], "chains_before": None}
        if d["users"] or d["started"]:
            _save_daemons(d)
        else:
            DAEMONS_FILE.unlink(missing_ok=True)
        return stopped


def _remove_libvirt_chains(before: list[str]) -> None:
    """libvirt leaves its LIBVIRT_* chains and the jumps to them in the host's tables (IPv4 and
    IPv6): remove those that were not there before labkit started libvirtd."""
    for tool in ("iptables", "ip6tables"):
        for table, hooks in LIBVIRT_CHAINS.items():
            ours = [c for cs in hooks.values() for c in cs if f"{tool}:{table}:{c}" not in before]
            for builtin, chains in hooks.items():
                for chain in chains:
                    while chain in ours and subprocess.run([tool, "-t", table, "-D", builtin, "-j", chain],
                                                           capture_output=True).returncode == 0:
                        pass
            for chain in ours:
                subprocess.run([tool, "-t", table, "-F", chain], capture_output=True)
                subprocess.run([tool, "-t", table, "-X", chain], capture_output=True)
    # iptables-nft made the tables themselves (ip/ip6 filter, nat, mangle) for libvirt's rules: drop
    # those that were not there before and now hold no rule
    for table in _host_nft_tables():
        family, name = table.split()
        if f"nft:{table}" in before or name not in LIBVIRT_CHAINS or family not in ("ip", "ip6"):
            continue
        listing = subprocess.run(["nft", "-j", "list", "table", family, name], capture_output=True, text=True)
        try:
            items = json.loads(listing.stdout or "{}").get("nftables", [])
        except json.JSONDecodeError:
            continue
        if not any("rule" in i for i in items):
            subprocess.run(["nft", "delete", "table", family, name], capture_output=True)


def vm_driver(kernel: Path | None = None) -> str:
    """``kvm`` when KVM can boot a Debian kernel here (``kernel``: the box's; else the cached answer,
    or ``qemu`` when there is none), else ``qemu`` (TCG). Probed once per host kernel, cached."""
    forced = os.environ.get("LABKIT_VM_DRIVER")
    if forced in ("kvm", "qemu"):
        return forced
    if not Path("/dev/kvm").exists():
        return "qemu"
    cache = box.cache_root() / "kvm-probe.json"
    key = f"{os.uname().release} {os.uname().version}"
    try:
        saved = json.loads(cache.read_text())
        if saved.get("kernel") == key and saved.get("probe") == PROBE_VERSION:
            return saved["driver"]
    except (OSError, json.JSONDecodeError, KeyError):
        pass
    if kernel is None or not Path(kernel).exists():
        return "qemu"
    driver = "kvm" if _kvm_boots(Path(kernel)) else "qemu"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"kernel": key, "driver": driver, "probe": PROBE_VERSION}))
    return driver


PROBE_VERSION = 2  # 1 started a paused guest and took "still alive after 3 s" for a working KVM
KVM_BOOT_MARK = "Linux version"


def _kvm_boots(kernel: Path, timeout: float = 30) -> bool:
    """Boot ``kernel`` under KVM with libvirt's CPU model and wait for its first line on the serial
    console. Here KVM runs a BIOS but a Debian kernel hangs right after its real-mode setup
    ("Probing EDD ... ok", then nothing): only the kernel's own output proves KVM can run the VMs.
    (A probe that started a paused guest and took "still alive after 3 s" for success said ``kvm``
    on a busy machine, and every VM of that CI run stayed paused.)"""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return False
    with tempfile.TemporaryDirectory(prefix="labkit-kvm-") as tmp:
        serial = Path(tmp) / "serial"
        try:
            proc = subprocess.Popen([qemu, "-accel", "kvm", "-cpu", "kvm64", "-m", "256", "-nodefaults", "-display",
                                     "none", "-monitor", "none", "-serial", f"file:{serial}", "-no-reboot",
                                     "-kernel", str(kernel), "-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        except OSError:
            return False
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if serial.exists() and KVM_BOOT_MARK in serial.read_text(errors="replace"):
                    return True
                time.sleep(0.2)
            return serial.exists() and KVM_BOOT_MARK in serial.read_text(errors="replace")
        finally:
            proc.kill()
            proc.wait()


def virsh_net_create(xml: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".xml", delete=False) as f:
        f.write(xml)
    try:
        virsh("net-create", f.name)
    finally:
        os.unlink(f.name)


def delete_link(name: str) -> None:
    ipr = nsexec.iproute(None)
    try:
        idx = ipr.link_lookup(ifname=name)
        if idx:
            try:
                ipr.link("del", index=idx[0])
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:  # gone with its peer's namespace meanwhile
                    raise
    finally:
        ipr.close()
