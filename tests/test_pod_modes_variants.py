"""pod-modes' ``<mode>+ebpf-tc`` variant: pods of a mode whose clients reach their servers through a
ClusterIP, load-balanced by the ``ebpf-tc`` datapath attached to those pods only (Terway's IPVLAN pods
with Cilium's tc programs), beside pods of other modes with no datapath in the same lab.

The parameter and table tests run anywhere; the lab tests need root, bcc and tc clsact, and take
seconds (a few hundred samples a point)."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from labkit import nsexec
from labkit.experiments import core, pod_modes
from labkit.spec import parse_spec

LABKIT = [sys.executable, "-m", "labkit.cli"]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results"


# ---------------------------------------------------------------- names, checks, the Service table

def test_variant_names_and_pods():
    """Every mode the ebpf-tc datapath serves has a ``+ebpf-tc`` variant; its pods are of the mode,
    named with a ``t``, in a lab whose own datapath stays ``none``."""
    names = pod_modes.variant_names()
    assert {m + pod_modes.EBPF_TC for m in pod_modes.ebpf_tc_modes()} <= set(names)
    assert {"veth", "macvlan", "eni-ipvlan", "eni-exclusive", "eni-policy-route"} <= set(pod_modes.ebpf_tc_modes())
    assert pod_modes.pod_mode("eni-ipvlan+ebpf-tc") == "eni-ipvlan" and pod_modes.pod_mode("veth+bpf-hr") == "veth"
    assert pod_modes.short("veth+ebpf-tc") == "vet" and pod_modes.short("veth+bpf-hr") == "veh"
    spec = pod_modes.lab_spec(["veth", "veth+ebpf-tc", "macvlan+ebpf-tc"], "x")
    assert spec["datapath"] == "none"
    pods = {p["name"]: p["mode"] for n in spec["nodes"] for p in n["pods"]}
    assert pods == {"c-ve": "veth", "s-ve": "veth", "c-vet": "veth", "s-vet": "veth", "c-mvt": "macvlan",
                    "s-mvt": "macvlan", "r-ve": "veth", "r-vet": "veth", "r-mvt": "macvlan"}
    # every mode with and without the variant in one lab: ENIs planned per pod mode, the spec validates
    everything = [*pod_modes.ebpf_tc_modes(), *(m + pod_modes.EBPF_TC for m in pod_modes.ebpf_tc_modes())]
    assert parse_spec(pod_modes.lab_spec(everything, "x")).datapath == "none"


def test_checks_refuse_what_ebpf_tc_cannot(monkeypatch):
    """The variant runs on the VMs too (Terway's IPVLAN with Cilium's programs: only there), and a
    mode the datapath does not serve is refused naming the field and the variants it takes."""
    assert pod_modes.PodModesParams(modes=["veth", "eni-ipvlan+ebpf-tc"], backend="vagrant").checks() == []
    assert "eni-ipvlan+ebpf-tc" in pod_modes.default_modes("vagrant")
    assert pod_modes.PodModesParams(modes=["veth", "veth+ebpf-tc", "macvlan+ebpf-tc"]).checks() == []
    monkeypatch.setattr(pod_modes, "ebpf_tc_modes", lambda: ["veth"])
    problems = pod_modes.PodModesParams(modes=["overlay+ebpf-tc"]).checks()
    assert problems == ["modes: overlay+ebpf-tc: the ebpf-tc datapath does not see overlay pods' ClusterIP traffic; "
                        "use one of veth+ebpf-tc"]


def test_service_table_one_service_per_server():
    """One Service (one ClusterIP, three ports) per server pod of the ``+ebpf-tc`` variants, its only
    endpoint that server; nothing for the other modes."""
    from labkit import addressing

    modes = ["veth", "veth+ebpf-tc", "macvlan+ebpf-tc"]
    spec = parse_spec(pod_modes.lab_spec(modes, "x"))
    plan = addressing.plan(spec)
    table = pod_modes.service_table(spec, plan, modes)
    by_server: dict[str, set] = {}
    for sp in table:
        (ep,) = sp.endpoints
        assert ep.pod == sp.name and ep.ip == str(plan.pods[sp.name].ip)
        assert ipaddress.IPv4Address(sp.cluster_ip) in ipaddress.IPv4Network(spec.service_cidr)
        by_server.setdefault(sp.name, set()).add((sp.cluster_ip, sp.protocol, sp.port, ep.port))
    assert set(by_server) == {"s-vet", "r-vet", "s-mvt", "r-mvt"}
    for ports in by_server.values():
        (vip,) = {p[0] for p in ports}
        assert {p[1:] for p in ports} == {("TCP", 80, 8080), ("UDP", 80, 8080), ("TCP", 5201, 5201)}
    assert len({min(p)[0] for p in by_server.values()}) == 4  # a ClusterIP each


# ---------------------------------------------------------------- end to end

def _connects(netns: str, host: str, port: int, timeout: float = 0.5) -> bool:
    def attempt() -> bool:
        with socket.socket() as s:
            s.settimeout(timeout)
            return s.connect_ex((host, port)) == 0

    return nsexec.in_netns(netns, attempt)


class _Probed(pod_modes.PodModes):
    """pod-modes that looks at its lab before measuring (while it is up)."""

    seen: dict = {}

    def measure(self, ctx):
        from labkit.state import LabState

        state = LabState(self.lab.name).dir.resolve()
        vip = {sp.name: sp.cluster_ip for sp in self.services}
        seen = type(self).seen
        # the ClusterIPs answer only where the programs are: the plain veth pod reaches no Service
        seen["plain"] = _connects(self.lab.pod_netns("c-ve"), vip["r-vet"], 80)
        seen["variant"] = {c: all(_connects(self.lab.pod_netns(c), vip[s], 80) for s in servers)
                           for c, servers in (("c-vet", ("r-vet", "s-vet")), ("c-mvt", ("r-mvt", "s-mvt")))}
        # everything the datapath pinned is in the lab's state folder (`labkit down` unmounts it there)
        seen["in_state"] = [str(dp.fs.root).startswith(str(state) + "/") and
                            str(dp.state_file).startswith(str(state) + "/") for dp in self.service_lbs.values()]
        seen["mounts"] = sorted(m for m, fs in _mounts() if fs == "bpf" and m.startswith(str(state)))
        super().measure(ctx)


def _mounts() -> list[tuple[str, str]]:
    from labkit.ebpf.loader import mountinfo

    return mountinfo()


@pytest.mark.needs("root", "bcc-compile", "tc-clsact", "macvlan")
def test_ebpf_tc_variants_through_the_service(store):
    """``veth+ebpf-tc`` and ``macvlan+ebpf-tc`` beside plain ``veth`` in one lab: every point measured
    (the ``mode`` column names the variant, its rows say ebpf-tc and how many service ports), through
    ClusterIPs that only the variants' pods reach (the plain pod times out), the tc programs on the
    variants' pods only (node-side lx- for veth, the pod's own interface for macvlan), their
    conntrack holding the Service flows; teardown leaves nothing."""
    modes = ["veth", "veth+ebpf-tc", "macvlan+ebpf-tc"]
    params = pod_modes.PodModesParams(modes=modes, metrics=["crr", "rr", "udp_rr"], repeats=1, samples=200,
                                      warmup=20)
    run = core.execute(_Probed(), params, progress=False)
    pts, m = run.points(), run.manifest()
    assert set(zip(pts["mode"], pts["position"], pts["metric"])) == {
        (v, w, metric) for v in modes for w in ("same-node", "cross-node") for metric in ("crr", "rr", "udp_rr")}
    assert (pts.errors == 0).all() and (pts.p50_us > 0).all() and (pts.p50_us < 5000).all(), pts
    lb = pts[pts["mode"].str.endswith("+ebpf-tc")]
    assert set(lb.datapath) == {"ebpf-tc"} and set(lb.services) == {12}
    assert set(pts[pts["mode"] == "veth"].datapath) == {"none"}
    seen = _Probed.seen
    assert seen["plain"] is False and seen["variant"] == {"c-vet": True, "c-mvt": True}, seen
    assert seen["in_state"] == [True, True] and len(seen["mounts"]) == 2, seen
    assert {n: sorted(v["pods"]) for n, v in m["ebpf_tc"].items()} == {
        "node1": ["c-mvt", "c-vet", "s-mvt", "s-vet"], "node2": ["r-mvt", "r-vet"]}
    # veth pods: two hooks on lx-<pod>; macvlan pods: two on their own interface
    assert m["ebpf_tc"]["node1"]["hooks"] == 8 and m["ebpf_tc"]["node2"]["hooks"] == 4
    assert m["ebpf_tc_flows"]["node1"] > 200, m["ebpf_tc_flows"]  # CRR: a flow per connection
    lab = m["labs"]["pod-modes"]
    assert not [n for n in os.listdir("/run/netns") if lab in n]
    assert not [mnt for mnt, _ in _mounts() if f"/{lab}/" in mnt]


@pytest.mark.needs("root", "bcc-compile", "tc-clsact")
def test_labkit_down_after_sigkill_removes_the_variants_datapath(store):
    """A run SIGKILLed while it measures leaves its lab with ebpf-tc attached (a bpffs mounted in the
    lab's state folder, pins, tc filters); ``labkit down`` of the lab removes all of it."""
    from labkit.state import LabState

    args = ["run", "pod-modes", "-q", "--no-report", "--modes", "veth+ebpf-tc", "--metrics", "rr",
            "--repeats", "50", "--samples", "5000", "--warmup", "10"]
    proc = subprocess.Popen(LABKIT + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "LABKIT_RESULTS": str(store)}, start_new_session=True)
    lab = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            manifests = list(store.glob("*/manifest.json")) if store.exists() else []
            if manifests:
                try:
                    m = json.loads(manifests[0].read_text())
                except ValueError:  # being rewritten
                    m = {}
                if m.get("ebpf_tc"):  # written once the datapath is attached
                    lab = m["labs"]["pod-modes"]
                    break
            time.sleep(0.05)
        assert lab, proc.stderr.read() if proc.poll() is not None else "the datapath was not attached in time"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    state = LabState(lab).dir.resolve()
    assert [mnt for mnt, fs in _mounts() if fs == "bpf" and mnt.startswith(str(state))]
    assert (state / "nodes" / "node1" / "ebpf-tc.json").exists()
    out = subprocess.run(LABKIT + ["down", lab], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert not [mnt for mnt, _ in _mounts() if mnt.startswith(str(state))]
    assert not state.exists() and not [n for n in os.listdir("/run/netns") if lab in n]


def test_a_node_s_datapath_for_some_of_its_pods(tmp_path, monkeypatch):
    """What the VMs' agents are sent (``options.pods``) narrows a node's datapath to those pods; a name
    that is no pod of the node, or pods that are not a list of names, are refused naming the node's
    pods (the agent trusts nothing it is sent)."""
    from labkit.errors import DatapathError
    from labkit.node import NodeRuntime

    monkeypatch.setenv("LABKIT_STATE_DIR", str(tmp_path))
    monkeypatch.setattr("labkit.state.STATE_ROOT", tmp_path)
    spec = parse_spec(pod_modes.lab_spec(["veth", "veth+ebpf-tc"], "x"))
    rt = NodeRuntime(spec, "node1")
    dp = rt.datapath("ebpf-tc", pods=["c-vet", "s-vet"])
    assert [p.pod for p in dp.ctx.pods] == ["c-vet", "s-vet"]
    assert [p.pod for p in rt.datapath("ebpf-tc").ctx.pods] == ["c-ve", "s-ve", "c-vet", "s-vet"]
    with pytest.raises(DatapathError, match=r"no pod r-vet on this node \(its pods: c-ve, s-ve, c-vet, s-vet\)"):
        rt.datapath("ebpf-tc", pods=["c-vet", "r-vet"])
    for bad in ("c-vet", [1], [["c-vet"]]):
        with pytest.raises(DatapathError, match="pods must be a list of pod names"):
            rt.datapath("ebpf-tc", pods=bad)
