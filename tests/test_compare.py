"""``labkit compare``: runs from different machines side by side, ratios to a baseline run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import compare as cmpmod
from labkit import reference
from labkit.errors import UsageError
from labkit.results import Run

LABKIT = str(Path(sys.executable).parent / "labkit")


def _run(root: Path, experiment: str, values: dict, hostname: str) -> Run:
    """A run with known points: values[(datapath, services)] -> p50 per repeat."""
    run = Run.create(experiment, {"backend": "netns"}, root=root)
    m = run.manifest()
    m["machine"]["hostname"] = hostname
    run.write_manifest(m)
    for (dp, n), p50s in values.items():
        for rep, p50 in enumerate(p50s, 1):
            run.append({"run_id": run.run_id, "experiment": experiment, "datapath": dp, "mode": "veth",
                        "services": n, "position": "last", "repeat": rep, "metric": "crr", "p50_us": p50})
    run.finish()
    return run


def test_ratios_are_medians_over_repeats_divided_by_the_baseline(tmp_path):
    a = _run(tmp_path, "service-scale", {("ebpf", 1): [100, 110, 90], ("iptables-nft", 1): [120, 121, 119],
                                         ("ebpf", 1000): [100, 100, 100]}, "host-a")
    b = _run(tmp_path, "service-scale", {("ebpf", 1): [50, 55, 45], ("iptables-nft", 1): [30, 30, 31],
                                         ("nftables", 1): [10, 10, 10]}, "host-b")
    cmp = cmpmod.compare([str(a.path), str(b.path)])
    assert cmp.baseline == a.run_id
    t = cmp.table.set_index(["datapath", "services"])
    assert sorted(t.index) == [("ebpf", 1), ("iptables-nft", 1)]  # only what both measured
    assert t.loc[("ebpf", 1), f"{b.run_id} / baseline"] == pytest.approx(0.5)
    assert t.loc[("iptables-nft", 1), f"{b.run_id} / baseline"] == pytest.approx(30 / 120)
    s = cmpmod.summary(cmp)
    assert len(s) == 1 and s["points"].iloc[0] == 2
    assert s["median ratio"].iloc[0] == pytest.approx((0.5 + 0.25) / 2)
    assert set(cmp.facts["host"]) == {"host-a", "host-b"}
    fig = cmpmod.figure(cmp, "crr")
    assert [len(tr.x) for tr in fig.data] == [2, 2]
    # the other way round
    back = cmpmod.compare([str(a.path), str(b.path)], baseline=str(b.path))
    assert back.table.set_index(["datapath", "services"]).loc[("ebpf", 1), f"{a.run_id} / baseline"] == pytest.approx(2)


def test_bad_comparisons_are_refused(tmp_path):
    a = _run(tmp_path, "service-scale", {("ebpf", 1): [1]}, "a")
    p = _run(tmp_path, "policy-scale", {("ebpf", 1): [1]}, "b")
    with pytest.raises(UsageError, match="at least two runs"):
        cmpmod.compare([str(a.path)])
    with pytest.raises(UsageError, match="of one experiment"):
        cmpmod.compare([str(a.path), str(p.path)])
    with pytest.raises(UsageError, match="named twice"):
        cmpmod.compare([str(a.path), str(a.path)])


def test_cli_compares_the_shipped_netns_and_vm_pod_modes_runs(tmp_path):
    """The two shipped pod-modes runs (this host's namespaces, and Debian's kernel in VMs under TCG):
    the CLI lines up the modes both measured and says where each ran."""
    html = tmp_path / "cmp.html"
    res = subprocess.run([LABKIT, "compare", "reference:pod-modes", "reference:pod-modes-vm", "--html", str(html)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    idx = reference.index()
    assert f"{idx['pod-modes']}  (baseline)" in res.stdout and "vagrant" in res.stdout
    assert "rr (latency_us)" in res.stdout
    out = json.loads(subprocess.run([LABKIT, "compare", "reference:pod-modes", "reference:pod-modes-vm", "--json"],
                                    capture_output=True, text=True, timeout=120).stdout)
    shared_modes = {p["mode"] for p in out["points"]}
    assert {"eni-exclusive", "veth", "overlay"} <= shared_modes
    ratios = [p[f"{idx['pod-modes-vm']} / baseline"] for p in out["points"] if p["metric"] == "rr"]
    assert ratios and all(r > 1 for r in ratios)  # TCG VMs answer slower than this host's namespaces
    assert "labkit compare" in html.read_text()
    bad = subprocess.run([LABKIT, "compare", "reference:pod-modes", "reference:service-scale"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "of one experiment" in bad.stderr
