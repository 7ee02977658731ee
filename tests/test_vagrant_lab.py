"""The vagrant backend: a real two-VM lab under QEMU (TCG here), built from labkit's own box.

Layers: pure tests of names, the Vagrantfile's input, the payload and the box recipe (no root, no
VMs, milliseconds); then ``@pytest.mark.vm`` tests that build (or reuse) the box, bring up the issue's
acceptance lab (IPVLAN and an exclusive ENI across two VMs, a Service through IPVS inside the VMs),
run ``labkit check`` and ``labkit exec`` against it, drive the load client and a datapath of a VM
node from the host (what experiments use), and verify that ``down`` leaves nothing on the host: no
domain, volume, libvirt network, ``lk-`` namespace or bridge, ssh master, daemon or LIBVIRT_*
iptables chain that labkit started.

The same lab with ``datapath: ebpf`` runs too (the box has bcc and its kernel's headers, so the
socket-LB programs are compiled inside the VMs), a small ``labkit run service-scale --backend
vagrant`` and ``labkit run pod-modes --backend vagrant --quick`` (every mode of the box, IPVLAN included). With the box
cached, about 8 min on this 2-core machine (TCG): four labs, 1-2 VMs each. The Debian 13 box
(``release: trixie``) gets its own test: box, a lab of netkit and veth pods with ebpf-tc, eBPF host
routing and the eBPF policy engine on it (in netkit's own program lists on the netkit pods), check,
netkit vs veth TCP_RR (~3.5 min with the box cached, ~5 min building it).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from labkit import addressing
from labkit.backends import vagrant as vg
from labkit.backends.vagrant import backend as vgb
from labkit.backends.vagrant import box
from labkit.backends.vagrant import libvirt as lv
from labkit.backends.vagrant.up import VagrantUp
from labkit.remote import payload, wire
from labkit.spec import load_spec
from labkit.state import LabState

ROOT = Path(__file__).resolve().parent.parent
VMDEMO = ROOT / "vagrant" / "vmdemo.yaml"
VM_TOOLS = ("root", "vagrant", "vagrant-libvirt", "libvirtd", "qemu")


def VM(fn):
    """A test that brings up VMs: category markers, and skipped with the doctor's fix where a VM
    tool is missing."""
    return pytest.mark.vm(pytest.mark.slow(pytest.mark.needs(*VM_TOOLS)(fn)))


# ------------------------------------------------------------------ pure: no root, no VMs

def test_names_fit_and_never_collide_across_labs():
    a, b = vg.VmNames("a"), vg.VmNames("a-b")
    assert a.domain("node1") == "lk-a.node1" and not b.domain("node1").startswith(a.domain_prefix)
    for n in (a, vg.VmNames("x" * 20)):
        assert all(len(x) <= 15 for x in (n.mgmt_bridge, n.vpc_bridge, n.router_veth))
    assert a.vpc_bridge != b.vpc_bridge
    assert vg.VmNames.mac(1, 2) == "52:54:00:6c:01:02"


def test_lab_json_has_one_nic_per_vpc_address_in_plan_order():
    spec = load_spec(VMDEMO)
    plan = addressing.plan(spec)
    the_box = box.box_for()
    lab = vg.VagrantBackend()._lab_json(spec, vg.VmNames(spec.name), the_box, "192.168.150.0/24", "qemu",
                                        Path("/tmp"))
    assert [n["name"] for n in lab["nodes"]] == ["node1", "node2"]
    assert [x["name"] for x in lab["nodes"][1]["nics"]] == ["eth0", "eni1", "eni2"]
    assert len({x["mac"] for n in lab["nodes"] for x in n["nics"]}) == sum(len(p.nics) for p in plan.nodes.values())
    assert lab["tb_cache_mib"] == vg.TB_CACHE_MIB and lab["management"]["network"] == "lk-vmdemo.mgmt"
    assert lab["kernel"].startswith(str(box.LIBVIRT_BOOT))
    # fixed management MACs and addresses, distinct, inside the management subnet
    import ipaddress

    ips = [ipaddress.IPv4Address(n["mgmt_ip"]) for n in lab["nodes"]]
    assert len(set(ips)) == 2 and all(ip in ipaddress.IPv4Network("192.168.150.0/24") for ip in ips)
    assert len({n["mgmt_mac"] for n in lab["nodes"]} | {x["mac"] for n in lab["nodes"] for x in n["nics"]}) == 2 + 5


def test_ssh_config_reaches_every_node_at_its_fixed_address(tmp_path, monkeypatch):
    spec = load_spec(VMDEMO)
    lab = vg.VagrantBackend()._lab_json(spec, vg.VmNames(spec.name), box.box_for(), "192.168.150.0/24", "qemu",
                                        tmp_path)
    monkeypatch.setattr(vgb, "vagrant_dir", lambda name: tmp_path)
    cfg = vg.VagrantBackend()._write_ssh_config(spec.name, lab).read_text()
    for n in lab["nodes"]:
        assert f"Host {n['name']}\n  HostName {n['mgmt_ip']}\n" in cfg
    key = tmp_path / "insecure_key"
    assert f"IdentityFile {key}" in cfg and oct(key.stat().st_mode & 0o777) == "0o600"
    assert "BEGIN RSA PRIVATE KEY" in key.read_text() or "BEGIN OPENSSH PRIVATE KEY" in key.read_text()


def test_vagrant_milestones_are_read_per_vm():
    lines = [(1.0, "Bringing machine 'node1' up with 'libvirt' provider..."),
             (2.5, "==> node1: Creating domain with the following settings..."),
             (3.0, "==> node2: Creating domain with the following settings..."),
             (4.0, "==> node1: Starting domain."), (5.0, "==> node1: Waiting for domain to get an IP address..."),
             (40.2, "==> node1: Waiting for machine to boot. This may take a few minutes..."),
             (61.7, "==> node1: Machine booted and ready!")]
    steps = VagrantUp.parse_steps(lines)
    assert steps["node1"] == {"define": 2.5, "start": 4.0, "wait_ip": 5.0, "wait_ssh": 40.2, "ready": 61.7}
    assert steps["node2"] == {"define": 3.0}


def test_service_tables_cross_to_the_agent_and_back():
    from labkit.services import Endpoint, ServicePort, ServiceTable, diff

    eps = (Endpoint("10.0.0.2", 8080, "be-0", "n"), Endpoint("10.0.0.3", 8080, "be-1", "n"))
    table = ServiceTable.of(ServicePort("ns", f"s{k}", "", "TCP", f"10.96.0.{k + 10}", 80, eps) for k in range(5))
    assert wire.table_from_json(json.loads(json.dumps(wire.table_to_json(table)))) == table
    new = table.without("ns/s1").with_ports(ServicePort("ns", "s9", "", "UDP", "10.96.0.99", 53, eps[:1]),
                                            ServicePort("ns", "s2", "", "TCP", "10.96.0.12", 80, eps[:1]))
    changes = diff(table, new)
    back = wire.changes_from_json(json.loads(json.dumps(wire.changes_to_json(changes))))
    assert back == changes
    assert wire.apply_changes(table, back) == new  # what the agent applies is the host's table, in order
    assert list(wire.apply_changes(table, back).ports) == list(new.ports)


def test_vm_commands_use_the_vm_copies_of_python_and_the_native_helpers():
    import sys

    from labkit import native

    client = native.cache_dir() / "lkclient-0123abcd"
    assert payload.remote_argv([str(client), "--mode", "crr"]) == [f"{payload.REMOTE_ROOT}/cache/bin/lkclient-0123abcd",
                                                                   "--mode", "crr"]
    assert payload.remote_argv([sys.executable, "-m", "labkit.probe"]) == ["python3", "-m", "labkit.probe"]
    assert payload.remote_argv(["ip", "addr"]) == ["ip", "addr"]


def test_vagrantfile_reads_everything_the_backend_writes():
    text = vg.vagrantfile_source().read_text()
    for key in ("box", "domain_prefix", "driver", "tb_cache_mib", "management", "vpc", "nodes", "nics", "mac",
                "memory", "cpus", "kernel", "initrd", "cmdline", "serial_dir", "mgmt_mac"):
        assert f'"{key}"' in text or f"'{key}'" in text, key
    assert 'management_network_mode = "none"' in text and "veryisolated" in text  # nothing forwarded
    assert ":virtualbox" in text


def test_box_recipe_key_is_stable_and_the_default_box_has_bcc_and_headers():
    assert box.BoxRecipe().key == box.BoxRecipe().key
    assert box.BoxRecipe(with_bcc=False).key != box.BoxRecipe().key
    default = box.BoxRecipe().all_packages
    assert {"python3-bpfcc", "linux-headers-amd64", "linux-image-amd64"} <= set(default)
    assert "python3-bpfcc" not in box.BoxRecipe(with_bcc=False).all_packages
    assert vgb.box_recipe(load_spec(VMDEMO)) == box.BoxRecipe()  # every lab, whatever its datapath
    assert box.box_for().name.startswith(box.BOX_PREFIX)


def test_box_recipe_key_per_release_keeps_bookworms_key():
    """The release is part of the key; bookworm's key is the one computed before there were two
    releases (the field was called ``suite``), so a bookworm box built then stays valid."""
    import hashlib
    from dataclasses import asdict

    bookworm, trixie = box.BoxRecipe(), box.BoxRecipe(release="trixie")
    legacy = {("suite" if k == "release" else k): v for k, v in asdict(bookworm).items()}
    assert bookworm.key == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:10]
    assert trixie.key != bookworm.key and box.BoxRecipe(release="trixie", with_bcc=False).key != trixie.key
    assert box.box_for(bookworm).name == f"labkit/debian12-{bookworm.key}"
    assert box.box_for(trixie).name == f"labkit/debian13-{trixie.key}"
    assert {"python3-bpfcc", "linux-headers-amd64", "linux-image-amd64"} <= set(trixie.all_packages)
    assert box.BoxRecipe.from_json({**legacy, "name": "x", "kernel_version": "6.1.0-9-amd64"}) == bookworm
    assert box.BoxRecipe.from_json(json.loads(json.dumps(asdict(trixie)))) == trixie
    with pytest.raises(box.LabkitError, match="unknown Debian release 'trixi' .did you mean trixie.*bookworm"):
        _ = box.box_for(box.BoxRecipe(release="trixi")).name
    spec = load_spec({**load_spec(VMDEMO).to_dict(), "release": "trixie"})
    assert vgb.box_recipe(spec) == trixie and vgb.box_recipe(load_spec(VMDEMO)) == bookworm


SAMPLE_CONFIG = """#
# Automatically generated file; DO NOT EDIT.
# Linux/x86 6.12.57 Kernel Configuration
#
CONFIG_INET=y
CONFIG_IPV6=y
CONFIG_NETKIT=y
CONFIG_IPVLAN=m
# CONFIG_IPVTAP is not set
CONFIG_IP_VS=m
CONFIG_IP_VS_IPV6=y
CONFIG_DEBUG_INFO_BTF=y
CONFIG_DEBUG_INFO_BTF_MODULES=y
"""


def test_kernel_features_are_read_from_the_kernels_config():
    trixie = box.kernel_features(SAMPLE_CONFIG, "6.12.57+deb13-amd64")
    assert trixie == {"netkit": "y", "ipvlan": "m", "ip_vs": "m", "btf": "y", "big_tcp": "ipv4,ipv6"}
    assert box.describe_features(trixie) == "netkit y, ipvlan m, ip_vs m, BTF y, BIG TCP ipv4+ipv6"
    # bookworm's 6.1: no netkit (6.7+), BIG TCP for IPv6 only (IPv4's came in 6.3)
    old = SAMPLE_CONFIG.replace("CONFIG_NETKIT=y", "").replace("CONFIG_DEBUG_INFO_BTF=y", "# CONFIG_DEBUG_INFO_BTF is not set")
    bookworm = box.kernel_features(old, "6.1.0-50-amd64")
    assert bookworm == {"netkit": "", "ipvlan": "m", "ip_vs": "m", "btf": "", "big_tcp": "ipv6"}
    assert box.describe_features(bookworm).startswith("no netkit, ipvlan m, ip_vs m, no BTF, BIG TCP ipv6")
    assert box.kernel_features(old.replace("CONFIG_IPV6=y", ""), "5.10.0-30-amd64")["big_tcp"] == ""
    assert box.describe_features({}) == "features unknown"


def test_a_pod_mode_the_boxs_kernel_lacks_is_refused_before_any_vm(tmp_path):
    """The features recorded at build time decide, before ``vagrant up``: a box whose kernel has no
    ipvlan cannot run eni-ipvlan pods (the netkit mode and bookworm's box are the real case)."""
    from labkit.errors import MissingFeature

    (tmp_path / "recipe.json").write_text(json.dumps({"kernel_version": "6.1.0-50-amd64", "kernel_features": {
        "netkit": "", "ipvlan": "", "ip_vs": "m", "btf": "y", "big_tcp": "ipv6"}}))
    lacking = box.Box(box.BoxRecipe(), tmp_path)
    assert lacking.lacks(("ipvlan", "bridge", "netkit")) == ["ipvlan", "netkit"]  # bridge: not the box's to say
    with pytest.raises(MissingFeature, match="pod mode eni-ipvlan needs 'ipvlan'.*bookworm box's kernel.*trixie"):
        vgb.check_box_features(load_spec(VMDEMO), lacking)
    assert box.Box(box.BoxRecipe(), tmp_path / "unbuilt").lacks(("ipvlan",)) == []  # unknown: the VM will say


def test_a_release_the_mirror_lacks_fails_fast(tmp_path, monkeypatch):
    """Before debootstrap or root: a mirror without ``dists/<release>`` is one error naming both."""
    mirror = tmp_path / "mirror"
    (mirror / "dists/bookworm").mkdir(parents=True)
    (mirror / "dists/bookworm/InRelease").write_text("Codename: bookworm\n")
    box.check_release(mirror.as_uri(), "bookworm")
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(box, "debian_mirror", lambda release: mirror.as_uri())
    monkeypatch.setattr(box.os, "geteuid", lambda: 1000)  # would fail next: the mirror must be asked first
    t0 = time.monotonic()
    with pytest.raises(box.LabkitError, match=f"mirror {mirror.as_uri()} does not serve trixie.*dists/trixie"):
        box.build(box.BoxRecipe(release="trixie"))
    assert time.monotonic() - t0 < 2 and not (tmp_path / "cache/boxes").exists()


def test_payload_ships_bytecode_only_for_the_machines_python(tmp_path):
    """Bytecode of this host's Python only when the VM's python3 is the same version (bookworm's 3.11
    on a Debian 12 host); trixie's 3.13 compiles its own on first import (the agent may write it)."""
    import sys

    if shutil.which("gcc") is None:
        pytest.skip("gcc builds the native helpers shipped into the VMs")
    spec = load_spec(VMDEMO)
    def names(python) -> set[str]:
        with tarfile.open(payload.build_payload(spec, tmp_path / "payload", python=python)) as tar:
            return set(tar.getnames())

    other = names((3, sys.version_info[1] + 2))
    assert "./lib/labkit/remote/agent.py" in other and not any(n.endswith(".pyc") for n in other)
    mine = names(sys.version_info[:2])
    assert any(n.endswith(".pyc") and "labkit/remote/__pycache__/agent" in n for n in mine)
    assert " -B " not in payload.AGENT


def test_box_headers_check_names_the_mismatch(tmp_path):
    root = tmp_path / "root"
    (root / "usr/src/linux-headers-6.1.0-9-amd64/include").mkdir(parents=True)
    (root / "lib/modules/6.1.0-9-amd64").mkdir(parents=True)
    (root / "lib/modules/6.1.0-9-amd64/build").symlink_to("/usr/src/linux-headers-6.1.0-9-amd64")
    box._check_headers(root, "6.1.0-9-amd64")  # matching: no error
    # trixie's link is relative, from /usr/lib/modules/<kver> (merged /usr: /lib -> usr/lib)
    trixie = tmp_path / "trixie"
    (trixie / "usr/src/linux-headers-6.12.57+deb13-amd64/include").mkdir(parents=True)
    (trixie / "usr/lib/modules/6.12.57+deb13-amd64").mkdir(parents=True)
    (trixie / "lib").symlink_to("usr/lib")
    (trixie / "usr/lib/modules/6.12.57+deb13-amd64/build").symlink_to("../../../src/linux-headers-6.12.57+deb13-amd64")
    box._check_headers(trixie, "6.12.57+deb13-amd64")
    (root / "lib/modules/6.1.0-8-amd64").mkdir(parents=True)
    with pytest.raises(box.LabkitError, match="6.1.0-8-amd64 has no matching headers.*linux-headers-6.1.0-9-amd64"):
        box._check_headers(root, "6.1.0-8-amd64")


def test_preinstall_config_excludes_docs_and_keeps_the_initrd_small(tmp_path):
    box._preinstall(tmp_path)
    excludes = (tmp_path / "etc/dpkg/dpkg.cfg.d/01-labkit-excludes").read_text()
    assert "path-exclude=/usr/share/doc/*" in excludes and "drivers/gpu" in excludes
    assert "kernel/net/ipv4" not in excludes and "drivers/net/*" not in excludes  # the lab's own modules stay
    assert "MODULES=list" in (tmp_path / "etc/initramfs-tools/conf.d/labkit.conf").read_text()
    assert set((tmp_path / "usr/share/initramfs-tools/modules.d/labkit").read_text().split()) == {
        "virtio_pci", "virtio_blk", "ext4"}


def test_debian_mirror_comes_from_apt_sources():
    try:
        mirror = box.debian_mirror()
    except Exception as exc:  # a machine without Debian sources
        pytest.skip(str(exc))
    assert mirror.startswith("http") and "security" not in mirror


def test_payload_holds_labkit_pyroute2_natives_and_spec(tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("gcc builds the native helpers shipped into the VMs")
    spec = load_spec(VMDEMO)
    tar_path = payload.build_payload(spec, tmp_path / "payload")
    names = set(tarfile.open(tar_path).getnames())
    assert "./lib/labkit/remote/agent.py" in names and "./lib/pyroute2/__init__.py" in names
    assert "./spec.yaml" in names and any(n.startswith("./cache/bin/lkserver-") for n in names)
    # the eBPF datapaths compile bpf/ in the VM
    assert {"./lib/labkit/_bpf/bpf_sock.c", "./lib/labkit/_bpf/bpf_lxc.c", "./lib/labkit/_bpf/lib/lb.h"} <= names
    assert not any("__pycache__" in n and not n.endswith(".pyc") and n.endswith(".py") for n in names)


def test_mgmt_subnet_avoids_host_routes():
    import ipaddress

    first = vg.names.pick_mgmt_subnet("vmdemo", used=[])
    assert first.prefixlen == 24 and str(first).startswith("192.168.")
    taken = [ipaddress.IPv4Network(f"{first.network_address + 256 * k}/24") for k in range(3)
             if int(first.network_address + 256 * k) < int(ipaddress.IPv4Address("192.168.200.0"))]
    other = vg.names.pick_mgmt_subnet("vmdemo", used=taken + [ipaddress.IPv4Network("0.0.0.0/0")])
    assert other.prefixlen == 24 and not any(other.overlaps(t) for t in taken), other
    assert vg.names.pick_mgmt_subnet("vmdemo") not in [n for n in vg.names.host_routes() if n.prefixlen]
    assert ipaddress.IPv4Network("127.0.0.0/8") in vg.names.host_routes()  # every table, local included


# ------------------------------------------------------------------ real VMs



def _host_leftovers(lab: str) -> dict:
    """Everything a vagrant lab could leave on the host, found by its names."""
    names = vg.VmNames(lab)
    out = {"netns": [n for n in os.listdir("/run/netns") if n.startswith(f"lk-{lab}.")]
           if os.path.isdir("/run/netns") else []}
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    out["links"] = [x for x in (names.mgmt_bridge, names.vpc_bridge, names.router_veth) if f" {x}:" in links
                    or f" {x}@" in links]
    if lv.LIBVIRT_SOCK.exists():
        out["domains"] = [d for d in lv.virsh("list", "--all", "--name", check=False).stdout.split()
                          if d.startswith(names.domain_prefix)]
        out["networks"] = [n for n in lv.virsh("net-list", "--all", "--name", check=False).stdout.split()
                           if n.startswith(names.prefix + ".")]
        out["volumes"] = [v for v in lv.virsh("vol-list", "default", check=False).stdout.split()
                          if v.startswith(names.domain_prefix)]
    out["state"] = [str(p) for p in [LabState(lab).dir] if p.exists()]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    out["ssh"] = [ln for ln in ps.splitlines() if f"/run/labkit/{lab}/vagrant" in ln]
    return {k: v for k, v in out.items() if v}


@pytest.fixture(scope="module")
def vmdemo():
    """The issue's acceptance lab, up once for the module's VM tests; always torn down."""
    from labkit import lab as labmod

    spec = load_spec({**load_spec(VMDEMO).to_dict(), "name": "tvmdemo"})  # never a user's own vmdemo
    daemons_before = lv.load_daemons()["started"] if lv.DAEMONS_FILE.exists() else {}
    libvirt_running = lv.LIBVIRT_SOCK.exists()
    labmod.down(spec.name) if LabState(spec.name).exists else None
    t0 = time.monotonic()
    try:
        lb = labmod.up(spec, progress=False)
        lb.up_seconds = time.monotonic() - t0
        yield lb
    finally:
        counts = labmod.down(spec.name)
        print(f"{spec.name} down: {counts}")
    left = _host_leftovers(spec.name)
    assert not left, f"down left {left}"
    if not libvirt_running and not daemons_before:
        assert not lv.LIBVIRT_SOCK.exists(), "libvirtd started by labkit is still running"
        for tool in ("iptables", "ip6tables"):
            rules = subprocess.run([tool, "-S"], capture_output=True, text=True).stdout
            assert "LIBVIRT_" not in rules, f"{tool} keeps libvirt's chains"


@VM
def test_box_builds_offline_and_doctor_reports_it():
    t0 = time.monotonic()
    built = box.build(log=print)
    print(f"box ready in {time.monotonic() - t0:.0f} s ({built.name})")
    assert built.ready() and built.kernel.exists()
    status, detail, _ = box.doctor_row()
    assert status == "ok" and built.name in detail


@VM
def test_vmdemo_check_passes_across_vms(vmdemo):
    print(f"{vmdemo.name} up in {vmdemo.up_seconds:.0f} s")
    meta = LabState(vmdemo.name).meta()
    assert set(meta["kernels"]) == {"node1", "node2"}
    assert all(k != os.uname().release for k in meta["kernels"].values()), "pods must run on the VMs' kernel"
    results = vmdemo.check()
    failed = [r for r in results if not r.ok]
    assert not failed, failed
    kinds = {r.kind for r in results}
    assert {"pod", "service"} <= kinds
    # the IPVLAN pod on node1 answered a pod on node2, and the service reached all three backends
    assert any(r.src == "web-1" and r.dst == "web-0" and r.ok for r in results if r.kind == "pod")
    # a veth pod reaches the exclusive-ENI pod of its node through the node, over the pod's veth1: the
    # pod must answer its node's ARP there (it did not when it inherited the VM's arp_ignore=1)
    assert any(r.src == "cli-2" and r.dst == "web-2" and r.ok for r in results if r.kind == "pod")
    seen = {r.observed for r in results if r.kind == "service"}
    assert seen == {"web-0", "web-1", "web-2"}


@VM
def test_vmdemo_exec_and_ipvs_inside_the_vm(vmdemo):
    out = vmdemo.exec("web-0", ["ip", "-d", "-o", "link", "show", "eth0"]).stdout
    assert "ipvlan" in out
    ctx = vmdemo.backend.node_context(vmdemo.spec, "node1")
    table = ctx.run(["ipvsadm", "-Ln"]).stdout
    svc = next(iter(vmdemo.services()))
    assert f"{svc.cluster_ip}:{svc.port}" in table and table.count("Masq") == 3
    proc = subprocess.run([str(ROOT / ".venv/bin/labkit"), "exec", vmdemo.name, "cli-0", "--", "uname", "-r"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == LabState(vmdemo.name).meta()["kernels"]["node1"]


@VM
def test_vmdemo_load_client_and_datapath_driven_from_the_host(vmdemo, tmp_path):
    """What experiments use, on VMs: lkclient in a pod of a VM with its raw samples back here, and a
    datapath of a VM node synced from here (whole table, then one known change: a partial sync)."""
    from labkit.errors import MeasurementError
    from labkit.measure.stats import load_raw
    from labkit.services import TableDiff
    from labkit.experiments.service_scale import bulk_service

    svc = next(iter(vmdemo.services()))
    raw = tmp_path / "crr.i64"
    res = vmdemo.run_client("cli-0", "crr", svc.cluster_ip, svc.port, samples=60, warmup=5, raw_path=raw)
    assert res["samples"] == 60 and res["errors"] == 0 and res["p50_us"] > 0, res
    assert raw.stat().st_size == 8 * 60 and (load_raw(raw) > 0).all()
    with pytest.raises(MeasurementError, match="lkclient crr to 10.96.0.250:81.*cli-0"):
        vmdemo.run_client("cli-0", "crr", "10.96.0.250", 81, samples=5, warmup=0, max_errors=2,
                          connect_timeout_ms=200)

    path = vmdemo.datapath("node1", "ipvs")
    try:
        extra = bulk_service(svc.endpoints, 7)
        full = path.sync(vmdemo.services().with_ports(extra))
        assert full.full and full.services == 2 and full.node == "node1" and full.seconds > 0
        more = bulk_service(svc.endpoints, 8)
        table = vmdemo.services().with_ports(extra, more)
        part = path.sync_changes(table, TableDiff(added=(more,)))
        assert not part.full and part.added == 1 and part.services == 3
        ipvs = vmdemo.backend.node_context(vmdemo.spec, "node1").run(["ipvsadm", "-Ln"]).stdout
        assert f"{extra.cluster_ip}:80" in ipvs and f"{more.cluster_ip}:80" in ipvs
        assert vmdemo.run_client("cli-0", "crr", more.cluster_ip, 80, samples=20, warmup=2)["errors"] == 0
        path.sync(vmdemo.services())  # back to the spec's table for the other tests
    finally:
        path.close()
    assert f"{more.cluster_ip}:80" not in vmdemo.backend.node_context(vmdemo.spec, "node1").run(
        ["ipvsadm", "-Ln"]).stdout


@VM
def test_ipvs_partial_syncs_match_a_full_render_and_a_failed_one_resyncs_in_full(vmdemo):
    """Partial syncs read nothing back (reference counts of set entries instead): after each known
    change (services sharing endpoints added, one's endpoints changed, one removed) the VM's virtual
    servers, ipsets and kube-ipvs0 addresses are exactly the desired table's; a partial sync that
    fails (an address deleted behind the datapath's back) raises, and the next sync is full and repairs."""
    from labkit.datapath import ipvs
    from labkit.errors import DatapathError
    from labkit.experiments.service_scale import bulk_service
    from labkit.services import TableDiff

    ctx = vmdemo.backend.node_context(vmdemo.spec, "node1")

    def kernel_state():
        vs = {k: set(v) for k, v in ipvs.parse_ipvsadm_save(ctx.run(["ipvsadm-save", "-n"]).stdout).items()}
        sets = {name: {line.split()[2] for line in ctx.run(["ipset", "list", "-o", "save", name]).stdout.splitlines()
                       if line.startswith("add ")} for name in ("KUBE-CLUSTER-IP", "KUBE-LOOP-BACK", "KUBE-IPVS-IPS")}
        addrs = {line.split()[3] for line in ctx.run(["ip", "-o", "-4", "address", "show", "dev", ipvs.DUMMY]
                                                     ).stdout.splitlines()}
        return vs, sets, addrs

    def expected(table):
        refs = ipvs.set_refs(table)
        return ({k: set(v) for k, v in ipvs.virtual_servers(table).items()},
                {name: set(refs[name]) for name in ("KUBE-CLUSTER-IP", "KUBE-LOOP-BACK", "KUBE-IPVS-IPS")},
                {f"{ip}/32" for ip in refs["KUBE-IPVS-IPS"]})

    base = vmdemo.services()
    eps = next(iter(base)).endpoints
    a, b = bulk_service(eps, 20), bulk_service(eps, 21)  # the same endpoints: shared KUBE-LOOP-BACK entries
    path = vmdemo.datapath("node1", "ipvs")
    try:
        table = base.with_ports(a)
        assert path.sync(table).full
        steps = [TableDiff(added=(b,))]
        b2 = bulk_service(eps[:1], 21)
        steps.append(TableDiff(changed=((b, b2),)))
        steps.append(TableDiff(removed=(a,)))
        for change in steps:
            table = table.without(*(sp.key for sp in change.removed)).with_ports(
                *change.added, *(new for _, new in change.changed))
            res = path.sync_changes(table, change)
            assert not res.full and res.services == len(table)
            assert kernel_state() == expected(table), change.summary()
        ctx.run(["ip", "address", "del", f"{b2.cluster_ip}/32", "dev", ipvs.DUMMY])
        with pytest.raises(DatapathError):
            path.sync_changes(table.without(b2.key), TableDiff(removed=(b2,)))
        table = table.without(b2.key)
        assert path.sync(table).full  # forced: the state after a failed apply is unknown
        assert kernel_state() == expected(table)
        path.sync(base)  # back to the spec's table for the other tests
        assert kernel_state() == expected(base)
    finally:
        path.close()


@VM
def test_ebpf_service_inside_a_vm():
    """The acceptance lab with ``datapath: ebpf``: bcc in the VMs compiles bpf/bpf_sock.c against the
    box's own kernel headers, every pod (the IPVLAN ones too: socket-LB sees their connect()) reaches
    the Service's three backends across the VMs, and no IPVS or iptables Service rules are involved.
    A NetworkPolicy (iptables engine, in the VMs) lets only web pods reach web-2: the check's policy
    matrix observes exactly the oracle's allows and denies."""
    from labkit import lab as labmod

    data = {**load_spec(VMDEMO).to_dict(), "name": "tvmebpf", "datapath": "ebpf"}
    data["nodes"][1]["pods"][1]["labels"] = {"app": "web", "tier": "db"}  # web-2: only web pods may reach it
    data["policies"] = [{"name": "db-from-web", "pod_selector": {"tier": "db"},
                         "ingress": [{"from": [{"pod_selector": {"app": "web"}}]}]}]
    spec = load_spec(data)
    labmod.down(spec.name) if LabState(spec.name).exists else None
    try:
        t0 = time.monotonic()
        lb = labmod.up(spec, progress=False)
        print(f"{spec.name} up in {time.monotonic() - t0:.0f} s: {LabState(spec.name).meta()['times']}")
        sync = LabState(spec.name).meta()["nodes"]["node1"]["datapath"]
        assert sync["datapath"] == "ebpf" and sync["services"] == 1, sync
        results = lb.check()
        failed = [r for r in results if not r.ok]
        assert not failed, failed
        service = [r for r in results if r.kind == "service"]
        # ipvlan pods included; cli-0 may not reach web-2, so it is no Service client under the policy
        assert {r.src for r in service} == {"web-0", "web-1", "web-2"}
        assert {r.observed for r in service} == {"web-0", "web-1", "web-2"}
        denied = {(r.src, r.dst) for r in results if r.kind == "policy" and r.expected == "deny"}
        assert ("cli-0", "web-2") in denied and not any(src == "web-0" for src, _ in denied), denied
        # the policy is enforced inside the VMs (iptables engine in web-2's node): a denied pair timed out
        path = lb.datapath("node2", "ebpf")  # the agent in the VM reads the pinned maps back
        info = path.describe()
        path.close()
        assert info["attached"] and info["map_services"] == 1 and info["map_backends"] == 3, info
        ctx = lb.backend.node_context(lb.spec, "node2")
        assert "TCP" not in ctx.run(["ipvsadm", "-Ln"], check=False).stdout
    finally:
        labmod.down(spec.name)
    assert not _host_leftovers(spec.name)


NETKIT_LAB = """
name: tvmnk
backend: vagrant
release: trixie
vpc_cidr: 10.20.0.0/16
pod_cidr: 10.245.0.0/16
datapath: ebpf-tc
host_routing: bpf
policy_engine: ebpf
nodes:
  - name: node1
    pods:
      - {name: nk-0, mode: netkit, labels: {app: web}}
      - {name: cli, mode: netkit, labels: {app: cli}}
      - {name: ve-0, mode: veth, labels: {app: cli}}
  - name: node2
    pods:
      - {name: nk-1, mode: netkit, labels: {app: web}}
      - {name: ve-1, mode: veth, labels: {app: web}}
      - {name: other, mode: veth}
services:
  - {name: web, port: 80, target_port: 8080, selector: {app: web}}
policies:
  - {name: only-cli, pod_selector: {app: web}, ingress: [{from: [{pod_selector: {app: cli}}]}]}
"""


@VM
def test_trixie_box_and_netkit_pods_with_cilium_s_ebpf_on_it():
    """Debian 13: its box builds offline (or is reused) with kernel 6.12 and the features bookworm's 6.1
    lacks recorded (netkit, BIG TCP over IPv4), doctor lists it beside bookworm's. A lab with
    ``release: trixie`` comes up on it (the agent on python3.13, pyroute2, trixie's bcc with LLVM 19
    compiling the tc programs) with netkit pods and everything Cilium puts on them: the ebpf-tc Service
    datapath, eBPF host routing and the eBPF policy engine, all in netkit's own program lists (links on
    the primaries, in tc's order; no tc filter there), beside veth pods (tc filters) across two VMs.
    ``labkit check`` passes (pods, the Service to netkit and veth backends, the policy's allows and
    denies); TCP_RR across nodes, netkit to netkit against veth to veth in the same
    VMs, is reported (TCG: functional only); ``down`` leaves nothing. ~3.5 min here with the box cached;
    a fresh box adds its build (87 s here). IPVLAN and IPVS run on the bookworm labs above."""
    from labkit import lab as labmod

    t0 = time.monotonic()
    built = box.build(box.BoxRecipe(release="trixie"), log=print)
    print(f"trixie box ready in {time.monotonic() - t0:.0f} s ({built.name})")
    info = built.info()
    assert built.ready() and built.name.startswith("labkit/debian13-") and info["kernel"].startswith("6.12.")
    assert info["features"] == {"netkit": "y", "ipvlan": "m", "ip_vs": "m", "btf": "y", "big_tcp": "ipv4,ipv6"}
    assert f"{built.name}: kernel {info['kernel']}" in box.doctor_row()[1]

    spec = load_spec(NETKIT_LAB)
    labmod.down(spec.name) if LabState(spec.name).exists else None
    try:
        t0 = time.monotonic()
        lb = labmod.up(spec, progress=False)
        meta = LabState(spec.name).meta()
        print(f"{spec.name} up in {time.monotonic() - t0:.0f} s: {meta['times']['nodes']}")
        assert meta["release"] == "trixie" and meta["box"] == built.name
        assert set(meta["kernels"].values()) == {info["kernel"]}
        results = lb.check()
        failed = [r for r in results if not r.ok]
        assert not failed, failed
        assert {r.observed for r in results if r.kind == "service"} >= {"nk-0", "nk-1", "ve-1"}
        policy = {(r.src, r.dst): r.observed for r in results if r.kind == "policy"}  # pod to pod, judged
        assert policy[("cli", "nk-1")] == "allow" and policy[("nk-1", "cli")] == "allow", policy  # netkit across VMs
        assert policy[("other", "nk-0")] == "deny" and policy[("nk-0", "nk-1")] == "deny", policy
        node1 = lb.backend.node_context(lb.spec, "node1")
        python = node1.run(["python3", "-c", "import sys; print(sys.version)"])
        assert python.stdout.startswith("3.13"), python.stdout
        # the netkit pod's node side is a netkit primary in L3 mode: no ARP (Ethernet framing all the same)
        link = node1.run(["env", "PYTHONPATH=/opt/labkit/lib", "python3", "-c",
                          "from labkit.modes.netkit import register_netlink; register_netlink()\n"
                          "from pyroute2 import IPRoute\n"
                          "l = IPRoute().link('get', ifname='lx-nk-0')[0]\n"
                          "info = l.get_attr('IFLA_LINKINFO')\n"
                          "print(info.get_attr('IFLA_INFO_KIND'), info.get_attr('IFLA_INFO_DATA')"
                          ".get_attr('IFLA_NETKIT_MODE'), l['ifi_type'], l['flags'] & 0x80)"])
        assert link.stdout.split() == ["netkit", "1", "1", str(0x80)], link  # netkit, NETKIT_L3, ARPHRD_ETHER, NOARP
        # Cilium's programs sit in the netkit device's own lists, in tc's order (policy, Service NAT,
        # host routing), as pinned links; no tc filter on the primary; the veth pod keeps tc filters
        lists = node1.run(["env", "PYTHONPATH=/opt/labkit/lib", "python3", "-c",
                           "import json, socket\n"
                           "from labkit.ebpf import netkit\n"
                           "i = socket.if_nametoindex('lx-nk-0')\n"
                           "print(json.dumps({side: [(n, bool(link)) for _, link, n in netkit.programs(i, t)]\n"
                           "                  for side, t in (('peer', netkit.ATTACH_NETKIT_PEER),\n"
                           "                                  ('primary', netkit.ATTACH_NETKIT_PRIMARY))}))"])
        assert json.loads(lists.stdout) == {
            "peer": [["lk_pol_from_pod", True], ["lk_from_contain", True], ["lk_host_from_ne", True]],
            "primary": [["lk_pol_to_pod", True], ["lk_to_container", True]]}, lists.stdout
        for direction in ("ingress", "egress"):
            assert "bpf" not in node1.run(["tc", "filter", "show", "dev", "lx-nk-0", direction]).stdout
        tc = node1.run(["tc", "filter", "show", "dev", "lx-ve-0", "ingress"]).stdout
        for prog in ("lk_pol_from_pod", "lk_from_container", "lk_host_from_container"):
            assert prog in tc, tc
        # host routing forwarded: out of eth0 to the FIB's next hop, and into local pods through their
        # devices (in a netkit pod's transmit bpf_redirect_peer is refused; policy sits on every egress)
        hr = json.loads(node1.run(["env", "PYTHONPATH=/opt/labkit/lib", "python3", "-c",
                                   "import json\n"
                                   "from labkit import hostrouting as H\n"
                                   "from labkit.ebpf.loader import Bpffs\n"
                                   "from labkit.state import LabState\n"
                                   "hr = H.BpfHostRouting.__new__(H.BpfHostRouting)\n"
                                   f"hr.fs = Bpffs(LabState('{spec.name}').dir / 'nodes' / 'node1', H.FOLDER)\n"
                                   "print(json.dumps(hr.stats()))"]).stdout)
        assert hr["redirect_egress"] > 0 and hr["redirect_neigh"] > 0, hr
        p50 = {"netkit": [], "veth": []}
        for _ in range(3):  # interleaved
            for mode, src, dst in (("netkit", "cli", "nk-1"), ("veth", "ve-0", "ve-1")):
                res = lb.run_client(src, "rr", str(lb.plan.pods[dst].ip), 8080, samples=300, warmup=30)
                assert res["errors"] == 0, res
                p50[mode].append(res["p50_us"])
        ratio = statistics.median(p50["netkit"]) / statistics.median(p50["veth"])
        print(f"TCP_RR p50 across VMs (TCG, functional only): netkit {p50['netkit']} us, veth {p50['veth']} us: "
              f"netkit/veth {ratio:.2f}")
        assert 0.3 < ratio < 3, p50  # both work, neither stalls (a figure, not a performance claim)
    finally:
        labmod.down(spec.name)
    assert not _host_leftovers(spec.name)


def _labkit_run(tmp_path: Path, args: list[str]):
    """`labkit run ARGS -q` with a results store in ``tmp_path``: it must succeed; (process, run)."""
    from labkit import results

    env = {**os.environ, "LABKIT_RESULTS": str(tmp_path / "results")}
    t0 = time.monotonic()
    proc = subprocess.run([str(ROOT / ".venv/bin/labkit"), "run", *args, "-q"], capture_output=True, text=True,
                          env=env, timeout=1500)
    print(f"labkit run {args[0]} on VMs: {time.monotonic() - t0:.0f} s\n{proc.stdout[-1500:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, results.Run.open(next((tmp_path / "results").iterdir()).name, root=tmp_path / "results")


@VM
def test_tiny_service_scale_runs_on_vms(tmp_path):
    """`labkit run service-scale --backend vagrant`, small: IPVS (which this host's kernel lacks) in its
    own VM, lkclient in the VM's client pod, every row, raw samples back here, the VM's kernel in the
    manifest, the lab gone afterwards."""
    proc, run = _labkit_run(tmp_path, ["service-scale", "--backend", "vagrant", "--datapaths", "ipvs", "--services",
                                       "1,20", "--positions", "first,last,pod", "--repeats", "1", "--samples", "60",
                                       "--warmup", "6", "--burst", "30"])
    m, pts = run.manifest(), run.points()
    assert m["status"] == "complete" and m["params"]["backend"] == "vagrant" and m["backend"] == "vagrant"
    kernel = m["node_kernels"]["ipvs"]["n0"]
    assert kernel == box.status()["kernel"] and kernel != m["machine"]["kernel"]  # the VM's, not the host's
    lat = pts[pts.metric == "crr"]
    # every sample is there; under TCG a connect can outlast lkclient's 1 s timeout when the host is
    # busy (one CI run counted 4 such errors in one point): counted, retried, and kept few
    assert len(lat) == 2 * 3 and (lat.samples == 60).all() and (lat.errors <= 6).all(), lat
    for _, row in lat.iterrows():
        assert (run.path / "raw" / row.raw).stat().st_size == 8 * 60
    # a service's latency is measured through IPVS: 20 services loaded, then one more added 3 times
    loads, updates = pts[pts.metric == "load"], pts[pts.metric == "update"]
    assert sorted(loads.services) == [1, 20] and (loads.value > 0).all()
    assert len(updates) == 2 * 3 and (updates.value > 0).all()
    assert "ipvs" in proc.stdout
    assert not _host_leftovers(m["labs"]["ipvs"])


@VM
def test_pod_modes_quick_runs_on_vms(tmp_path):
    """`labkit run pod-modes --backend vagrant --quick`: its default modes are every mode of the box's
    kernel (IPVLAN included, which this host lacks) and Terway + Cilium, pods only (the dry run's plan);
    then the quick run with four of them (all eight took 250 s here, the issue's 5-minute goal, and
    357 s in a CI run: four keep CI's time down): every mode got its TCP_CRR and TCP_RR points same node and across
    nodes without errors, lkclient in the VMs, the VMs' kernel in the manifest, the run's phases
    logged, and the lab gone after."""
    plan = subprocess.run([str(ROOT / ".venv/bin/labkit"), "run", "pod-modes", "--quick", "--backend", "vagrant",
                           "--dry-run", "--json"], capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    defaults = json.loads(plan.stdout)["params"]["modes"]
    assert {"eni-exclusive", "eni-ipvlan", "eni-policy-route", "veth", "overlay", "eni-ipvlan+ebpf-tc"} <= set(defaults)
    assert "host-network" not in defaults and "netkit" not in defaults  # bookworm's 6.1 has no netkit
    modes = ["eni-exclusive", "eni-ipvlan", "veth", "eni-ipvlan+ebpf-tc"]
    t0 = time.monotonic()
    _, run = _labkit_run(tmp_path, ["pod-modes", "--quick", "--backend", "vagrant", "--modes", ",".join(modes)])
    took = time.monotonic() - t0
    m, pts = run.manifest(), run.points()
    assert m["status"] == "complete" and m["backend"] == "vagrant" and m["params"]["modes"] == modes
    assert set(m["node_kernels"]) == {"node1", "node2"}
    assert set(m["node_kernels"].values()) == {box.status()["kernel"]} != {m["machine"]["kernel"]}
    # Terway + Cilium: IPVLAN pods whose client goes through a ClusterIP, load-balanced by ebpf-tc on the
    # pod's own slave (the VM's agent attached it to those pods only); its flows are in ebpf-tc's conntrack
    assert "eni-ipvlan+ebpf-tc" in modes
    assert set(pts[pts["mode"] == "eni-ipvlan+ebpf-tc"]["datapath"]) == {"ebpf-tc"}
    assert all(len(m["ebpf_tc"][node]["pods"]) == n for node, n in (("node1", 2), ("node2", 1))), m["ebpf_tc"]
    assert m["ebpf_tc_flows"]["node1"] > 0, m["ebpf_tc_flows"]  # the clients' node translates
    assert set(zip(pts["mode"], pts["position"], pts["metric"])) == {
        (mode, where, metric) for mode in modes for where in ("same-node", "cross-node") for metric in ("crr", "rr")}
    assert (pts.samples == 400).all() and (pts.errors == 0).all(), pts[pts.errors > 0]
    assert set(m["phases"]) >= {"setup", "latency", "teardown"} and (run.path / "run.log").exists()
    assert took < 300, f"{took:.0f} s for four modes (eight should take 5 min)"
    assert not _host_leftovers(m["labs"]["pod-modes"])
