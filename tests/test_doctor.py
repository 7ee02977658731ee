"""Tests of ``labkit doctor`` against the real kernel (root), checked by independent probes.

What the doctor says about ipvlan and ip_vs is compared with what iproute2/ipvsadm, run here by the
test itself, find in a namespace of the test's own (``lkdoc-t<pid>``): the test fails when the doctor
is wrong either way. The first tests need no root: the feature-name contract and require()'s error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import doctor, nsexec
from labkit.errors import MissingFeature

pytestmark = pytest.mark.timeout(120)

CONTRACT = {
    "root", "netns", "veth", "macvlan", "ipvlan", "netkit", "vxlan", "bridge", "br_netfilter", "ip_vs",
    "iptables-legacy", "iptables-nft", "nftables", "ipset", "bpf", "bpf-jit", "cgroup2", "btf", "bcc",
    "bcc-compile", "kernel-headers", "tc-clsact", "ipvsadm", "iperf3", "sockperf", "gcc", "nginx", "wrk", "vagrant",
    "vagrant-libvirt", "libvirtd", "qemu", "kvm", "box",
}
PROBE_LINKS = {"lkdoc-low0", "lkdoc-low1", "lkdoc-veth", "lkdoc-vethp", "lkdoc-macvlan",
               "lkdoc-ipvlan", "lkdoc-nk0", "lkdoc-nk1", "lkdoc-vxlan", "lkdoc-bridge"}


def test_feature_names_are_the_contract():
    assert set(doctor.FEATURES) == CONTRACT


def test_require_raises_missing_feature_with_the_fix(monkeypatch):
    fix = "kernel has no ipvlan: " + doctor.VM_BACKEND
    monkeypatch.setitem(doctor._CACHE, "ipvlan", doctor.Capability("ipvlan", "links", "missing", "x", fix))
    with pytest.raises(MissingFeature) as err:
        doctor.require("ipvlan", "pod mode eni-ipvlan")
    assert (err.value.feature, err.value.needed_by, err.value.fix) == ("ipvlan", "pod mode eni-ipvlan", fix)
    assert fix in str(err.value)


def test_require_passes_on_warn_and_rejects_unknown_names(monkeypatch):
    monkeypatch.setitem(doctor._CACHE, "bpf-jit", doctor.Capability("bpf-jit", "ebpf", "warn", "off", "sysctl"))
    assert doctor.require("bpf-jit", "datapath ebpf").status == "warn"
    with pytest.raises(ValueError, match="known: root"):
        doctor.require("ipvlan2", "x")


def test_require_probes_only_the_feature_asked(monkeypatch):
    monkeypatch.setattr(doctor, "_CACHE", {})
    doctor.has("gcc")
    assert list(doctor._CACHE) == ["gcc"]


# ------------------------------------------------------------------ real kernel, independent oracles

def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture(scope="module")
def oracle_netns():
    """A namespace of the test's own, made and torn down with iproute2 (not with labkit)."""
    name = f"lkdoc-t{os.getpid()}"
    _ip("netns", "del", name, check=False)
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "add", "lkdoc-t0", "type", "veth", "peer", "name", "lkdoc-t1")
        yield name
    finally:
        _ip("netns", "del", name, check=False)


@pytest.fixture(scope="module")
def results():
    return {c.name: c for c in doctor.run_checks()}


def kernel_has_ipvlan(ns: str) -> bool:
    return _ip("-n", ns, "link", "add", "link", "lkdoc-t0", "name", "lkdoc-t2", "type", "ipvlan",
               "mode", "l2", check=False).returncode == 0


def kernel_has_ip_vs(ns: str) -> bool:
    if subprocess.run(["ip", "netns", "exec", ns, "ipvsadm", "-Ln"], capture_output=True).returncode == 0:
        return True
    return subprocess.run(["ip", "netns", "exec", ns, "test", "-e", "/proc/net/ip_vs"]).returncode == 0


@pytest.mark.needs("root")
def test_core_link_types_ok(results):
    for name in ("root", "netns", "veth", "bridge", "vxlan"):
        assert results[name].status == "ok", results[name]


