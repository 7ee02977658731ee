"""``labkit doctor``: which kernel features and tools labkit uses are here, and how to get the rest.

Every capability labkit relies on has one probe returning a :class:`Capability` row: its name (the
feature name other modules pass to :func:`require`), ``ok`` / ``missing`` / ``warn``, a detail, and
one line saying how to fix it. Probes try the real thing rather than read kernel config: link types,
the clsact qdisc, netfilter tables and ip_vs are tried inside ONE throwaway namespace ``lkdoc-<pid>``
(created on first need, removed in ``finally``), so the host namespace is never changed. bcc's
import and compile+load run in a child interpreter, where clang's output and any crash stay.

Other modules ask before building: ``require("ipvlan", "pod mode eni-ipvlan")`` probes only that
feature (results are cached per process) and raises :class:`~labkit.errors.MissingFeature` carrying
the fix line. ``warn`` rows (e.g. BPF JIT off) do not make :func:`require` fail.

The netns backend is ready when the :data:`NETNS_CORE` features are ok; ipvlan, ip_vs and the VM
rows never block it: what this kernel lacks runs on the VM backend (Debian's kernels under QEMU: 6.1,
or 6.12 with ``release: trixie`` for netkit).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from labkit import nsexec
from labkit.errors import MissingFeature, UsageError

T = TypeVar("T")
OK, MISSING, WARN = "ok", "missing", "warn"
PROBE_PREFIX = "lkdoc-"
NETNS_CORE = ("root", "netns", "veth", "bridge", "vxlan", "macvlan")
VM_BACKEND = ("use the VM backend (`backend: vagrant`: Debian 12's 6.1 kernel, or Debian 13's 6.12 with "
              "`release: trixie`) — see `labkit doctor` VM rows")
SETUP = "run ./setup.sh"
DEBIAN_BCC = Path("/usr/lib/python3/dist-packages/bcc")

# What a missing feature takes away, for the summary line (pod modes add theirs: used_by()).
USED_BY = {
    "ip_vs": "datapath ipvs",
    "br_netfilter": "iptables on bridged pod traffic",
    "iptables-legacy": "datapath iptables-legacy",
    "iptables-nft": "datapath iptables-nft",
    "nftables": "datapath nftables",
    "ipset": "datapath ipvs (ipset)",
    "tc-clsact": "datapath ebpf-tc",
}


@dataclass(frozen=True)
class Capability:
    """One row of the doctor's table. ``fix`` is one line, empty when ``status`` is ok."""

    name: str
    group: str
    status: str
    detail: str
    fix: str = ""


class _Result(NamedTuple):
    status: str
    detail: str
    fix: str = ""


def _ok(detail: str) -> _Result:
    return _Result(OK, detail)


def _missing(detail: str, fix: str) -> _Result:
    return _Result(MISSING, detail, fix)


def _warn(detail: str, fix: str) -> _Result:
    return _Result(WARN, detail, fix)


def _which(tool: str) -> str | None:
    """Path of ``tool``, also looking in the sbin folders a non-login root shell may lack."""
    path = os.environ.get("PATH", os.defpath) + ":/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which(tool, path=path)


def _first_error(text: str) -> str:
    """The line of a tool's stderr worth showing: the first mentioning an error, else the last."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower():
            return ln[:200]
    return lines[-1][:200] if lines else "(no output)"


def sweep_probe_namespaces() -> list[str]:
    """Remove the probe namespaces of processes that are gone (a doctor run SIGKILLed mid-probe leaves
    ``lkdoc-<pid>``); a live process's is kept. Called before every probe and by ``labkit down``."""
    gone = []
    for name in nsexec.list_netns(PROBE_PREFIX):
        pid = name[len(PROBE_PREFIX):]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            nsexec.remove_netns(name)
            gone.append(name)
    return gone


