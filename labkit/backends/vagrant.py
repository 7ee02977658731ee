"""The ``vagrant`` backend: one VM per node (Debian's 6.1 kernel: ipvlan, IPVS, BPF), labkit inside each.

How a lab is realised (``P`` = ``lk-<lab>``, ``h`` = 8 hex digits of a hash of the lab name):
- **libvirtd / virtlogd** are started (``-d``) when nothing runs them (no service manager here) and
  stopped by the ``down`` of the last lab that needed them, with the ``LIBVIRT_*`` iptables chains
  libvirt adds to the host if they were not there before (``/run/labkit/.libvirt.json``).
- **Networks**, both transient libvirt networks made by labkit (``virsh net-create``), never forwarded
  or NATed: ``P.mgmt`` (bridge ``lkm<h>``, host-only, DHCP, no DNS: Vagrant's management network, the
  way ``vagrant ssh`` and labkit reach the VMs; its /24 is picked from 192.168.100-199.0 where free)
  and ``P.vpc`` (bridge ``lkv<h>``, no address, ports isolated from each other, ``arp_ignore=8`` so
  that this host never answers ARP on it for its own addresses): the VPC. Every VM NIC on it
  (primary ``eth0``, ENIs ``eni<k>``) can talk only to the VPC router, as in a cloud VPC.
- **VPC router**: the namespace ``P.vpc`` on the host, joined to the VPC bridge by a veth (``lkr<h>``
  on the bridge, ``vpc0`` inside). It owns the VPC gateway address, answers ARP for the whole VPC
  (proxy ARP, ``proxy_arp_pvlan`` since everything arrives on one port), and holds the same route
  table as the netns backend's router (:func:`labkit.topology.vpc_routes`): node pod subnets via node
  primaries, ENI pod addresses via their ENI. So the two backends route alike, hop for hop.
- **VMs**: ``vagrant up --parallel`` of ``vagrant/Vagrantfile`` with ``lab.json`` beside it, in
  ``/run/labkit/<lab>/vagrant/``; libvirt domains ``P.<node>``, disks ``P.<node>.img`` in the default
  pool. The driver is ``kvm`` only when KVM can run a guest here (probed once, cached), else ``qemu``
  (TCG, 128 MiB translation cache). ``LABKIT_VM_DRIVER`` forces one. ``vagrant.log`` has Vagrant's
  output with the seconds since start on each line; the lab's meta has every phase's time.
- **Inside each VM**: labkit's package (with ``bpf/``), pyroute2 and the native helpers (built on
  the host: same Debian 12 libc) are unpacked in ``/opt/labkit``; :mod:`labkit.agent` builds the node
  with the same NodeWiring and datapath code as the netns backend, starts the in-pod servers and
  syncs the datapath, and returns JSON (the node's kernel goes into the lab's meta). Each node does
  this as soon as its VM's sshd answers, while ``vagrant up`` is still waiting for the other VMs
  and for its own ssh check: every management NIC has a fixed MAC and a fixed DHCP address.
- **Transport**: ssh with a config labkit writes (fixed addresses, Vagrant's insecure key), one
  multiplexed master connection per VM (``ControlPersist``), so a probe or ``labkit exec`` costs one
  channel, not a TCG handshake. labkit logs in as root (the box gives root the same key; Vagrant
  itself uses ``vagrant``), so no command pays for sudo under TCG. Pod commands run through the
  prebuilt ``lkexec`` (namespace + cgroup).
- **Experiments**: :meth:`VagrantBackend.client_session` keeps ``lkclient --serve`` in a pod of a
  VM and copies each run's raw samples back; :meth:`VagrantBackend.datapath` gives a
  :class:`RemoteDatapath`, the same datapath class running in the VM's agent (``agent serve``) for
  as long as the object lives.

``down`` destroys the VMs (``vagrant destroy``, then any ``P.*`` domain and volume left), the networks,
the router namespace, the ssh masters and the daemons it started; it works from the journal and the
names alone, so it also cleans up after a SIGKILLed ``up``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError

from .. import addressing, box, doctor, nsexec, topology
from ..datapath import NodeContext
from ..datapath import get as get_datapath
from ..errors import BackendError, LabStateError
from ..measure import loadgen
from ..spec import Spec
from ..state import STATE_ROOT, LabState

VM_ROOT = "/opt/labkit"
VM_ENV = f"PYTHONPATH={VM_ROOT}/lib LABKIT_CACHE={VM_ROOT}/cache"
AGENT = f"env {VM_ENV} python3 -B -m labkit.agent"
TB_CACHE_MIB = 128
DAEMONS_FILE = STATE_ROOT / ".libvirt.json"
LIBVIRT_SOCK = Path("/run/libvirt/libvirt-sock")
LIBVIRT_CHAINS = {"filter": {"INPUT": ["LIBVIRT_INP"], "OUTPUT": ["LIBVIRT_OUT"],
                             "FORWARD": ["LIBVIRT_FWX", "LIBVIRT_FWI", "LIBVIRT_FWO"]},
                  "nat": {"POSTROUTING": ["LIBVIRT_PRT"]}, "mangle": {"POSTROUTING": ["LIBVIRT_PRT"]}}
_daemon_lock = threading.Lock()


# ================================================================ names

class VmNames:
    """Every name a vagrant lab uses on the host."""

    def __init__(self, lab: str):
        self.lab = lab
        self.prefix = f"lk-{lab}"
        h = hashlib.sha1(lab.encode()).hexdigest()[:8]
        self.mgmt_net, self.vpc_net = f"{self.prefix}.mgmt", f"{self.prefix}.vpc"
        self.mgmt_bridge, self.vpc_bridge, self.router_veth = f"lkm{h}", f"lkv{h}", f"lkr{h}"
        self.router_ns = f"{self.prefix}.vpc"
        self.domain_prefix = f"{self.prefix}."

    def domain(self, node: str) -> str:
        return f"{self.domain_prefix}{node}"

    @staticmethod
    def mac(node_index: int, nic: int) -> str:
        """VPC NIC MACs: 52:54:00 (QEMU's OUI), 0x6c ('l'), node index, NIC index."""
        return "52:54:00:6c:%02x:%02x" % (node_index & 0xFF, nic & 0xFF)

    @staticmethod
    def mgmt_mac(node_index: int) -> str:
        """Management NIC MACs: 52:54:00, 0x6d ('m'), node index, 0."""
        return "52:54:00:6d:%02x:00" % (node_index & 0xFF)


def vagrant_dir(lab: str) -> Path:
    return LabState(lab).dir / "vagrant"


def vagrantfile_source() -> Path:
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "vagrant" / "Vagrantfile", here.parents[1] / "_vagrant" / "Vagrantfile"):
        if cand.exists():
            return cand
    raise BackendError("vagrant/Vagrantfile not found next to the labkit package")


