"""Experiments end to end on the netns backend: the result's shape, resume after a kill, provenance.

Assertions are on the shape of the result (iptables slows with services, eBPF stays flat), never on
absolute microseconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from labkit import report, results
from labkit.experiments import service_scale
from labkit.experiments.core import point_key

pytestmark = pytest.mark.needs("root")
LABKIT = [sys.executable, "-m", "labkit.cli"]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results"


def test_service_scale_shape(store):
    params = service_scale.ServiceScaleParams(datapaths=["iptables-nft", "ebpf"], services=[1, 5000],
                                              positions=["last", "pod"], repeats=3, samples=1500, warmup=200,
                                              updates=1)
    run = service_scale.run(params, progress=False)
    # every N in a node of its own, all measured together (the host's speed drifts between minutes)
    assert run.manifest()["together"] is True
    pts = run.points()
    lat = pts[pts.metric == "crr"]
    assert (lat.errors == 0).all()
    assert len(lat) == 2 * 2 * 2 * 3  # datapaths × N × positions × repeats
    med = lat.groupby(["datapath", "services", "position"]).p50_us.median()
    # iptables walks KUBE-SERVICES on every new connection: the last of 5000 costs more
    assert med["iptables-nft", 5000, "last"] > 1.3 * med["iptables-nft", 1, "last"], med
    # eBPF is a hash lookup at connect(): flat
    assert med["ebpf", 5000, "last"] < 1.2 * med["ebpf", 1, "last"], med
    assert med["ebpf", 5000, "last"] < med["iptables-nft", 5000, "last"], med
    # every latency point keeps its raw samples
    for _, row in lat.iterrows():
        raw = run.path / "raw" / row.raw
        assert raw.stat().st_size == 8 * row.samples
    loads = pts[pts.metric == "load"]
    assert set(loads.datapath) == {"iptables-nft", "ebpf"} and (loads.value > 0).all()
    text = report.summary_text(run)
    assert "iptables-nft" in text and "relative to ebpf" in text
    html = report.write_report(run).read_text()
    assert "plotly" in html and "iptables-nft" in html


def test_manifest_has_provenance(store):
    params = service_scale.ServiceScaleParams(datapaths=["ebpf"], services=[10], positions=["last"], repeats=1,
                                              samples=100, warmup=10, updates=1)
    run = service_scale.run(params, progress=False)
    m = run.manifest()
    assert m["status"] == "complete" and m["started"] and m["ended"]
    assert m["params"]["services"] == [10] and m["params"]["datapaths"] == ["ebpf"]
    mach = m["machine"]
    assert mach["kernel"] == os.uname().release and mach["cpu_count"] == os.cpu_count() and mach["cpu_model"]
    assert mach["tools"]["nft"] and mach["tools"]["iptables"] and m["labkit"]["version"]
    assert m["labkit"]["git"] is None or len(m["labkit"]["git"]) >= 40
    listed = results.list_runs()
    assert [r["run_id"] for r in listed] == [run.run_id]
    assert set(results.load(run.run_id).columns) >= {"run_id", "experiment", "datapath", "mode", "services",
                                                    "position", "repeat", "metric", "p50_us", "p90_us",
                                                    "p99_us", "mean_us", "min_us", "max_us", "samples", "errors"}


def test_resume_after_kill(store):
    args = ["run", "service-scale", "-q", "--no-report", "--datapaths", "iptables-legacy,ebpf", "--services",
            "1,300", "--positions", "first,last", "--repeats", "3", "--samples", "400", "--warmup", "20"]
    proc = subprocess.Popen(LABKIT + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "LABKIT_RESULTS": str(store)})
    deadline = time.monotonic() + 120
    points = None
    while time.monotonic() < deadline and proc.poll() is None:
        runs = list(store.glob("*/points.csv")) if store.exists() else []
        if runs and sum(1 for _ in open(runs[0])) > 8:  # header, 2 loads, some latency points
            points = runs[0]
            break
        time.sleep(0.05)
    assert points is not None, proc.stderr.read() if proc.poll() is not None else "no points in time"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run_id = points.parent.name
    before = pd.read_csv(points)
    done = subprocess.run(LABKIT + ["run", "service-scale", "-q", "--no-report", "--resume", run_id],
                          capture_output=True, text=True, env={**os.environ, "LABKIT_RESULTS": str(store)})
    assert done.returncode == 0, done.stderr
    after = pd.read_csv(points)
    lat = after[after.metric == "crr"]
    keys = [point_key(r) for r in lat.to_dict("records")]
    assert len(keys) == len(set(keys)) == 2 * 2 * 2 * 3  # nothing measured twice, nothing missing
    # what was there before the kill is kept as it was
    kept = before[before.metric == "crr"]
    assert kept.p50_us.tolist() == lat.head(len(kept)).p50_us.tolist()
    m = json.loads((points.parent / "manifest.json").read_text())
    assert m["status"] == "complete" and m["resumed"] == 1
    # and the experiment's labs are gone
    tag = run_id[-4:]
    assert not [n for n in os.listdir("/run/netns") if n.startswith(f"lk-ss{tag}-")]