class _Probe:
    """State shared by the probes of one doctor run: the throwaway namespace, made on first use."""

    def __init__(self) -> None:
        self.netns = f"{PROBE_PREFIX}{os.getpid()}"
        self._made = False
        self._lower: int | None = None

    def ensure(self) -> None:
        if not self._made:
            sweep_probe_namespaces()
            nsexec.remove_netns(self.netns)  # left by a crashed run that had our pid
            nsexec.create_netns(self.netns)
            self._made = True

    def netlink(self, fn: Callable[[IPRoute], T]) -> T:
        """``fn(ipr)`` with a pyroute2 socket opened and used inside the probe namespace.

        pyroute2 0.9 opens its socket lazily in each calling thread, so a socket object made in the
        namespace but used from this thread would act on the host: open and use it in one thread."""
        self.ensure()

        def work() -> T:
            with IPRoute() as ipr:
                return fn(ipr)

        return nsexec.in_netns(self.netns, work)

    def lower(self) -> int:
        """Index of a veth in the probe namespace, the lower device for macvlan/ipvlan/clsact."""
        if self._lower is None:
            def make(ipr: IPRoute) -> int:
                ipr.link("add", ifname="lkdoc-low0", kind="veth", peer="lkdoc-low1")
                return ipr.link_lookup(ifname="lkdoc-low0")[0]

            self._lower = self.netlink(make)
        return self._lower

    def run(self, argv: list[str], input: str | None = None) -> subprocess.CompletedProcess:
        self.ensure()
        return nsexec.run(argv, netns=self.netns, input=input, check=False, timeout=60)

    def path_exists(self, path: str) -> bool:
        """Whether ``path`` exists as seen from the probe namespace (/proc/thread-self/net, /proc/sys/net)."""
        self.ensure()
        return nsexec.in_netns(self.netns, lambda: os.path.exists(path))

    def close(self) -> None:
        nsexec.remove_netns(self.netns)
        self._made, self._lower = False, None


# ------------------------------------------------------------------ registry

_CHECKS: dict[str, tuple[str, Callable[[_Probe], _Result]]] = {}
_CACHE: dict[str, Capability] = {}
_PROBE_LOCK = threading.Lock()


def _check(name: str, group: str):
    def register(fn: Callable[[_Probe], _Result]) -> Callable[[_Probe], _Result]:
        _CHECKS[name] = (group, fn)
        return fn

    return register


# ------------------------------------------------------------------ host

_CAP_NET_ADMIN, _CAP_SYS_ADMIN = 12, 21


def _effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


@_check("root", "host")
def _root(p: _Probe) -> _Result:
    caps = _effective_caps()
    have = [n for n, bit in (("CAP_NET_ADMIN", _CAP_NET_ADMIN), ("CAP_SYS_ADMIN", _CAP_SYS_ADMIN)) if caps >> bit & 1]
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    if len(have) == 2:
        return _ok(f"{who} with {', '.join(have)}")
    return _missing(f"{who}, effective caps lack CAP_NET_ADMIN/CAP_SYS_ADMIN", "run labkit as root (sudo)")


@_check("netns", "host")
def _netns(p: _Probe) -> _Result:
    p.ensure()
    return _ok(f"named namespaces in {nsexec.NETNS_DIR} (probe {p.netns})")


@_check("cgroup2", "host")
def _cgroup2(p: _Probe) -> _Result:
    root = nsexec.cgroup2_root()
    if root is None:
        return _missing("no cgroup2 mount", "mount -t cgroup2 none /sys/fs/cgroup/unified")
    return _ok(f"mounted at {root}")


# ------------------------------------------------------------------ links and qdiscs

def _try_link(p: _Probe, kind: str, **attrs) -> _Result:
    try:
        p.netlink(lambda ipr: ipr.link("add", ifname=f"lkdoc-{kind}"[:15], kind=kind, **attrs))
    except NetlinkError as exc:
        if exc.code == 95:  # EOPNOTSUPP: no such link kind registered, no module to load
            reason = f"kernel has no {kind} (no module, not built in)"
        else:
            reason = f"kernel refused a {kind} link: {os.strerror(exc.code)}"
        return _missing(reason, f"{reason}: {VM_BACKEND}")
    return _ok(f"created a {kind} link in the probe netns")


@_check("veth", "links")
def _veth(p: _Probe) -> _Result:
    return _try_link(p, "veth", peer="lkdoc-vethp")


@_check("macvlan", "links")
def _macvlan(p: _Probe) -> _Result:
    return _try_link(p, "macvlan", link=p.lower(), macvlan_mode="bridge")


@_check("ipvlan", "links")
def _ipvlan(p: _Probe) -> _Result:
    return _try_link(p, "ipvlan", link=p.lower(), ipvlan_mode=0)  # 0: l2


