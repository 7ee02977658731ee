"""The vagrant backend: a real two-VM lab under QEMU (TCG here), built from labkit's own box.

Layers: pure tests of names, the Vagrantfile's input, the payload and the box recipe (no root, no
VMs, milliseconds); then ``@pytest.mark.vm`` tests that build (or reuse) the box, bring up the issue's
acceptance lab (IPVLAN and an exclusive ENI across two VMs, a Service through IPVS inside the VMs),
run ``labkit check`` and ``labkit exec`` against it, and verify that ``down`` leaves nothing on the
host: no domain, volume, libvirt network, ``lk-`` namespace or bridge, ssh master, daemon or
LIBVIRT_* iptables chain that labkit started. About 5-8 min on this 2-core machine (TCG).

The eBPF datapaths need bcc inside the VM, which the default box leaves out (clang/LLVM and kernel
headers double its size and build time): ``LABKIT_VM_BCC=1`` builds the ``--with-bcc`` box and adds
an ``ebpf`` lab; otherwise that test is skipped with this reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from labkit import addressing, box
from labkit.backends import vagrant as vg
from labkit.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
VMDEMO = ROOT / "vagrant" / "vmdemo.yaml"
INSTALL = ("apt-get install vagrant vagrant-libvirt libvirt-daemon-system qemu-system-x86 qemu-utils "
           "debootstrap  (setup.sh does it)")


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


def test_vagrantfile_reads_everything_the_backend_writes():
    text = vg.vagrantfile_source().read_text()
    for key in ("box", "domain_prefix", "driver", "tb_cache_mib", "management", "vpc", "nodes", "nics", "mac",
                "memory", "cpus", "kernel", "initrd", "cmdline", "serial_dir"):
        assert f'"{key}"' in text or f"'{key}'" in text, key
    assert 'management_network_mode = "none"' in text and "veryisolated" in text  # nothing forwarded
    assert ":virtualbox" in text


def test_box_recipe_key_is_stable_and_covers_bcc():
    assert box.BoxRecipe().key == box.BoxRecipe().key
    assert box.BoxRecipe(with_bcc=True).key != box.BoxRecipe().key
    assert "python3-bpfcc" in box.BoxRecipe(with_bcc=True).all_packages
    assert box.box_for().name.startswith(box.BOX_PREFIX)


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
    tar_path = vg.build_payload(spec, tmp_path / "payload")
    names = set(tarfile.open(tar_path).getnames())
    assert "./lib/labkit/agent.py" in names and "./lib/pyroute2/__init__.py" in names
    assert "./spec.yaml" in names and any(n.startswith("./cache/bin/lkserver-") for n in names)
    assert not any("__pycache__" in n and not n.endswith(".pyc") and n.endswith(".py") for n in names)


def test_mgmt_subnet_avoids_host_routes():
    net = vg.pick_mgmt_subnet("vmdemo")
    assert net.prefixlen == 24 and str(net).startswith("192.168.")


# ------------------------------------------------------------------ real VMs

def _vm_tools_missing() -> list[str]:
    need = {"vagrant": "vagrant", "qemu-system-x86_64": "qemu-system-x86", "libvirtd": "libvirt-daemon-system",
            "debootstrap": "debootstrap", "qemu-img": "qemu-utils"}
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [pkg for tool, pkg in need.items() if shutil.which(tool, path=path) is None]


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (VMs, libvirt, namespaces; CI runs as root)"
    missing = _vm_tools_missing()
    if missing:
        msg = f"VM tools missing ({', '.join(missing)}); install with: {INSTALL}"
        print(msg)
        return msg
    return None


vm = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def _host_leftovers(lab: str) -> dict:
    """Everything a vagrant lab could leave on the host, found by its names."""
    names = vg.VmNames(lab)
    out = {"netns": [n for n in os.listdir("/run/netns") if n.startswith(f"lk-{lab}.")]
           if os.path.isdir("/run/netns") else []}
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    out["links"] = [x for x in (names.mgmt_bridge, names.vpc_bridge, names.router_veth) if f" {x}:" in links
                    or f" {x}@" in links]
    if vg.LIBVIRT_SOCK.exists():
        out["domains"] = [d for d in vg.virsh("list", "--all", "--name", check=False).stdout.split()
                          if d.startswith(names.domain_prefix)]
        out["networks"] = [n for n in vg.virsh("net-list", "--all", "--name", check=False).stdout.split()
                           if n.startswith(names.prefix + ".")]
        out["volumes"] = [v for v in vg.virsh("vol-list", "default", check=False).stdout.split()
                          if v.startswith(names.domain_prefix)]
    out["state"] = [str(p) for p in [vg.LabState(lab).dir] if p.exists()]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    out["ssh"] = [ln for ln in ps.splitlines() if f"/run/labkit/{lab}/vagrant" in ln]
    return {k: v for k, v in out.items() if v}


@pytest.fixture(scope="module")
def vmdemo():
    """The issue's acceptance lab, up once for the module's VM tests; always torn down."""
    from labkit import lab as labmod

    spec = load_spec({**load_spec(VMDEMO).to_dict(), "name": "tvmdemo"})  # never a user's own vmdemo
    daemons_before = vg._load_daemons()["started"] if vg.DAEMONS_FILE.exists() else {}
    libvirt_running = vg.LIBVIRT_SOCK.exists()
    labmod.down(spec.name) if vg.LabState(spec.name).exists else None
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
        assert not vg.LIBVIRT_SOCK.exists(), "libvirtd started by labkit is still running"
        for tool in ("iptables", "ip6tables"):
            rules = subprocess.run([tool, "-S"], capture_output=True, text=True).stdout
            assert "LIBVIRT_" not in rules, f"{tool} keeps libvirt's chains"


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.slow
@vm
def test_box_builds_offline_and_doctor_reports_it():
    t0 = time.monotonic()
    built = box.build(log=print)
    print(f"box ready in {time.monotonic() - t0:.0f} s ({built.name})")
    assert built.ready() and built.kernel.exists()
    status, detail, _ = box.doctor_row()
    assert status == "ok" and built.name in detail


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.slow
@vm
def test_vmdemo_check_passes_across_vms(vmdemo):
    print(f"{vmdemo.name} up in {vmdemo.up_seconds:.0f} s")
    meta = vg.LabState(vmdemo.name).meta()
    assert set(meta["kernels"]) == {"node1", "node2"}
    assert all(k != os.uname().release for k in meta["kernels"].values()), "pods must run on the VMs' kernel"
    results = vmdemo.check()
    failed = [r for r in results if not r.ok]
    assert not failed, failed
    kinds = {r.kind for r in results}
    assert {"pod", "service"} <= kinds
    # the IPVLAN pod on node1 answered a pod on node2, and the service reached all three backends
    assert any(r.src == "web-1" and r.dst == "web-0" and r.ok for r in results if r.kind == "pod")
    seen = {r.observed for r in results if r.kind == "service"}
    assert seen == {"web-0", "web-1", "web-2"}


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.slow
@vm
def test_vmdemo_exec_and_ipvs_inside_the_vm(vmdemo):
    out = vmdemo.exec("web-0", ["ip", "-d", "-o", "link", "show", "eth0"]).stdout
    assert "ipvlan" in out
    ctx = vmdemo.backend.node_context(vmdemo.spec, "node1")
    table = ctx.run(["ipvsadm", "-Ln"]).stdout
    svc = next(iter(vmdemo.services()))
    assert f"{svc.cluster_ip}:{svc.port}" in table and table.count("Masq") == 3
    proc = subprocess.run([str(ROOT / ".venv/bin/labkit"), "exec", vmdemo.name, "cli-0", "--", "uname", "-r"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == vg.LabState(vmdemo.name).meta()["kernels"]["node1"]


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.slow
@vm
def test_ebpf_service_inside_a_vm():
    if not os.environ.get("LABKIT_VM_BCC"):
        pytest.skip("the default box has no bcc (LLVM + headers double its size and build time); "
                    "LABKIT_VM_BCC=1 builds the --with-bcc box and runs this test")
    from labkit import lab as labmod

    bcc_box = box.BoxRecipe(with_bcc=True)
    box.build(bcc_box, log=print)
    spec = load_spec({**json.loads(json.dumps(load_spec(VMDEMO).to_dict())), "name": "vmebpf", "datapath": "ebpf"})
    try:
        lb = labmod.up(spec, progress=False)
        failed = [r for r in lb.check() if not r.ok]
        assert not failed, failed
    finally:
        labmod.down(spec.name)
    assert not _host_leftovers(spec.name)
