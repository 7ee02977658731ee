"""The ``vagrant`` backend: one VM per node (Debian's kernel: ipvlan, IPVS, BPF), labkit inside each.

The spec's ``release`` picks the VMs' Debian release, hence their box (:mod:`.box`) and kernel:
``bookworm`` (Debian 12, 6.1, the default) or ``trixie`` (Debian 13, 6.12: netkit, BIG TCP over IPv4).

How a lab is realised (names in :mod:`.names`: ``P`` = ``lk-<lab>``, ``h`` a hash of the lab name):
- **libvirtd / virtlogd**, started when nothing runs them and stopped by the last lab's ``down``
  (:mod:`.libvirt`).
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
- **Inside each VM**: a remote node (:mod:`labkit.remote`): labkit's payload is unpacked in
  ``/opt/labkit`` and the agent builds the node with the node runtime, as the netns backend builds a
  node in-process; each node does this as soon as its VM's sshd answers, while ``vagrant up`` is
  still waiting for the other VMs and for its own ssh check: every management NIC has a fixed MAC and
  a fixed DHCP address. Commands, datapaths and the load client then go through
  :class:`labkit.remote.node.RemoteNode`.
- **Transport**: ssh with a config labkit writes (fixed addresses, Vagrant's insecure key), one
  multiplexed master connection per VM (``ControlPersist``). labkit logs in as root (the box gives
  root the same key), so no command pays for sudo under TCG.

``down`` destroys the VMs (``vagrant destroy``, then any ``P.*`` domain and volume left), the networks,
the router namespace, the ssh masters and the daemons it started; it works from the journal and the
names alone, so it also cleans up after a SIGKILLed ``up``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ... import addressing, doctor, naming, nsexec, topology
from ...datapath import NodeContext
from ...datapath import get as get_datapath
from ...errors import BackendError, MissingFeature
from ...remote.node import RemoteNode, close_datapaths
from ...remote.payload import build_payload
from ...remote.ssh import Machine, SshTarget
from ...spec import Spec
from ...state import LabState
from .. import BACKENDS
from ..remote import RemoteNodesBackend
from . import box
from .libvirt import (LIBVIRT_SOCK, libvirtd_answers, load_daemons, delete_link, ensure_libvirtd, release_libvirtd,
                      virsh, virsh_net_create, vm_driver)
from .names import VmNames, mgmt_ip, pick_mgmt_subnet, vagrant_dir, vagrantfile_source
from .up import VagrantUp, count_vagrant_machines, join, kill_processes_in, wait_for_sshd

TB_CACHE_MIB = 128


def box_recipe(spec: Spec) -> box.BoxRecipe:
    """The box of the spec's release: one box with bcc and the kernel's headers, so that any datapath
    (the spec's, or one an experiment programs later) runs in its VMs."""
    return box.BoxRecipe(release=spec.release or box.DEFAULT_RELEASE)


def the_kernel(machine: Machine) -> str:
    return machine.run("uname -r", timeout=120).stdout.strip()


def check_box_features(spec: Spec, the_box: box.Box) -> None:
    """Refuse, before any VM exists, a pod mode that needs a kernel feature the box's kernel lacks
    (its features were read from its kernel's config when it was built)."""
    from ... import modes

    for mode in sorted(spec.modes()):
        lacking = the_box.lacks(modes.get(mode).features)
        if lacking:
            have = [r for r in box.RELEASES if r != the_box.recipe.release]
            raise MissingFeature(lacking[0], f"pod mode {mode}",
                                 f"the {the_box.recipe.release} box's kernel ({the_box.info()['kernel']}) has no "
                                 f"{lacking[0]}; set release: to another Debian release ({', '.join(have)})")


@BACKENDS.register
class VagrantBackend(RemoteNodesBackend):
    name = "vagrant"
    order = 10  # after netns in listings

    # ------------------------------------------------------------ nodes (remote machines)
    def machine(self, lab: str, node: str) -> Machine:
        return Machine(SshTarget(node, config=vagrant_dir(lab) / "ssh_config"), f"{node} (VM of lab {lab})")

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
    def up(self, spec: Spec, progress: bool = True, start_servers: bool = True, bare: bool = False) -> LabState:
        """``bare``: the VMs and their VPC (router and routes) only, no node built in them: machines
        for the ``hosts`` backend's tests, which must find them as a user's hosts are."""
        self.preflight(spec)
        say = print if progress else (lambda *a, **k: None)
        recipe = box_recipe(spec)
        the_box = box.build(recipe, log=say) if not box.box_for(recipe).ready() else box.box_for(recipe)
        check_box_features(spec, the_box)
        state = LabState(spec.name)
        state.create(spec)
        t0 = time.monotonic()
        try:
            info = self._build(spec, state, the_box, say, start_servers, bare)
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

    def _build(self, spec: Spec, state: LabState, the_box: box.Box, say, start_servers: bool,
               bare: bool = False) -> dict:
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
        driver = vm_driver(the_box.kernel)
        lab = self._lab_json(spec, names, the_box, mgmt, driver, vdir)
        (vdir / "lab.json").write_text(json.dumps(lab, indent=1))
        shutil.copyfile(vagrantfile_source(), vdir / "Vagrantfile")
        self._write_ssh_config(spec.name, lab)
        pool = ThreadPoolExecutor(1 + len(spec.nodes), thread_name_prefix=f"lk-{spec.name}")
        payload = pool.submit(build_payload, spec, vdir / "payload", box.release_of(the_box.recipe.release).python)
        say(f"vagrant up: {len(spec.nodes)} VM(s), driver {driver} …")
        state.record("vagrant", dir=str(vdir))
        up = VagrantUp(vdir, box.vagrant_env())
        nodes = [pool.submit(self._node_pipeline, spec, node, lab, payload, up, start_servers, t0, bare)
                 for node in spec.nodes]
        try:
            results = join(up, nodes, deadline=time.monotonic() + 1800)
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
        return {"driver": driver, "box": the_box.name, "release": the_box.recipe.release, "management": mgmt,
                "times": times, "kernels": {r["node"]: r["kernel"] for r in results},
                "nodes": {r["node"]: r for r in results}}

    def _node_pipeline(self, spec: Spec, node, lab: dict, payload, up: VagrantUp, start_servers: bool,
                       t0: float, bare: bool = False) -> dict:
        """One node, from its sshd's first answer to a built node; times since the start of ``up``."""
        ip = next(n["mgmt_ip"] for n in lab["nodes"] if n["name"] == node.name)
        marks = {}
        wait_for_sshd(ip, up, node.name)
        marks["sshd"] = round(time.monotonic() - t0, 1)
        if bare:
            return {"node": node.name, "kernel": the_kernel(self.machine(spec.name, node.name)), "host_seconds": marks,
                    "mgmt_ip": ip}
        tar = payload.result()
        nics = {n["name"]: n["mac"] for n in next(n["nics"] for n in lab["nodes"] if n["name"] == node.name)}
        out = RemoteNode(self.machine(spec.name, node.name), spec, node.name).build(tar, nics, start_servers, vm=True)
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
  ServerAliveCountMax 8
  ConnectTimeout 30
""")
        return cfg

    # ------------------------------------------------------------ down
    def down(self, name: str) -> dict[str, int]:
        state = LabState(name)
        names = VmNames(name)
        vdir = vagrant_dir(name)
        counts = {"vms": 0, "volumes": 0, "networks": 0, "netns": 0, "ssh": 0, "daemons": 0}
        # 0. agent channels this process opened (datapaths driven from here), and a `vagrant up` still
        # running in the lab's folder (its `labkit up` was killed): it would go on making domains
        close_datapaths(name)
        kill_processes_in(vdir)
        # 1. ssh masters (their sockets are in the state folder)
        for sock in vdir.glob("cm-*") if vdir.exists() else []:
            self.machine(name, sock.name[3:]).close()
            counts["ssh"] += 1
        libvirt_up = LIBVIRT_SOCK.exists() and libvirtd_answers()
        # 2. VMs: vagrant first (it also cleans its own records), then by name whatever is left
        counts["vms"] = count_vagrant_machines(vdir)
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
        delete_link(names.router_veth)
        # 4. daemons we started, if no other lab needs them
        if any(o.get("kind") == "libvirt-user" for o in state.objects()) or name in load_daemons()["users"]:
            state.remove()
            counts["daemons"] = release_libvirtd(name)
        state.remove()
        return counts


__all__ = ["VagrantBackend", "TB_CACHE_MIB", "box_recipe", "check_box_features"]