@_check("netkit", "links")
def _netkit(p: _Probe) -> _Result:
    from labkit.modes.netkit import link_add_args

    try:
        p.netlink(lambda ipr: ipr.link("add", **link_add_args("lkdoc-nk0", "lkdoc-nk1")))
    except NetlinkError as exc:
        reason = ("kernel has no netkit (added in 6.7)" if exc.code == 95
                  else f"kernel refused a netkit link: {os.strerror(exc.code)}")
        return _missing(reason, f"{reason}: use the VM backend with Debian 13's kernel "
                                "(`backend: vagrant` and `release: trixie`: 6.12, netkit built in)")
    return _ok("created a netkit pair in the probe netns")


@_check("vxlan", "links")
def _vxlan(p: _Probe) -> _Result:
    return _try_link(p, "vxlan", vxlan_id=4242, vxlan_port=4789)


@_check("bridge", "links")
def _bridge(p: _Probe) -> _Result:
    return _try_link(p, "bridge")


@_check("br_netfilter", "links")
def _br_netfilter(p: _Probe) -> _Result:
    knob = "/proc/sys/net/bridge/bridge-nf-call-iptables"
    if p.path_exists(knob):
        return _ok(f"per-netns {knob} present")
    reason = "kernel has no br_netfilter (no per-netns /proc/sys/net/bridge)"
    return _missing(reason, f"{reason}: route pod traffic instead of bridging it, or {VM_BACKEND}")


@_check("tc-clsact", "links")
def _tc_clsact(p: _Probe) -> _Result:
    try:
        lower = p.lower()
        p.netlink(lambda ipr: ipr.tc("add", "clsact", lower))
    except NetlinkError as exc:
        reason = f"kernel refused the clsact qdisc: {os.strerror(exc.code)}"
        return _missing(reason, f"{reason}: {VM_BACKEND}")
    return _ok("added a clsact qdisc to a veth in the probe netns")


# ------------------------------------------------------------------ netfilter

# The rule shapes kube-proxy uses: a service chain, MARK for masquerade, statistic + DNAT, MASQUERADE.
_IPTABLES_PROBE = """*nat
:LKDOC-PROBE - [0:0]
-A LKDOC-PROBE -m comment --comment lkdoc -j MARK --set-xmark 0x4000/0x4000
-A LKDOC-PROBE -p tcp -m statistic --mode random --probability 0.5 -j DNAT --to-destination 10.0.0.1:80
-A POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE
COMMIT
"""

# kube-proxy's nftables shape: a verdict map on daddr . l4proto . dport, numgen to pick an endpoint.
_NFT_PROBE = """table ip lkdoc_probe {
  chain endpoint {
    meta l4proto tcp dnat to 10.0.0.1:80
  }
  chain service {
    numgen random mod 2 vmap { 0 : goto endpoint, 1 : goto endpoint }
  }
  map service_ips {
    type ipv4_addr . inet_proto . inet_service : verdict
    elements = { 10.96.0.1 . tcp . 80 : goto service }
  }
  chain nat_prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr . meta l4proto . th dport vmap @service_ips
  }
}
"""


def _load_rules(p: _Probe, tool: str, argv: list[str], rules: str, what: str, package: str) -> _Result:
    path = _which(tool)
    if path is None:
        return _missing(f"no {tool}", f"apt-get install {package}")
    proc = p.run([path, *argv], input=rules)
    if proc.returncode != 0:
        reason = f"kernel rejected {what}: {_first_error(proc.stderr)}"
        return _missing(reason, f"{reason}: {VM_BACKEND}")
    return _ok(f"loaded {what} with {tool} in the probe netns")


@_check("iptables-legacy", "netfilter")
def _iptables_legacy(p: _Probe) -> _Result:
    return _load_rules(p, "iptables-legacy-restore", ["-w"], _IPTABLES_PROBE,
                       "a kube-proxy nat table (legacy x_tables)", "iptables")


@_check("iptables-nft", "netfilter")
def _iptables_nft(p: _Probe) -> _Result:
    return _load_rules(p, "iptables-nft-restore", ["-w"], _IPTABLES_PROBE,
                       "a kube-proxy nat table (iptables over nf_tables)", "iptables")