@pytest.mark.needs("root")
def test_ipvlan_row_matches_the_kernel(results, oracle_netns):
    row = results["ipvlan"]
    if kernel_has_ipvlan(oracle_netns):
        assert row.status == "ok", row
        doctor.require("ipvlan", "pod mode eni-ipvlan")
    else:
        assert row.status == "missing", row
        assert "VM backend" in row.fix and "no ipvlan" in row.fix
        with pytest.raises(MissingFeature, match="VM backend"):
            doctor.require("ipvlan", "pod mode eni-ipvlan")


def kernel_has_netkit() -> bool | None:
    """From the running kernel's own config (iproute2 here predates netkit): None if it has none."""
    import gzip

    try:
        text = gzip.open("/proc/config.gz", "rt").read()
    except OSError:
        return None
    return "CONFIG_NETKIT=y" in text


@pytest.mark.needs("root")
def test_netkit_row_matches_the_kernel(results):
    """The probe makes a netkit pair with labkit's own netlink attributes (pyroute2 has no netkit); the
    VM test builds netkit pods on Debian 13's kernel with the same attributes."""
    row, has = results["netkit"], kernel_has_netkit()
    if has is None:
        pytest.skip("no /proc/config.gz to compare with")
    if has:
        assert row.status == "ok", row
    else:
        assert row.status == "missing", row
        assert "no netkit" in row.fix and "release: trixie" in row.fix
        with pytest.raises(MissingFeature, match="trixie"):
            doctor.require("netkit", "pod mode netkit")


@pytest.mark.needs("root")
def test_ip_vs_row_matches_the_kernel(results, oracle_netns):
    row = results["ip_vs"]
    if kernel_has_ip_vs(oracle_netns):
        assert row.status == "ok", row
    else:
        assert row.status == "missing", row
        assert "VM backend" in row.fix and "no ip_vs" in row.fix
        with pytest.raises(MissingFeature, match="VM backend"):
            doctor.require("ip_vs", "datapath ipvs")


@pytest.mark.needs("root")
def test_probes_leave_nothing_behind(results):
    assert f"{doctor.PROBE_PREFIX}{os.getpid()}" not in nsexec.list_netns(doctor.PROBE_PREFIX)
    assert not PROBE_LINKS & set(os.listdir("/sys/class/net")), "a probe link landed in the host netns"


@pytest.mark.needs("root")
def test_table_and_summary(results, capsys):
    assert doctor.cli(argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert "CAPABILITY" in out and "netns backend: ready" in out
    for name, row in results.items():
        if row.status == "missing":
            assert f"fix: {row.fix}" in out and name in out.splitlines()[-1]


@pytest.mark.needs("root")
def test_cli_json_exit_code_and_cleanup():
    proc = subprocess.Popen([sys.executable, "-m", "labkit.doctor", "--json"], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    out, _ = proc.communicate(timeout=100)
    data = json.loads(out)
    assert proc.returncode == 0 and data["netns_backend_ready"] is True
    assert {c["name"] for c in data["capabilities"]} == CONTRACT
    assert all(c["status"] in ("ok", "missing", "warn") for c in data["capabilities"])
    assert f"{doctor.PROBE_PREFIX}{proc.pid}" not in nsexec.list_netns(doctor.PROBE_PREFIX)


@pytest.mark.needs("root")
def test_probe_namespaces_of_dead_processes_are_swept_and_live_ones_kept():
    """A doctor run SIGKILLed mid-probe leaves lkdoc-<pid>: the next probe, and `labkit down`, remove it;
    a live process's probe namespace is kept."""
    from labkit import nsexec

    dead = max(int(open("/proc/sys/kernel/pid_max").read()) - 7, 2)
    assert not os.path.exists(f"/proc/{dead}")
    nsexec.create_netns(f"lkdoc-{dead}")
    nsexec.create_netns("lkdoc-1")  # pid 1 lives
    try:
        assert doctor.sweep_probe_namespaces() == [f"lkdoc-{dead}"]
        left = nsexec.list_netns("lkdoc-")
        assert f"lkdoc-{dead}" not in left and "lkdoc-1" in left
        nsexec.create_netns(f"lkdoc-{dead}")
        res = subprocess.run([str(Path(sys.executable).parent / "labkit"), "down", "none-such", "--missing-ok"],
                             capture_output=True, text=True)
        assert res.returncode == 0 and f"lkdoc-{dead}" not in nsexec.list_netns("lkdoc-")
    finally:
        for n in (f"lkdoc-{dead}", "lkdoc-1"):
            nsexec.remove_netns(n)
