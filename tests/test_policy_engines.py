"""NetworkPolicy engines on a real kernel: the C/Python struct contract of ``bpf/bpf_policy.c``, the
allow/deny matrix of a non-trivial policy set (every pod pair × port, real connections) identical
for both engines and equal to the model, partial updates on a live lab, bulk policies, and cleanup
that leaves nothing behind."""

from __future__ import annotations

import ctypes as ct
import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from labkit import lab as labmod
from labkit import nsexec
from labkit.policy import compile_table, expand, get
from labkit.policy import ebpf_structs as S
from labkit.spec import load_spec
from structs import assert_c_layouts, fields

BPF_DIR = Path(__file__).resolve().parents[1] / "bpf"
ENGINES = ("iptables", "ebpf")

MATRIX_SPEC = """
name: {name}
datapath: none
policy_engine: {engine}
nodes:
  - name: na
    enis: 1
    pods:
      - {{name: web, labels: {{app: web}}}}
      - {{name: db, mode: bridge, labels: {{app: db}}}}
      - {{name: mac, mode: macvlan, labels: {{app: mac}}}}
  - name: nb
    pods:
      - {{name: cli, labels: {{app: cli}}}}
      - {{name: ov, mode: overlay, labels: {{app: ov}}}}
      - {{name: free, labels: {{app: free}}}}
policies:
  - name: web-in
    pod_selector: {{app: web}}
    ingress:
      - from: [{{pod_selector: {{app: cli}}}}]
        ports: [{{protocol: TCP, port: 8080}}]
      - from: [{{ip_block: {{cidr: 10.244.0.0/16, except: [10.244.1.0/24]}}}}]
        ports: [{{protocol: TCP, port: 9090}}]
  - name: db-in
    pod_selector: {{app: db}}
    ingress:
      - from: [{{pod_selector: {{app: web}}}}, {{pod_selector: {{app: mac}}}}]
  - name: mac-lock
    pod_selector: {{app: mac}}
    policy_types: [Ingress, Egress]
    ingress:
      - from: [{{pod_selector: {{}}}}]
        ports: [{{protocol: UDP, port: 5353}}]
    egress:
      - to: [{{pod_selector: {{app: db}}}}]
  - name: ov-egress
    pod_selector: {{app: ov}}
    policy_types: [Egress]
    egress:
      - to: [{{ip_block: {{cidr: 0.0.0.0/0, except: [10.10.0.0/16]}}}}]
        ports: [{{protocol: TCP, port: 8080}}, {{protocol: UDP}}]
"""

SMALL_SPEC = """
name: {name}
datapath: none
policy_engine: {engine}
nodes:
  - name: n
    pods:
      - {{name: a, labels: {{app: a}}}}
      - {{name: b, labels: {{app: b}}}}
      - {{name: c, mode: bridge, labels: {{app: c}}}}
policies:
  - name: deny-b
    pod_selector: {{app: b}}
"""


# ---------------------------------------------------------------- struct contract

@pytest.mark.needs("gcc")
def test_c_layouts_match_as_gcc_sees_them(tmp_path):
    # only the declarations of lib/policy.h: its helpers need bcc's rewriter
    header = (BPF_DIR / "lib" / "policy.h").read_text().split("static __always_inline")[0] + "\n#endif\n"
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "policy.h").write_text(header.replace("LK_MAP(", "// LK_MAP("))
    shutil.copy(BPF_DIR / "lib" / "common.h", tmp_path / "lib" / "common.h")
    assert_c_layouts(S.C_STRUCTS, S.C_CONSTANTS, ["#define LK_MAP(...)", '#include "lib/policy.h"'], tmp_path,
                     tmp_path, werror=False)  # the cut header leaves unused declarations