@_check("nftables", "netfilter")
def _nftables(p: _Probe) -> _Result:
    return _load_rules(p, "nft", ["-f", "-"], _NFT_PROBE,
                       "a kube-proxy nftables table (verdict map, numgen, dnat)", "nftables")


@_check("ipset", "netfilter")
def _ipset(p: _Probe) -> _Result:
    return _load_rules(p, "ipset", ["restore"], "create lkdoc-probe hash:ip,port\n",
                       "a hash:ip,port set", "ipset")


@_check("ip_vs", "netfilter")
def _ip_vs(p: _Probe) -> _Result:
    if p.path_exists("/proc/thread-self/net/ip_vs"):
        return _ok("/proc/net/ip_vs present in the probe netns")
    why = "/proc/net/ip_vs absent"
    ipvsadm = _which("ipvsadm")
    if ipvsadm:
        proc = p.run([ipvsadm, "-Ln"])
        if proc.returncode == 0:
            return _ok("ipvsadm -Ln works in the probe netns")
        why += f"; ipvsadm: {_first_error(proc.stderr)}"
    reason = "kernel has no ip_vs (no module, not built in)"
    return _missing(f"{reason}: {why}", f"{reason}: {VM_BACKEND}")


# ------------------------------------------------------------------ eBPF

_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_MAP_CREATE, _BPF_MAP_TYPE_ARRAY = 0, 2