# ================================================================ host commands

def _run(argv: list[str], check: bool = True, timeout: float | None = 120, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    if check and proc.returncode != 0:
        raise BackendError(f"{' '.join(argv[:4])} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["virsh", "-c", "qemu:///system", "-q", *args], check=check)


# ================================================================ libvirtd / virtlogd

def _pidfile(name: str) -> int | None:
    try:
        pid = int(Path(f"/run/{name}.pid").read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _load_daemons() -> dict:
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
        d = _load_daemons()
        if not LIBVIRT_SOCK.exists() or _pidfile("libvirtd") is None and not _libvirtd_answers():
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
                if LIBVIRT_SOCK.exists() and _libvirtd_answers():
                    break
                time.sleep(0.1)
            else:
                raise BackendError("libvirtd did not come up (no answer on /run/libvirt/libvirt-sock)")
        if lab not in d["users"]:
            d["users"].append(lab)
        _save_daemons(d)


def _libvirtd_answers() -> bool:
    return subprocess.run(["virsh", "-c", "qemu:///system", "-q", "version"], capture_output=True,
                          timeout=30).returncode == 0


def release_libvirtd(lab: str) -> int:
    """Forget ``lab``; stop the daemons labkit started once no lab and no domain needs them."""
    with _daemon_lock:
        d = _load_daemons()
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


# ================================================================ KVM or TCG

def vm_driver() -> str:
    """``kvm`` when KVM can run a Debian guest here, else ``qemu`` (TCG). Probed once, cached."""
    forced = os.environ.get("LABKIT_VM_DRIVER")
    if forced in ("kvm", "qemu"):
        return forced
    if not Path("/dev/kvm").exists():
        return "qemu"
    cache = box.cache_root() / "kvm-probe.json"
    key = f"{os.uname().release} {os.uname().version}"
    try:
        saved = json.loads(cache.read_text())
        if saved.get("kernel") == key:
            return saved["driver"]
    except (OSError, json.JSONDecodeError, KeyError):
        pass
    driver = "kvm" if _kvm_runs_guest() else "qemu"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"kernel": key, "driver": driver}))
    return driver


def _kvm_runs_guest() -> bool:
    """Start a paused KVM guest with the CPU model libvirt would use: PVM-only hosts fail at vCPU
    setup (``failed to set MSR``); a KVM that works keeps running until killed."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return False
    try:
        proc = subprocess.Popen([qemu, "-accel", "kvm", "-cpu", "host", "-m", "64", "-nodefaults", "-display",
                                 "none", "-monitor", "none", "-serial", "none", "-S"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    except OSError:
        return False
    try:
        proc.wait(timeout=3)
        return False  # exited by itself: KVM refused
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True


def box_recipe(spec: Spec) -> box.BoxRecipe:
    """The box every lab uses: one box with bcc and the kernel's headers, so that any datapath (the
    spec's, or one an experiment programs later) runs in its VMs."""
    return box.BoxRecipe()


# ================================================================ the backend