@pytest.mark.needs("root")
def test_bcc_typed_views_of_every_policy_map_match():
    bcc = pytest.importorskip("bcc")
    from labkit.ebpf.loader import flatten_source

    types = {"hash": 1, "percpu_array": 6, "lru_hash": 9, "lpm_trie": 11}
    bpf = bcc.BPF(text=flatten_source(BPF_DIR / "bpf_policy.c").encode())
    try:
        for spec in S.MAPS:
            table = bpf[spec.name.encode()]
            assert table.ttype == types[spec.kind], spec.name
            assert table.max_entries == spec.max_entries, spec.name
            leaf = table.Leaf
            if spec.kind.startswith("percpu"):  # bcc's view: one value per possible CPU
                leaf = leaf._type_
            for ours, theirs in ((spec.key, table.Key), (spec.leaf, leaf)):
                assert ct.sizeof(theirs) == ct.sizeof(ours), spec.name
                if issubclass(ours, ct.Structure):
                    assert fields(theirs) == fields(ours), f"{spec.name}: {ours.__name__}"
    finally:
        bpf.cleanup()


# ---------------------------------------------------------------- the matrix

def _matrix(rows) -> dict[tuple, tuple[str, str]]:
    return {(r.src, r.dst, r.proto, r.port): (r.expected, r.observed) for r in rows if r.kind == "policy"}


@pytest.mark.needs("root")
@pytest.mark.timeout(240)
def test_matrix_is_the_models_and_identical_for_both_engines(make_lab, lab_name):
    seen = {}
    for engine in ENGINES:
        spec = load_spec(MATRIX_SPEC.format(name=f"{lab_name[:14]}{engine[0]}", engine=engine))
        lb = make_lab(spec)
        rows = lb.check(services=False)
        bad = [f"{r.src}->{r.dst} {r.proto}/{r.port}: expected {r.expected}, got {r.observed}" for r in rows if not r.ok]
        assert not bad, f"{engine}: " + "; ".join(bad)
        seen[engine] = _matrix(rows)
        labmod.down(spec.name)
    a, b = seen.values()
    assert a == b
    assert len(a) == 6 * 5 * 4  # pairs × (TCP 8080, TCP 9090, UDP 5353, UDP 8080)
    verdicts = [e for e, _ in a.values()]
    assert 30 < verdicts.count("deny") < 90  # non-trivial: both verdicts, plenty of each


# ---------------------------------------------------------------- updates on a live lab

def _engine(lb, node: str, engine: str):
    ctx = lb.backend.node_context(lb.spec, node, lb.plan)
    return get(engine)(ctx, lb.spec.datapath)


def _check_with(lb, policies_yaml: list[dict]):
    """labkit check of ``lb`` against a spec holding ``policies_yaml`` (what the engine now enforces)."""
    data = lb.spec.to_dict()
    data["policies"] = policies_yaml
    return labmod.Lab(load_spec(data)).check(services=False)


@pytest.mark.needs("root")
@pytest.mark.timeout(180)
@pytest.mark.parametrize("engine", ENGINES)
def test_partial_updates_and_bulk_policies(make_lab, lab_name, engine):
    spec = load_spec(SMALL_SPEC.format(name=f"{lab_name[:14]}{engine[0]}", engine=engine))
    lb = make_lab(spec)
    eng = _engine(lb, "n", engine)
    try:
        steps = [
            [{"name": "deny-b", "pod_selector": {"app": "b"}}],
            [{"name": "deny-b", "pod_selector": {"app": "b"}},
             {"name": "a-to-b", "pod_selector": {"app": "b"}, "ingress": [{"from": [{"pod_selector": {"app": "a"}}],
                                                                         "ports": [{"protocol": "TCP", "port": 8080}]}]}],
            [{"name": "c-out", "pod_selector": {"app": "c"}, "policy_types": ["Egress"],
              "egress": [{"to": [{"ip_block": {"cidr": "10.244.0.0/16", "except": ["10.244.0.2/32"]}}]}]}],
            [{"name": "bulk", "pod_selector": {"app": "b"}, "count": 1000, "rules": 2},
             {"name": "a-to-b", "pod_selector": {"app": "b"}, "ingress": [{"from": [{"pod_selector": {"app": "a"}}]}]}],
        ]
        for k, pols in enumerate(steps):
            data = lb.spec.to_dict()
            data["policies"] = pols
            desired = compile_table(load_spec(data), "n", lb.plan)
            res = eng.sync(desired)
            assert res.full == (k == 0)
            rows = _check_with(lb, pols)
            bad = [f"{r.src}->{r.dst} {r.proto}/{r.port}: expected {r.expected}, got {r.observed}" for r in rows
                   if not r.ok]
            assert not bad, f"step {k}: " + "; ".join(bad)
        assert res.policies == 1001 and res.rules == 2001
    finally:
        eng.cleanup()
    assert _leftovers(lb) == []
    eng.cleanup()  # twice is fine