def _bpf_map_create_errno() -> int:
    """Create (and close) a one-entry array map with the bpf() syscall; 0 on success, else errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    attr = (ctypes.c_uint32 * 32)(_BPF_MAP_TYPE_ARRAY, 4, 8, 1)  # type, key size, value size, entries
    fd = libc.syscall(_SYS_BPF[platform.machine()], _BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        return ctypes.get_errno()
    os.close(fd)
    return 0


@_check("bpf", "ebpf")
def _bpf(p: _Probe) -> _Result:
    if platform.machine() not in _SYS_BPF:
        return _warn(f"no bpf() syscall number known for {platform.machine()}", "see the bcc-compile row")
    err = _bpf_map_create_errno()
    if err == 0:
        return _ok("bpf(BPF_MAP_CREATE) works")
    reason = f"bpf() syscall failed: {os.strerror(err)}"
    fix = "run labkit as root" if err == 1 else VM_BACKEND
    return _missing(reason, f"{reason}: {fix}")


@_check("bpf-jit", "ebpf")
def _bpf_jit(p: _Probe) -> _Result:
    knob = Path("/proc/sys/net/core/bpf_jit_enable")
    if not knob.exists():
        return _missing("no BPF JIT in this kernel", "eBPF runs interpreted: numbers are not comparable; "
                        + VM_BACKEND)
    value = knob.read_text().strip()
    if value == "0":
        return _warn("bpf_jit_enable = 0 (interpreter)", "sysctl -w net.core.bpf_jit_enable=1")
    return _ok(f"bpf_jit_enable = {value}")


@_check("btf", "ebpf")
def _btf(p: _Probe) -> _Result:
    vmlinux = Path("/sys/kernel/btf/vmlinux")
    if vmlinux.exists():
        return _ok(f"{vmlinux} ({vmlinux.stat().st_size // 1024} KiB)")
    return _missing("no /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF off)",
                    "bcc still compiles with kernel headers; BTF-based tools need a kernel with BTF")


def _header_links() -> dict[str, Path]:
    """Where bcc looks for kernel headers: /lib/modules/$(uname -r)/{build,source}."""
    mod = Path("/lib/modules") / os.uname().release
    return {name: mod / name for name in ("build", "source")}


@_check("kernel-headers", "ebpf")
def _kernel_headers(p: _Probe) -> _Result:
    links = _header_links()
    bad = [str(path) for path in links.values() if not path.is_dir()]
    if bad:
        if Path("/sys/kernel/kheaders.tar.xz").exists():
            return _ok("kernel ships its headers (/sys/kernel/kheaders.tar.xz)")
        return _missing(f"missing or dangling: {', '.join(bad)}",
                        f"{SETUP} (installs linux-headers and links {', '.join(bad)} to them)")
    targets = ", ".join(f"{name} -> {path.resolve()}" for name, path in links.items())
    return _ok(targets)


_BCC_IMPORT = "import os, bcc; print(os.path.realpath(os.path.dirname(bcc.__file__)))"

_BCC_COMPILE = """
import time
from bcc import BPF, BPFAttachType
start = time.monotonic()
b = BPF(text="int lkdoc_connect4(struct bpf_sock_addr *ctx) { return 1; }")
b.load_func("lkdoc_connect4", BPF.CGROUP_SOCK_ADDR, attach_type=BPFAttachType.CGROUP_INET4_CONNECT)
print(f"{time.monotonic() - start:.1f}")
"""


def _python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a child of this interpreter (same venv), so crashes and clang noise stay there."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd="/", stdin=subprocess.DEVNULL)


@_check("bcc", "ebpf")
def _bcc(p: _Probe) -> _Result:
    proc = _python(_BCC_IMPORT)
    if proc.returncode != 0:
        if not DEBIAN_BCC.is_dir():
            return _missing("python3-bpfcc not installed",
                            "apt-get install python3-bpfcc (never `pip install bcc`: PyPI's bcc is unrelated)")
        return _missing(f"import bcc failed in {sys.prefix}: {_first_error(proc.stderr)}",
                        f"{SETUP} (makes Debian's bcc visible to .venv through .venv/debian-bcc and a .pth)")
    where = proc.stdout.strip()
    if Path(where) != DEBIAN_BCC:
        return _warn(f"bcc imported from {where}, not Debian's {DEBIAN_BCC}",
                     "pip uninstall bcc (PyPI's bcc is unrelated), then " + SETUP)
    return _ok(f"import bcc -> {where}")


@_check("bcc-compile", "ebpf")
def _bcc_compile(p: _Probe) -> _Result:
    proc = _python(_BCC_COMPILE)
    if proc.returncode == 0:
        return _ok(f"compiled and loaded a cgroup/connect4 program in {proc.stdout.strip()} s")
    err = _first_error(proc.stderr)
    if "No module named" in err:
        return _missing(err, "see the bcc row")
    if "kconfig.h" in err or "kernel headers" in proc.stderr:
        return _missing(f"clang found no kernel headers: {err}", f"{SETUP} (links kernel headers for bcc)")
    return _missing(err, "see the bpf, btf and kernel-headers rows")


# ------------------------------------------------------------------ tools

def _tool(name: str, package: str, used_by: str) -> _Result:
    path = _which(name)
    if path:
        return _ok(path)
    return _missing(f"no {name} ({used_by})", f"apt-get install {package}")


@_check("ipvsadm", "tools")
def _ipvsadm(p: _Probe) -> _Result:
    return _tool("ipvsadm", "ipvsadm", "datapath ipvs")


@_check("iperf3", "tools")
def _iperf3(p: _Probe) -> _Result:
    return _tool("iperf3", "iperf3", "throughput runs")


@_check("sockperf", "tools")
def _sockperf(p: _Probe) -> _Result:
    return _tool("sockperf", "sockperf", "latency runs")


@_check("gcc", "tools")
def _gcc(p: _Probe) -> _Result:
    return _tool("gcc", "gcc", "labkit's C load generator")


@_check("nginx", "tools")
def _nginx(p: _Probe) -> _Result:
    return _tool("nginx", "nginx-light", "the http workload's server")


@_check("wrk", "tools")
def _wrk(p: _Probe) -> _Result:
    return _tool("wrk", "wrk", "the http workload's client")


# ------------------------------------------------------------------ VM backend

_VM_PACKAGES = "apt-get install vagrant vagrant-libvirt libvirt-daemon-system qemu-system-x86"


@_check("vagrant", "vm")
def _vagrant(p: _Probe) -> _Result:
    path = _which("vagrant")
    if path is None:
        return _missing("no vagrant", _VM_PACKAGES)
    proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    return _ok(proc.stdout.strip() or path)


@_check("vagrant-libvirt", "vm")
def _vagrant_libvirt(p: _Probe) -> _Result:
    path = _which("vagrant")
    if path is None:
        return _missing("no vagrant", _VM_PACKAGES)
    proc = subprocess.run([path, "plugin", "list"], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    if "vagrant-libvirt" in proc.stdout:
        return _ok(_first_line_with(proc.stdout, "vagrant-libvirt"))
    return _missing("vagrant has no vagrant-libvirt plugin", "apt-get install vagrant-libvirt")


def _first_line_with(text: str, word: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if word in ln), word)


@_check("libvirtd", "vm")
def _libvirtd(p: _Probe) -> _Result:
    if _which("libvirtd") is None:
        return _missing("no libvirtd", "apt-get install libvirt-daemon-system")
    if not Path("/run/libvirt/libvirt-sock").exists():
        return _warn("libvirtd installed but not running (no /run/libvirt/libvirt-sock)",
                     "start it by hand (no service manager here): virtlogd -d; libvirtd -d")
    return _ok("running (/run/libvirt/libvirt-sock)")


@_check("qemu", "vm")
def _qemu(p: _Probe) -> _Result:
    path = _which("qemu-system-x86_64")
    if path is None:
        return _missing("no qemu-system-x86_64", "apt-get install qemu-system-x86")
    return _ok(path)


@_check("kvm", "vm")
def _kvm(p: _Probe) -> _Result:
    tcg = "labkit's VMs use QEMU TCG (functional, slower; absolute numbers inside VMs mean little)"
    if not Path("/dev/kvm").exists():
        return _warn(f"no /dev/kvm; {tcg}", "nothing to do: TCG needs no KVM")
    return _ok(f"/dev/kvm present, but KVM here may not run Debian kernels; {tcg}")


@_check("box", "vm")
def _box(p: _Probe) -> _Result:
    from labkit.backends.vagrant import box

    return _Result(*box.doctor_row())


# ------------------------------------------------------------------ public API

FEATURES = tuple(_CHECKS)


def _known(feature: str) -> None:
    if feature not in _CHECKS:
        raise ValueError(f"unknown doctor feature {feature!r}; known: {', '.join(FEATURES)}")


def _probe(names: Iterable[str]) -> None:
    """Run the probes of ``names`` not yet cached, sharing one probe namespace, removed at the end.
    One thread at a time (the namespace is the process's: the daemon builds labs for several users
    at once, and two threads' probes removed each other's namespace, caching 'netns missing')."""
    with _PROBE_LOCK:
        _probe_locked(list(names))


def _probe_locked(names: list[str]) -> None:
    todo = [n for n in names if n not in _CACHE]
    if not todo:
        return
    probe = _Probe()
    try:
        for name in todo:
            group, fn = _CHECKS[name]
            try:
                res = fn(probe)
            except Exception as exc:  # a probe that cannot run is reported, not raised
                res = _missing(f"probe failed: {type(exc).__name__}: {exc}"[:200],
                               "run labkit as root; see the root and netns rows")
            _CACHE[name] = Capability(name, group, *res)
    finally:
        probe.close()


def run_checks(groups: Iterable[str] | None = None) -> list[Capability]:
    """Every capability row (or those of ``groups``: host, links, netfilter, ebpf, tools, vm)."""
    wanted = set(groups) if groups is not None else None
    names = [n for n, (g, _) in _CHECKS.items() if wanted is None or g in wanted]
    _probe(names)
    return [_CACHE[n] for n in names]


def check(feature: str) -> Capability:
    """The row of one feature, probing only it (cached per process)."""
    _known(feature)
    _probe([feature])
    return _CACHE[feature]


def has(feature: str) -> bool:
    """Whether ``feature`` is usable here (``ok`` or ``warn``)."""
    return check(feature).status != MISSING


def require(feature: str, needed_by: str) -> Capability:
    """Raise MissingFeature (with the doctor's fix) unless ``feature`` is usable; probes only it."""
    cap = check(feature)
    if cap.status == MISSING:
        raise MissingFeature(feature, needed_by, cap.fix)
    return cap


def used_by(feature: str) -> str:
    """What a missing ``feature`` takes away: the pod modes that need it, or a datapath."""
    from . import modes

    users = [f"pod mode {m.name}" for m in modes.MODES if feature in m.features]
    return " and ".join(users) if users else USED_BY.get(feature, feature)


def netns_backend_ready(results: Iterable[Capability]) -> bool:
    """True when every NETNS_CORE feature is among ``results`` and not missing."""
    status = {c.name: c.status for c in results}
    return all(status.get(name, MISSING) != MISSING for name in NETNS_CORE)


def summary(results: list[Capability]) -> str:
    """One line: is the netns backend ready, what moves to the VM backend, is the VM backend ready."""
    missing = [c for c in results if c.status == MISSING]
    core = [c.name for c in missing if c.name in NETNS_CORE]
    to_vm = [c for c in missing if c.name not in NETNS_CORE and c.group != "vm" and "use the VM backend" in c.fix]
    other = [c.name for c in missing if c.name not in core and c not in to_vm and c.group != "vm"]
    vm_missing = [c.name for c in missing if c.group == "vm"]
    parts = ["netns backend: " + ("ready" if not core else f"NOT ready ({', '.join(core)} missing)")]
    if to_vm:
        users = " and ".join(used_by(c.name) for c in to_vm)
        parts.append(f"({', '.join(c.name for c in to_vm)} missing: {users} run on the VM backend)")
    if other:
        parts.append(f"; also missing: {', '.join(other)} (fixes above)")
    if any(c.group == "vm" for c in results):
        vm = "ready" if not vm_missing else f"not set up ({', '.join(vm_missing)} missing)"
        parts.append(f"; VM backend: {vm}")
    return " ".join(parts).replace(" ;", ";")


def format_table(results: list[Capability]) -> str:
    """A plain aligned table, grouped, with each fix on the line under its row."""
    width = max(len(c.name) for c in results) + 2
    lines = [f"{'CAPABILITY':<{width}}{'STATUS':<9}DETAIL"]
    group = None
    for c in results:
        if c.group != group:
            group = c.group
            lines.append(f"-- {group}")
        lines.append(f"{c.name:<{width}}{c.status:<9}{c.detail}")
        if c.fix and c.status != OK:
            lines.append(f"{'':<{width + 9}}fix: {c.fix}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the rows as JSON")


def cli(args: argparse.Namespace) -> int:
    """``labkit doctor``: exit 0 when the netns backend can run here."""
    start = time.monotonic()
    results = run_checks()
    ready = netns_backend_ready(results)
    if args.json:
        print(json.dumps({"capabilities": [asdict(c) for c in results], "netns_backend_ready": ready,
                          "summary": summary(results)}, indent=2))
    else:
        print(format_table(results))
        print(f"\n{summary(results)}  [{time.monotonic() - start:.1f} s]")
    return 0 if ready else 1


# ------------------------------------------------------------------ performance preflight of a host

# user@host[:port]: a user and host of letters, digits, '.', '_', '-' (never first: ssh would read an
# option), or a bracketed IPv6 address. Nothing a shell or ssh's option parser could act on gets through.
_TARGET = re.compile(r"(?:(?P<user>[A-Za-z0-9_][A-Za-z0-9._-]{0,31})@)?"
                     r"(?P<host>[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]{2,45}\])"
                     r"(?::(?P<port>[0-9]{1,5}))?")
_NIC = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")
LOCAL_TARGETS = ("localhost", "local")
_SSH_DEFAULTS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]  # never wait at a password prompt