class VagrantBackend:
    name = "vagrant"

    # ------------------------------------------------------------ names
    def pod_netns(self, spec: Spec, pod: str) -> str:
        spec.pod(pod)
        return f"lk-{spec.name}.{pod}"

    def pod_cgroup(self, spec: Spec, pod: str) -> Path:
        node, _ = spec.pod(pod)
        return Path("/sys/fs/cgroup") / f"lk-{spec.name}" / node.name / pod

    # ------------------------------------------------------------ preflight
    def preflight(self, spec: Spec) -> None:
        doctor.require("root", "the vagrant backend")
        for feature in ("vagrant", "qemu"):
            doctor.require(feature, "the vagrant backend")
        gem = list(Path("/usr/share/rubygems-integration/all/gems").glob("vagrant-libvirt-*"))
        if not gem and not list((box.vagrant_home() / "gems").glob("*/gems/vagrant-libvirt-*")):
            doctor.require("vagrant-libvirt", "the vagrant backend")
        if shutil.which("libvirtd", path="/usr/sbin:/sbin:" + os.environ.get("PATH", "")) is None:
            doctor.require("libvirtd", "the vagrant backend")
        get_datapath(spec.datapath)  # a known name; its kernel features are checked inside the VM

    # ------------------------------------------------------------ up
    def up(self, spec: Spec, progress: bool = True, start_servers: bool = True) -> LabState:
        self.preflight(spec)
        say = print if progress else (lambda *a, **k: None)
        recipe = box_recipe(spec)
        the_box = box.build(recipe, log=say) if not box.box_for(recipe).ready() else box.box_for(recipe)
        state = LabState(spec.name)
        state.create(spec)
        t0 = time.monotonic()
        try:
            info = self._build(spec, state, the_box, say, start_servers)
        except BaseException as exc:
            if os.environ.get("LABKIT_KEEP_FAILED"):
                raise
            log = vagrant_dir(spec.name) / "vagrant.log"
            tail = log.read_text()[-1500:] if log.exists() else ""
            self.down(spec.name)
            if tail and isinstance(exc, BackendError):
                raise BackendError(f"{exc}\n--- vagrant.log (tail) ---\n{tail}") from exc
            raise
        state.write_meta(status="ready", ready=time.time(), up_seconds=round(time.monotonic() - t0, 1), **info)
        state.close()
        return state

    def _build(self, spec: Spec, state: LabState, the_box: box.Box, say, start_servers: bool) -> dict:
        """Host objects, then ``vagrant up`` and, overlapping it, each node's pipeline: as soon as a
        VM's sshd answers on its fixed management address, labkit is copied in and the node is built
        (Vagrant's own wait for ssh, its Ruby start-up and the other VMs' boots run meanwhile)."""
        names = VmNames(spec.name)
        vdir = vagrant_dir(spec.name)
        vdir.mkdir(parents=True, exist_ok=True)
        times: dict = {}
        t0 = time.monotonic()
        state.record("libvirt-user", lab=spec.name)
        ensure_libvirtd(spec.name)
        mgmt = self._networks(spec, names, state)
        self._router(spec, addressing.plan(spec), names, state)
        times["host"] = round(time.monotonic() - t0, 1)
        driver = vm_driver()
        lab = self._lab_json(spec, names, the_box, mgmt, driver, vdir)
        (vdir / "lab.json").write_text(json.dumps(lab, indent=1))
        shutil.copyfile(vagrantfile_source(), vdir / "Vagrantfile")
        self._write_ssh_config(spec.name, lab)
        pool = ThreadPoolExecutor(1 + len(spec.nodes), thread_name_prefix=f"lk-{spec.name}")
        payload = pool.submit(build_payload, spec, vdir / "payload")
        say(f"vagrant up: {len(spec.nodes)} VM(s), driver {driver} …")
        state.record("vagrant", dir=str(vdir))
        up = VagrantUp(vdir, box.vagrant_env())
        nodes = [pool.submit(self._node_pipeline, spec, node, lab, payload, up, start_servers, t0)
                 for node in spec.nodes]
        try:
            results = _join(up, nodes, deadline=time.monotonic() + 1800)
        except BaseException:
            up.stop()
            # threads still copying or building end when `down` destroys their VMs: do not wait here
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        times["vagrant_up"] = round(up.seconds, 1)
        times["vagrant_exit"] = up.exit_seconds
        times["vagrant_steps"] = up.steps()
        times["nodes"] = {r["node"]: r["host_seconds"] for r in results}
        times["total"] = round(time.monotonic() - t0, 1)
        return {"driver": driver, "box": the_box.name, "management": mgmt, "times": times,
                "kernels": {r["node"]: r["kernel"] for r in results}, "nodes": {r["node"]: r for r in results}}

    def _node_pipeline(self, spec: Spec, node, lab: dict, payload, up: VagrantUp, start_servers: bool,
                       t0: float) -> dict:
        """One node, from its sshd's first answer to a built node; times since the start of ``up``."""
        ip = next(n["mgmt_ip"] for n in lab["nodes"] if n["name"] == node.name)
        marks = {}
        _wait_for_sshd(ip, up, node.name)
        marks["sshd"] = round(time.monotonic() - t0, 1)
        tar = payload.result()
        out = self._build_node(spec, node, lab, start_servers, tar)
        marks["built"] = round(time.monotonic() - t0, 1)
        out["host_seconds"] = marks
        return out

    # ------------------------------------------------------------ host side
    def _networks(self, spec: Spec, names: VmNames, state: LabState) -> str:
        mgmt = pick_mgmt_subnet(spec.name)
        gw = mgmt.network_address + 1
        # every VM's management NIC has a fixed MAC and gets a fixed address: labkit knows where to
        # reach it before Vagrant does
        hosts = "".join(f"\n      <host mac='{VmNames.mgmt_mac(i)}' ip='{mgmt_ip(mgmt, i)}'/>"
                        for i in range(len(spec.nodes)))
        state.record("libvirt-network", name=names.mgmt_net)
        virsh_net_create(f"""<network>
  <name>{names.mgmt_net}</name>
  <bridge name='{names.mgmt_bridge}' stp='off' delay='0'/>
  <dns enable='no'/>
  <ip address='{gw}' netmask='{mgmt.netmask}'>
    <dhcp><range start='{mgmt.network_address + 100}' end='{mgmt.network_address + 250}'/>{hosts}
    </dhcp>
  </ip>
</network>""")
        state.record("libvirt-network", name=names.vpc_net)
        virsh_net_create(f"""<network ipv6='no'>
  <name>{names.vpc_net}</name>
  <bridge name='{names.vpc_bridge}' stp='off' delay='0'/>
  <port isolated='yes'/>
</network>""")
        # The VPC bridge is an interface of this host's namespace, and Linux answers ARP for any of the
        # host's own addresses on any interface (arp_ignore=0): a host address inside the VPC CIDR
        # (this machine has 10.10.0.1/32 on lo, the default VPC gateway) made guests learn the
        # bridge's MAC for the gateway, and their replies went nowhere. The bridge must never answer
        # (8); a setting of labkit's own interface, gone with it.
        Path(f"/proc/sys/net/ipv4/conf/{names.vpc_bridge}/arp_ignore").write_text("8\n")
        return str(mgmt)

    def _router(self, spec: Spec, plan: addressing.AddressPlan, names: VmNames, state: LabState) -> None:
        router = topology.create_netns(names.router_ns, state.record)
        host = nsexec.iproute(None)
        try:
            state.record("link", name=names.router_veth)
            host.link("add", ifname=names.router_veth, kind="veth", peer={"ifname": "vpc0", "net_ns_fd": names.router_ns})
            bridge = host.link_lookup(ifname=names.vpc_bridge)[0]
            host.link("set", index=host.link_lookup(ifname=names.router_veth)[0], master=bridge, state="up")
            router.sysctl({"net.ipv4.ip_forward": 1, "net.ipv4.conf.all.send_redirects": 0,
                           "net.ipv4.conf.default.send_redirects": 0, "net.ipv4.conf.all.rp_filter": 0,
                           "net.ipv4.conf.default.rp_filter": 0})
            router.up("vpc0")
            router.addr("vpc0", plan.vpc_gateway, plan.vpc.prefixlen)
            router.sysctl({"net.ipv4.conf.vpc0.send_redirects": 0, "net.ipv4.conf.vpc0.proxy_arp": 1,
                           "net.ipv4.conf.vpc0.proxy_arp_pvlan": 1, "net.ipv4.conf.vpc0.rp_filter": 0,
                           "net.ipv4.neigh.vpc0.proxy_delay": 0})
            for dst, via in topology.vpc_routes(plan):
                if "gateway" in via:  # NIC and macvlan /32s are on the VPC subnet already
                    router.route(dst, gateway=via["gateway"], oif=router.index("vpc0"))
        finally:
            host.close()
            router.close()

    def _lab_json(self, spec: Spec, names: VmNames, the_box: box.Box, mgmt: str, driver: str, vdir: Path) -> dict:
        plan = addressing.plan(spec)
        nodes = []
        for i, node in enumerate(spec.nodes):
            nics = [{"name": nic.ifname, "mac": VmNames.mac(i, nic.index)} for nic in plan.nodes[node.name].nics]
            nodes.append({"name": node.name, "memory": node.memory, "cpus": node.cpus, "nics": nics,
                          "mgmt_mac": VmNames.mgmt_mac(i), "mgmt_ip": str(mgmt_ip(ipaddress.IPv4Network(mgmt), i))})
        return {"lab": spec.name, "prefix": names.prefix, "domain_prefix": names.domain_prefix,
                "box": the_box.name, "kernel": str(the_box.kernel), "initrd": str(the_box.initrd),
                "cmdline": the_box.recipe.cmdline, "driver": driver,
                "tb_cache_mib": TB_CACHE_MIB if driver == "qemu" else 0,
                "management": {"network": names.mgmt_net, "address": mgmt},
                "vpc": {"network": names.vpc_net}, "serial_dir": str(vdir), "nodes": nodes}

    def _vagrant(self, lab: str, args: list[str], timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        vdir = vagrant_dir(lab)
        with open(vdir / "vagrant.log", "a") as log:
            log.write(f"\n$ vagrant {' '.join(args)}\n")
            log.flush()
            proc = subprocess.run(["vagrant", *args], cwd=vdir, env=box.vagrant_env(), stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout)
        if check and proc.returncode != 0:
            raise BackendError(f"vagrant {' '.join(args)} exited {proc.returncode} (log: {vdir / 'vagrant.log'})")
        return proc

    def _write_ssh_config(self, lab: str, lab_json: dict) -> Path:
        """ssh's config for the lab's VMs: fixed management addresses, root with Vagrant's insecure
        key (the box gives it to root and ``vagrant``; ``insert_key`` is off), one multiplexed master
        per VM. Written before the VMs exist, so that no ``vagrant ssh-config`` (a Ruby start-up) is
        needed."""
        vdir = vagrant_dir(lab)
        key = vdir / "insecure_key"
        key.write_text(box.insecure_private_key())
        key.chmod(0o600)
        hosts = "".join(f"""
Host {n['name']}
  HostName {n['mgmt_ip']}
""" for n in lab_json["nodes"])
        cfg = vdir / "ssh_config"
        cfg.write_text(hosts + f"""
Host *
  User root
  Port 22
  IdentityFile {key}
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  PasswordAuthentication no
  ControlMaster auto
  ControlPath {vdir}/cm-%n
  ControlPersist 600
  ServerAliveInterval 15
  ConnectTimeout 30
""")
        return cfg

    # ------------------------------------------------------------ inside the VMs
    def ssh_argv(self, lab: str, node: str, command: str, tty: bool = False) -> list[str]:
        cfg = vagrant_dir(lab) / "ssh_config"
        if not cfg.exists():
            raise LabStateError(f"lab {lab!r} has no ssh config (is it up? `labkit ls`)")
        return ["ssh", "-F", str(cfg), "-t" if tty else "-T", node, command]

    def node_run(self, lab: str, node: str, command: str, input: str | None = None, check: bool = True,
                 timeout: float | None = 600) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.ssh_argv(lab, node, command), input=input, capture_output=True, text=True,
                              timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise BackendError(f"on {node}: `{command[:120]}` exited {proc.returncode}: "
                               f"{(proc.stderr or proc.stdout).strip()[-1500:]}")
        return proc

    def _build_node(self, spec: Spec, node, lab: dict, start_servers: bool, tar: Path) -> dict:
        """Unpack labkit into the VM and build the node with the agent: one ssh round trip."""
        nics = next(n["nics"] for n in lab["nodes"] if n["name"] == node.name)
        cmd = (f"mkdir -p {VM_ROOT} && find {VM_ROOT} -mindepth 1 -maxdepth 1 -exec rm -rf {{}} + && "
               f"tar -C {VM_ROOT} -xf - && "
               f"exec {AGENT} build-node --spec {VM_ROOT}/spec.yaml --node {shlex.quote(node.name)} --nics "
               + ",".join(f"{n['name']}={n['mac']}" for n in nics) + ("" if start_servers else " --no-servers"))
        with open(tar, "rb") as f:
            proc = subprocess.run(self.ssh_argv(spec.name, node.name, cmd), stdin=f, capture_output=True,
                                  text=True, timeout=900)
        try:
            out = json.loads(proc.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            raise BackendError(f"building {node.name} failed (exit {proc.returncode}): "
                               f"{(proc.stderr + proc.stdout).strip()[-2000:]}") from None
        if "error" in out:
            raise BackendError(f"agent on {node.name}: {out['error']}\n{proc.stderr.strip()[-1500:]}")
        return out

    def pod_command(self, spec: Spec, pod: str, argv: list[str]) -> str:
        """The remote shell command running ``argv`` in ``pod`` (its namespace and cgroup, as root).
        ``argv[0] == sys.executable`` stands for labkit's own Python, which in the VM is python3, and a
        native helper's host path for its copy in the VM (see :func:`_vm_argv`)."""
        node, _ = spec.pod(pod)
        argv = _vm_argv(argv)
        lkexec = _native_name("lkexec")
        if lkexec:
            wrapped = [f"{VM_ROOT}/cache/bin/{lkexec}", "--cgroup", str(self.pod_cgroup(spec, pod)),
                       "--netns", f"/run/netns/{self.pod_netns(spec, pod)}", "--", *argv]
            return f"env {VM_ENV} " + " ".join(shlex.quote(a) for a in wrapped)
        return (f"{AGENT} pod-exec --lab {spec.name} --node {node.name} --pod {pod} -- "
                + " ".join(shlex.quote(a) for a in argv))

    def pod_spawn(self, spec: Spec, pod: str, argv: list[str], **popen) -> subprocess.Popen:
        """Start ``argv`` in a pod of a VM; stdio as with :class:`subprocess.Popen` (a terminal on
        inherited stdin gets a remote terminal too, for interactive ``labkit exec``)."""
        node, _ = spec.pod(pod)
        popen.pop("cpus", None)
        tty = popen.get("stdin", subprocess.DEVNULL) is None and sys.stdin.isatty()
        return subprocess.Popen(self.ssh_argv(spec.name, node.name, self.pod_command(spec, pod, argv), tty=tty),
                                **popen)

    def pod_run(self, spec: Spec, pod: str, argv: list[str], input=None, check: bool = True,
                timeout: float | None = 300, text: bool = True, **_) -> subprocess.CompletedProcess:
        """Run ``argv`` in a pod of a VM to completion, output captured (like :func:`nsexec.run`)."""
        node, _ = spec.pod(pod)
        proc = subprocess.run(self.ssh_argv(spec.name, node.name, self.pod_command(spec, pod, argv)), input=input,
                              capture_output=True, text=text, timeout=timeout,
                              stdin=subprocess.DEVNULL if input is None else None)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    def run_client(self, spec: Spec, pod: str, mode: str, host: str, port: int, cpus=None, **kw) -> dict:
        """``lkclient`` once in ``pod`` inside its VM, options and result as
        :func:`labkit.measure.loadgen.run_client`; ``raw_path`` is filled here, also when it fails."""
        with self.client_session(spec, pod, cpus) as session:
            return session.run(mode, host, port, **kw)

    def client_session(self, spec: Spec, pod: str, cpus=None):
        """``lkclient --serve`` in ``pod`` inside its VM (:class:`VmClientSession`). ``cpus`` (the
        host's CPU plan) does not apply inside a VM: its vCPUs are the node's own."""
        return VmClientSession(self, spec, pod)

    def _fetch(self, lab: str, node: str, remote: str, local: Path) -> None:
        """Copy a file out of a VM (and remove it there); nothing when it does not exist."""
        proc = subprocess.run(self.ssh_argv(lab, node, f"cat {remote} 2>/dev/null; rm -f {remote}"),
                              capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
        if proc.stdout:
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(proc.stdout)

    def datapath(self, spec: Spec, node: str, name: str, plan: addressing.AddressPlan | None = None) -> RemoteDatapath:
        """Datapath ``name`` of ``node``, run by the agent in the VM and driven from here."""
        get_datapath(name)  # a known name, or the registry's error listing them
        return RemoteDatapath(self, spec, node, name)

    def kernels(self, spec: Spec) -> dict[str, str]:
        """The kernel release of every node's VM (reported by the agent when it built the node)."""
        return dict(LabState(spec.name).meta().get("kernels", {}))

    def node_context(self, spec: Spec, node_name: str, plan: addressing.AddressPlan | None = None) -> NodeContext:
        """The datapath's view of a node as seen from the host: ``run()`` goes over ssh into the VM."""
        plan = plan or addressing.plan(spec)
        node = next(n for n in spec.nodes if n.name == node_name)
        pods = topology.pod_ifaces(spec, plan, node.name, lambda pod: self.pod_netns(spec, pod))
        return VmNodeContext(lab=spec.name, prefix=spec.prefix, node=node.name, netns=None, pod_cidr=spec.pod_cidr,
                             service_cidr=spec.service_cidr, state_dir=Path(f"/run/labkit/{spec.name}/nodes/{node.name}"),
                             cgroup=Path("/sys/fs/cgroup") / f"lk-{spec.name}" / node.name, pods=tuple(pods),
                             node_ip=str(plan.nodes[node.name].primary.ip))

    def sync(self, spec: Spec, node: str) -> dict:
        """Program the datapath of ``node`` again from the spec copied into the VM."""
        proc = self.node_run(spec.name, node, f"{AGENT} sync --spec {VM_ROOT}/spec.yaml --node {node}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    # ------------------------------------------------------------ down
    def down(self, name: str) -> dict[str, int]:
        state = LabState(name)
        names = VmNames(name)
        vdir = vagrant_dir(name)
        counts = {"vms": 0, "volumes": 0, "networks": 0, "netns": 0, "ssh": 0, "daemons": 0}
        # 0. agent channels this process opened (datapaths driven from here), and a `vagrant up` still
        # running in the lab's folder (its `labkit up` was killed): it would go on making domains
        for dp in list(_OPEN_DATAPATHS.get(name, [])):
            dp.close()
        _kill_processes_in(vdir)
        # 1. ssh masters (their sockets are in the state folder)
        for sock in vdir.glob("cm-*") if vdir.exists() else []:
            subprocess.run(["ssh", "-F", str(vdir / "ssh_config"), "-O", "exit", sock.name[3:]],
                           capture_output=True, timeout=30)
            counts["ssh"] += 1
        libvirt_up = LIBVIRT_SOCK.exists() and _libvirtd_answers()
        # 2. VMs: vagrant first (it also cleans its own records), then by name whatever is left
        counts["vms"] = _count_vagrant_machines(vdir)
        if (vdir / "Vagrantfile").exists() and (vdir / "lab.json").exists() and libvirt_up:
            self._vagrant(name, ["destroy", "-f"], timeout=600, check=False)
        if libvirt_up:
            for dom in virsh("list", "--all", "--name", check=False).stdout.split():
                if dom.startswith(names.domain_prefix):
                    virsh("destroy", dom, check=False)
                    virsh("undefine", dom, "--nvram", check=False)
                    counts["vms"] += 1
            vols = virsh("vol-list", "default", check=False).stdout.splitlines()
            for line in vols:
                vol = line.split()[0] if line.split() else ""
                if vol.startswith(names.domain_prefix):
                    virsh("vol-delete", "--pool", "default", vol, check=False)
                    counts["volumes"] += 1
            for net in (names.mgmt_net, names.vpc_net):
                if virsh("net-info", net, check=False).returncode == 0:
                    virsh("net-destroy", net, check=False)
                    virsh("net-undefine", net, check=False)
                    counts["networks"] += 1
        # 3. the router namespace (its veth on the VPC bridge goes with it)
        if nsexec.remove_netns(names.router_ns):
            counts["netns"] += 1
        _delete_link(names.router_veth)
        # 4. daemons we started, if no other lab needs them
        if any(o.get("kind") == "libvirt-user" for o in state.objects()) or name in _load_daemons()["users"]:
            state.remove()
            counts["daemons"] = release_libvirtd(name)
        state.remove()
        return counts


class VmClientSession(loadgen.ClientSession):
    """:class:`labkit.measure.loadgen.ClientSession` with its ``lkclient --serve`` in a pod of a VM,
    reached over the lab's ssh master. Raw samples are written in the VM (``/run/labkit/<lab>/raw``)
    and brought here after every request, also when it failed (raw samples are kept before an error
    propagates): :meth:`run` fills its ``raw_path``, :meth:`burst` appends to each target's raw file
    as lkclient does locally (one ssh round trip for all of a burst's files)."""

    def __init__(self, backend: VagrantBackend, spec: Spec, pod: str):
        from ..native import binary

        node, _ = spec.pod(pod)
        self.backend, self.lab, self.node = backend, spec.name, node.name
        self.where = f" from pod {pod} (VM {node.name})"
        self.raw_dir = f"/run/labkit/{spec.name}/raw"
        self._err = tempfile.TemporaryFile()
        cmd = f"mkdir -p {self.raw_dir} && exec " + backend.pod_command(spec, pod, [str(binary("lkclient")), "--serve"])
        self.proc = subprocess.Popen(backend.ssh_argv(spec.name, node.name, cmd), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err)

    def run(self, mode: str, host: str, port: int, samples: int = 1000, warmup: int | None = None,
            size: int = 64, raw_path: Path | None = None, timeout: float | None = None, **options) -> dict:
        remote = f"{self.raw_dir}/{threading.get_ident()}-{time.monotonic_ns()}.i64" if raw_path else None
        if timeout is None:  # loadgen's, plus TCG's slower handshakes
            per_try = (options.get("connect_timeout_ms", 1000) + options.get("timeout_ms", 1000)) / 1000
            timeout = 120 + per_try * min(samples + (warmup or 0), 1000)
        try:
            return super().run(mode, host, port, samples, warmup, size, remote, timeout, **options)
        finally:
            if raw_path:
                self.backend._fetch(self.lab, self.node, remote, Path(raw_path))

    def burst(self, mode: str, targets, samples: int, **kw) -> list[dict]:
        self._bursts = getattr(self, "_bursts", 0) + 1
        remote, copies = [], []
        for i, (host, port, raw) in enumerate(targets):
            if str(raw) == os.devnull:  # warm-up: nothing to keep
                remote.append((host, port, os.devnull))
                continue
            name = f"b{os.getpid()}-{id(self)}-{self._bursts}-{i}.i64"
            remote.append((host, port, f"{self.raw_dir}/{name}"))
            copies.append((name, Path(raw)))
        try:
            return super().burst(mode, remote, samples, **kw)
        finally:
            if copies:
                self._append_back(copies)

    def _append_back(self, copies: list[tuple[str, Path]]) -> None:
        """Append each VM file to its local raw file (then remove it in the VM): one tar stream."""
        names = " ".join(name for name, _ in copies)
        proc = subprocess.run(self.backend.ssh_argv(
            self.lab, self.node, f"cd {self.raw_dir} && tar --ignore-failed-read -cf - {names} 2>/dev/null; "
            f"rm -f {names}"), capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
        if not proc.stdout:  # no file: nothing was sampled
            return
        local = dict(copies)
        with tarfile.open(fileobj=io.BytesIO(proc.stdout), mode="r:") as tar:
            for member in tar:
                if member.name in local and member.isfile():
                    with open(local[member.name], "ab") as out:
                        out.write(tar.extractfile(member).read())


class RemoteDatapath:
    """A Service datapath of a VM node, driven from the host with the interface of
    :class:`labkit.datapath.base.Datapath` (``sync``, ``sync_changes``, ``cleanup``, ``describe``).

    The datapath object itself lives in one ``agent serve`` process in the VM, reached over one ssh
    channel and kept for this object's life, so that what it holds between syncs (the table last
    applied, the eBPF service ids) persists as it does in one process on the netns backend: a known
    change set is sent alone and applied as a partial sync. :class:`SyncResult`'s ``seconds`` are the
    VM's own (the apply, without the ssh round trip). Channels are closed by :meth:`close` or by the
    lab's ``down``."""

    def __init__(self, backend: VagrantBackend, spec: Spec, node: str, name: str):
        self.backend, self.spec, self.node, self.name = backend, spec, node, name
        self._applied = None
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        _OPEN_DATAPATHS.setdefault(spec.name, []).append(self)

    @property
    def applied(self):
        return self._applied

    def _channel(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            log = open(vagrant_dir(self.spec.name) / f"agent-{self.node}-{self.name}.log", "ab")
            cmd = f"{AGENT} serve --spec {VM_ROOT}/spec.yaml --node {shlex.quote(self.node)}"
            self._proc = subprocess.Popen(self.backend.ssh_argv(self.spec.name, self.node, cmd),
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
            log.close()
        return self._proc

    def _call(self, request: dict, timeout: float = 900) -> dict:
        from ..errors import DatapathError

        with self._lock:
            proc = self._channel()
            proc.stdin.write(json.dumps(request, separators=(",", ":")) + "\n")
            proc.stdin.flush()
            line = _readline(proc, timeout)
        if not line:
            raise DatapathError(f"{self.name} on node {self.node}: the agent in the VM stopped (log: "
                                f"{vagrant_dir(self.spec.name) / f'agent-{self.node}-{self.name}.log'})")
        reply = json.loads(line)
        if "error" in reply:
            raise DatapathError(f"{self.name} on node {self.node} (in the VM): {reply['error']}")
        return reply["result"]

    def sync(self, desired):
        from ..services import diff

        return self.sync_changes(desired, diff(self._applied, desired))

    def sync_changes(self, desired, changes):
        from ..agent import table_to_json, changes_to_json
        from ..datapath.base import SyncResult

        request = {"op": "sync", "datapath": self.name}
        if self._applied is None or changes.full:
            request["table"] = table_to_json(desired)
        else:
            request["changes"] = changes_to_json(changes)
        self._applied = None  # unknown until the VM says it applied
        result = SyncResult(**self._call(request))
        self._applied = desired
        return result

    def cleanup(self) -> None:
        self._call({"op": "cleanup", "datapath": self.name})
        self._applied = None

    def describe(self) -> dict:
        return self._call({"op": "describe", "datapath": self.name})

    def close(self) -> None:
        """End the agent (its datapath keeps running in the VM's kernel)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.stdin.close()
                proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        if self in _OPEN_DATAPATHS.get(self.spec.name, []):
            _OPEN_DATAPATHS[self.spec.name].remove(self)


_OPEN_DATAPATHS: dict[str, list[RemoteDatapath]] = {}


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    """One line of ``proc``'s stdout, "" at EOF; kills it after ``timeout`` seconds of silence."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            proc.kill()
            return ""
    return proc.stdout.readline()


def _vm_argv(argv: list[str]) -> list[str]:
    """``argv`` as the VM runs it: labkit's Python is python3 there, and a native helper built here
    (``~/.cache/labkit/bin/<prog>-<hash>``) is the same file under ``/opt/labkit/cache/bin``."""
    from .. import native

    if not argv:
        return argv
    head = str(argv[0])
    if head == sys.executable:
        return ["python3", *argv[1:]]
    if Path(head).parent == native.cache_dir():
        return [f"{VM_ROOT}/cache/bin/{Path(head).name}", *argv[1:]]
    return list(argv)


class VmNodeContext(NodeContext):
    """A node of a vagrant lab, seen from the host: commands run inside the VM over ssh."""

    def run(self, argv, input=None, check=True, timeout=600):
        backend = VagrantBackend()
        cmd = " ".join(shlex.quote(str(a)) for a in argv)
        proc = backend.node_run(self.lab, self.node, cmd, input=input, check=False, timeout=timeout)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, list(argv), proc.stdout, proc.stderr)
        return proc


class VagrantUp:
    """``vagrant up --parallel`` running in the background; its output goes to ``vagrant.log`` with
    the seconds since start on every line, and :meth:`steps` reads each VM's milestones from it."""

    MILESTONES = {"Creating image": "image", "Creating domain with": "define", "Starting domain": "start",
                  "Waiting for domain to get an IP": "wait_ip", "Waiting for machine to boot": "wait_ssh",
                  "Machine booted and ready": "ready"}

    def __init__(self, vdir: Path, env: dict):
        self.log_path = vdir / "vagrant.log"
        self.lines: list[tuple[float, str]] = []
        self.t0 = time.monotonic()
        self.seconds = 0.0
        self.proc = subprocess.Popen(["vagrant", "up", "--provider", "libvirt", "--parallel"], cwd=vdir, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     text=True, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.exit_seconds: float | None = None
        threading.Thread(target=self._wait_exit, daemon=True).start()

    def _wait_exit(self) -> None:
        self.proc.wait()
        self.exit_seconds = round(time.monotonic() - self.t0, 1)

    def _read(self) -> None:
        with open(self.log_path, "a") as log:
            log.write("\n$ vagrant up --provider libvirt --parallel\n")
            for line in self.proc.stdout:
                t = time.monotonic() - self.t0
                self.lines.append((t, line.rstrip()))
                log.write(f"[{t:6.1f}] {line}")
                log.flush()
        self.seconds = time.monotonic() - self.t0  # its output ends when it does

    @property
    def failed(self) -> bool:
        return self.proc.poll() not in (None, 0)

    def wait(self, timeout: float) -> None:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BackendError(f"vagrant up did not finish within {timeout:.0f} s (log: {self.log_path})") from None
        self.reader.join(timeout=10)
        if rc != 0:
            raise BackendError(f"vagrant up exited {rc} (log: {self.log_path})")

    def stop(self) -> None:
        """End a running ``vagrant up`` (after a node failed): SIGINT lets it stop cleanly, then SIGKILL."""
        if self.proc.poll() is not None:
            return
        for sig, grace in ((signal.SIGINT, 60), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue

    def steps(self) -> dict[str, dict[str, float]]:
        """Per VM, the seconds since start at which Vagrant reported each milestone."""
        return self.parse_steps(self.lines)

    @classmethod
    def parse_steps(cls, lines: list[tuple[float, str]]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for t, line in lines:
            if not line.startswith("==> ") or ": " not in line:
                continue
            node, _, msg = line[4:].partition(": ")
            for text, key in cls.MILESTONES.items():
                if msg.startswith(text):
                    out.setdefault(node, {}).setdefault(key, round(t, 1))
        return out


def _join(up: VagrantUp, nodes: list, deadline: float) -> list[dict]:
    """Wait for ``vagrant up`` and every node's pipeline; the first failure of either is raised at once."""
    from concurrent.futures import FIRST_EXCEPTION
    from concurrent.futures import wait as wait_futures

    while True:
        done, pending = wait_futures(nodes, timeout=0.5, return_when=FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                raise f.exception()
        if up.proc.poll() is not None:
            up.wait(timeout=60)  # raises if it failed
            if not pending:
                return [f.result() for f in nodes]
        if time.monotonic() > deadline:
            raise BackendError(f"the VMs were not up within 30 min (log: {up.log_path})")


def _wait_for_sshd(ip: str, up: VagrantUp, node: str, timeout: float = 600) -> None:
    """Until something listens on ``ip``:22 (the VM's sshd); fails early if ``vagrant up`` failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if up.failed:
            raise BackendError(f"vagrant up failed before {node} answered (log: {up.log_path})")
        try:
            with socket.create_connection((ip, 22), timeout=2) as sock:
                sock.settimeout(5)
                if sock.recv(4).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        time.sleep(1)
    raise BackendError(f"{node} ({ip}) did not answer on port 22 within {timeout:.0f} s "
                       f"(serial console: {up.log_path.parent / (node + '.serial')})")


def mgmt_ip(mgmt: ipaddress.IPv4Network, node_index: int) -> ipaddress.IPv4Address:
    """The fixed management address of the ``node_index``-th VM (DHCP host entry)."""
    return mgmt.network_address + 10 + node_index


def _kill_processes_in(folder: Path) -> int:
    """SIGKILL every Vagrant process working in ``folder`` (a lab's own Vagrant folder)."""
    killed = 0
    if not folder.exists():
        return 0
    target = str(folder.resolve())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if os.readlink(proc / "cwd") == target and b"vagrant" in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
        except OSError:
            continue
    return killed


def _count_vagrant_machines(vdir: Path) -> int:
    machines = vdir / ".vagrant" / "machines"
    return sum(1 for m in machines.glob("*/libvirt/id")) if machines.exists() else 0


def _delete_link(name: str) -> None:
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


def virsh_net_create(xml: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".xml", delete=False) as f:
        f.write(xml)
    try:
        virsh("net-create", f.name)
    finally:
        os.unlink(f.name)


def pick_mgmt_subnet(lab: str) -> ipaddress.IPv4Network:
    """A free /24 in 192.168.100-199.0 for a lab's management network (the hash of its name first)."""
    used = []
    proc = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        tok = line.split()[0] if line.split() else ""
        try:
            used.append(ipaddress.IPv4Network(tok if "/" in tok else f"{tok}/32", strict=False))
        except ValueError:
            pass
    start = int(hashlib.sha1(lab.encode()).hexdigest(), 16) % 100
    for k in range(100):
        net = ipaddress.IPv4Network(f"192.168.{100 + (start + k) % 100}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise BackendError("no free /24 in 192.168.100.0-192.168.199.0 for the management network")


# ================================================================ payload

def _native_name(prog: str) -> str | None:
    """File name of a native helper as built on the host (``<prog>-<hash>``), the same in the VM."""
    from .. import native

    if prog not in getattr(native, "PROGRAMS", ()):
        return None
    return native.binary(prog).name


def build_payload(spec: Spec, dest: Path) -> Path:
    """``payload.tar``: labkit's package (with ``_bpf``), pyroute2, prebuilt natives, the spec."""
    import pyroute2

    from .. import native

    pkg = Path(__file__).resolve().parents[1]
    if dest.exists():
        shutil.rmtree(dest)
    lib = dest / "lib"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(pkg, lib / "labkit", ignore=ignore)
    bpf = pkg.parent / "bpf"
    if bpf.is_dir() and not (lib / "labkit" / "_bpf").exists():
        shutil.copytree(bpf, lib / "labkit" / "_bpf", ignore=ignore)
    shutil.copytree(Path(pyroute2.__file__).parent, lib / "pyroute2", ignore=ignore)
    bindir = dest / "cache" / "bin"
    bindir.mkdir(parents=True)
    for prog in getattr(native, "PROGRAMS", ()):
        shutil.copy2(native.binary(prog), bindir)
    (dest / "spec.yaml").write_text(spec.to_yaml())
    if sys.version_info[:2] == (3, 11):  # the box's python3: ship bytecode, TCG compiles slowly
        import compileall

        compileall.compile_dir(str(lib), quiet=1, workers=1)
    tar_path = dest.parent / "payload.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(dest, arcname=".")
    return tar_path


__all__ = ["VagrantBackend", "VmNames", "VmNodeContext", "build_payload", "vm_driver", "pick_mgmt_subnet"]