def _leftovers(lb) -> list[str]:
    """Policy objects still in the lab's node and pod namespaces (iptables, ipsets, tc, pins)."""
    out = []
    for ns in nsexec.list_netns(f"lk-{lb.name}."):
        for tool in ("iptables-nft-save", "iptables-legacy-save"):
            text = nsexec.run([tool, "-t", "filter"], ns, check=False).stdout
            out += [f"{ns}: {line}" for line in text.splitlines() if "LKPOL" in line]
        out += [f"{ns}: ipset {n}" for n in nsexec.run(["ipset", "list", "-n"], ns).stdout.split() if "LKPOL" in n]
        tc = nsexec.run(["tc", "-s", "filter", "show", "dev", "lx-b", "ingress"], ns, check=False).stdout
        out += [f"{ns}: tc {line}" for line in tc.splitlines() if "lk_pol" in line]
    state = lb.backend.node_context(lb.spec, "n", lb.plan).state_dir
    out += [str(p) for p in state.rglob("*policy-ebpf*")] if state.exists() else []
    return out


@pytest.mark.needs("root")
@pytest.mark.timeout(120)
def test_unknown_engine_and_preflight():
    from labkit.errors import LabkitError

    with pytest.raises(LabkitError, match="unknown policy engine 'nft'; known: ebpf, iptables"):
        get("nft")
    for engine in ENGINES:
        get(engine).preflight("iptables-nft")
    assert os.geteuid() == 0
    pols = expand(load_spec(SMALL_SPEC.format(name="x", engine="ebpf")).policies)
    assert [p.name for p in pols] == ["deny-b"]
    assert dataclasses.is_dataclass(pols[0])


# ---------------------------------------------------------------- experiment and notebook

@pytest.mark.needs("root")
@pytest.mark.timeout(240)
def test_policy_scale_experiment_shape(tmp_path, monkeypatch):
    from labkit import plots
    from labkit.experiments import EXPERIMENTS, policy_scale

    monkeypatch.setenv("LABKIT_RESULTS", str(tmp_path))
    assert "policy-scale" in EXPERIMENTS
    params = policy_scale.PolicyScaleParams(services=[0, 50], metrics=["crr"], repeats=1, samples=200,
                                            warmup=20, updates=1)
    run = policy_scale.run(params, progress=False)
    pts = run.points()
    assert run.manifest()["status"] == "complete"
    for eng in ENGINES:
        mine = pts[pts.datapath == eng]
        assert set(mine[mine.metric == "crr"]["services"]) == {0, 50}
        assert (mine[mine.metric == "crr"]["errors"] == 0).all()
        assert len(mine[mine.metric == "load"]) == 2 and len(mine[mine.metric == "update"]) == 1
    fig = plots.policy_scale(run)
    assert {t.name for t in fig.data} >= {"iptables crr", "ebpf crr", "iptables load", "ebpf update"}
    assert not [n for n in nsexec.list_netns("lk-ps") if run.run_id[-4:] in n]  # labs gone


@pytest.mark.needs("root")
@pytest.mark.timeout(300)
def test_notebook_runs_with_papermill(tmp_path, monkeypatch, lab_name):
    pm = pytest.importorskip("papermill")
    monkeypatch.setenv("LABKIT_RESULTS", str(tmp_path / "results"))
    nb = Path(__file__).resolve().parents[1] / "notebooks" / "04-network-policy.ipynb"
    out = tmp_path / "out.ipynb"
    pm.execute_notebook(str(nb), str(out), parameters={"policies": [0, 20], "samples": 200, "warmup": 20,
                                                       "repeats": 1, "lab_name": lab_name, "solutions": True},
                        kernel_name="python3", progress_bar=False, cwd=str(nb.parent))
    text = out.read_text()
    assert "identical matrices for both engines: True" in text
    assert text.count("✓ exercise") == 3 and "self-checks: 3/3 right, 0 not answered" in text  # solutions filled in
    for engine in ENGINES:
        assert f"{engine}: 40/40 as the model expects" in text