def _ssh_destination(target: str) -> tuple[str, list[str]]:
    """``target`` checked strictly, as ssh's destination and port options; UsageError naming --host."""
    match = _TARGET.fullmatch(target)
    if match is None or (match["port"] is not None and not 1 <= int(match["port"]) <= 65535):
        raise UsageError(f"--host {target!r}: expected host, user@host or host:port (letters, digits, '.', "
                         "'_', '-', not starting with '-'; a port 1-65535). Fix: e.g. --host root@10.0.0.2:22, "
                         "or --host localhost for this machine")
    host = match["host"].strip("[]")
    return (f"{match['user']}@{host}" if match["user"] else host), (["-p", match["port"]] if match["port"] else [])


def host_ssh_argv(target: str, nics: list[str], ssh_options: list[str] | None = None) -> list[str]:
    """The ssh command line that runs :mod:`labkit.hostfacts` on ``target`` (its source comes on stdin).

    ``target`` and ``nics`` are checked strictly first (raising UsageError naming ``--host``/``--nics``),
    since both end up on ssh's command line and, for the NICs, in the remote shell's. ``ssh_options``
    come from the caller, not from a user, and go first: ssh keeps the first value of an option."""
    dest, port = _ssh_destination(target)
    bad = [n for n in nics if not _NIC.fullmatch(n)]
    if bad:
        raise UsageError(f"--nics {','.join(bad)!r}: not a network device name (up to 15 letters, digits, "
                         "'_', '.', '-'). Fix: names as `ip -br link` lists them on the host, e.g. --nics eth0")
    remote = ["python3", "-", "--json"] + (["--nics", ",".join(nics)] if nics else [])
    return ["ssh", "-T", *(ssh_options or []), *_SSH_DEFAULTS, *port, "--", dest, shlex.join(remote)]


def _remote_facts(target: str, argv: list[str]) -> dict:
    """Run hostfacts on ``target`` through ``argv`` (from :func:`host_ssh_argv`) and parse its JSON.
    Raises RuntimeError with the reason and the fix when ssh, python3 or the JSON fails."""
    from labkit import hostfacts

    source = Path(hostfacts.__file__).read_text()
    dest, port = _ssh_destination(target)
    reach = shlex.join(["ssh", *port, dest, "true"])  # the commands to try by hand
    python = shlex.join(["ssh", *port, dest, "python3", "--version"])
    try:
        proc = subprocess.run(argv, input=source, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise RuntimeError("no ssh here. Fix: apt-get install openssh-client") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{target} did not answer in 120 s. Fix: check `{reach}`") from None
    if proc.returncode == 255:
        raise RuntimeError(f"ssh to {target} failed: {_first_error(proc.stderr)}. Fix: make `{reach}` "
                           "work without a password prompt (a key; labkit runs ssh with BatchMode=yes)")
    if proc.returncode == 127:  # the remote shell's "command not found"
        raise RuntimeError(f"{target} has no python3. Fix: apt-get install python3 there")
    try:
        facts = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"{target} printed no JSON (exit {proc.returncode}): {_first_error(proc.stderr)}. "
                           f"Fix: check that `{python}` says 3.9 or later") from None
    if not isinstance(facts, dict) or not isinstance(facts.get("rows"), list):
        raise RuntimeError(f"{target} printed JSON without rows. Fix: run hostfacts there by hand: "
                           f"{shlex.join(['ssh', *port, dest, 'python3', '-'])} < {hostfacts.__file__}")
    return facts


def host_cli(target: str, nics: list[str], as_json: bool, ssh_options: list[str] | None = None) -> int:
    """``labkit doctor --host TARGET [--nics ...]``: the performance preflight of TARGET (CPU governor, SMT,
    isolated CPUs, irqbalance, clock source, steal time, NIC offloads and queues, kernel features).

    ``localhost``/``local`` is examined in this process; any other TARGET over ``ssh -T``, running
    :mod:`labkit.hostfacts` from its source on stdin (nothing is installed there; it needs python3 3.9+).
    Exit 0 when no row is missing, 1 when one is or TARGET could not be examined (said on stderr)."""
    from labkit import hostfacts

    nics = list(nics or [])
    argv = host_ssh_argv(target, nics, ssh_options)  # checks target and nics, for the local case too
    start = time.monotonic()
    if target in LOCAL_TARGETS:
        facts = hostfacts.collect(nics)
    else:
        try:
            facts = _remote_facts(target, argv)
        except RuntimeError as exc:
            print(f"labkit doctor --host {target}: {exc}", file=sys.stderr)
            return 1
    rows = facts["rows"]
    missing = [r["name"] for r in rows if r["status"] == MISSING]
    if as_json:
        print(json.dumps({"target": target, **facts}, indent=2))
    else:
        group = f"host {target} ({facts['hostname']}: kernel {facts['kernel']}, {facts['cpus']} CPUs)"
        print(format_table([Capability(r["name"], group, r["status"], r["detail"], r["fix"]) for r in rows]))
        warned = [r["name"] for r in rows if r["status"] == WARN]
        print(f"\n{target}: {len(missing)} missing ({', '.join(missing) or 'none'}), {len(warned)} warn "
              f"({', '.join(warned) or 'none'})  [{time.monotonic() - start:.1f} s]")
    return 1 if missing else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m labkit.doctor`` (the same as ``labkit doctor``)."""
    parser = argparse.ArgumentParser(prog="labkit doctor", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
