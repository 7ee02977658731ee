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
    every = [point_key(r) for r in after.to_dict("records")]
    assert len(every) == len(set(every))  # the loads and updates the resumed run saw again are not recorded twice
    # what was there before the kill is kept as it was
    kept = before[before.metric == "crr"]
    assert kept.p50_us.tolist() == lat.head(len(kept)).p50_us.tolist()
    m = json.loads((points.parent / "manifest.json").read_text())
    assert m["status"] == "complete" and m["resumed"] == 1
    # and the experiment's labs are gone
    tag = run_id[-4:]
    assert not [n for n in os.listdir("/run/netns") if n.startswith(f"lk-ss{tag}-")]


def test_rates_the_rules_axis_and_the_seed_era_shape(store):
    """Each rate metric under load, CPU per transaction, the rules axis, kube-proxy 1.18's two rules
    per service and kube-proxy's own order, on the real kernel."""
    params = service_scale.ServiceScaleParams(
        datapaths=["iptables-nft", "ebpf"], services=[1, 2000], positions=["first", "last", "pod", "kube-proxy-order"],
        metrics=["crr-rate", "rr-rate", "udp-rr-rate"], repeats=1, rate_seconds=0.4, window_ms=200, concurrency=8,
        kube_proxy="1.18", updates=0)
    run = service_scale.run(params, progress=False)
    pts = run.points()
    rates = pts[pts.metric.str.endswith("-rate")]
    assert len(rates) == 2 * 2 * 4 * 3  # datapaths × N × positions × metrics
    assert (rates.rate_per_s > 100).all() and (rates.errors == 0).all() and (rates.concurrency == 8).all()
    assert (rates.cpu_us_per_txn > 0).all() and rates.p50_us.notna().all()
    # a rate's latency samples under load are kept, window after window
    for _, row in rates.iterrows():
        assert (run.path / "raw" / row.raw).stat().st_size >= 8 * 100
    crr = rates[rates.metric == "crr-rate"].set_index(["datapath", "services", "position"])
    ipt = crr.loc["iptables-nft"]
    # kube-proxy 1.18: two KUBE-SERVICES rules per service port (a new connection is checked against
    # its port's masquerade rule, then jumps); every service has an echo and a UDP port, written in
    # kube-proxy's (Go map) order: first/last are the first/last echo ports in the chain
    ports = 2 * 2000
    walked = {pos: ipt.loc[(2000, pos), "rules_walked"] for pos in ("first", "last", "kube-proxy-order")}
    assert all(w % 2 == 1 for w in walked.values()), walked
    assert walked["first"] <= 5 and walked["last"] >= 2 * ports - 3, walked
    assert walked["first"] <= walked["kube-proxy-order"] <= walked["last"], walked
    assert ipt.loc[(2000, "pod"), "rules_walked"] == 2 * ports + 1  # a pod address walks all of it
    assert ipt.loc[(2000, "last"), "nat_rules"] > 10 * 2000
    eb = crr.loc["ebpf"]
    assert (eb.loc[2000, "rules_walked"] == 0).all() and eb.loc[(2000, "last"), "map_entries"] == ports * (1 + 3)
    # the walk costs CPU that would have served connections: fewer per second, more CPU per connection
    # (a 4,000-rule walk here is ~70 µs on top of a ~140 µs connection)
    assert ipt.loc[(2000, "last"), "rate_per_s"] < 0.85 * ipt.loc[(1, "last"), "rate_per_s"]
    assert ipt.loc[(2000, "last"), "cpu_us_per_txn"] > 1.15 * ipt.loc[(1, "last"), "cpu_us_per_txn"]
    text = report.summary_text(run)
    assert "CRR-RATE transactions/s" in text and "CPU µs per transaction" in text
    from labkit import plots

    figs = plots.figures(run)
    assert {"crr-rate-vs-services", "crr-rate-vs-published", "crr-rate-cpu"} <= set(figs)
    assert any("Alibaba 2020 nginx" in n for n in plots.trace_names(figs["crr-rate-vs-published"]))


@pytest.mark.needs("root", "nginx", "wrk")
def test_http_workload_wrk_beside_labkits_rate(store):
    """--workload http: nginx in the backends, wrk's requests/s (a connection per request, and
    keep-alive) measured through the same tables as labkit's own rate."""
    params = service_scale.ServiceScaleParams(datapaths=["ebpf"], services=[1, 50], positions=["last"],
                                              metrics=["crr-rate"], workload="http", repeats=1, rate_seconds=1,
                                              window_ms=200, concurrency=4, updates=0)
    run = service_scale.run(params, progress=False)
    pts = run.points()
    wrk = pts[pts.metric.isin(["http-crr-rate", "http-rr-rate"])]
    assert len(wrk) == 2 * 2 and (wrk.rate_per_s > 100).all() and (wrk.errors == 0).all()
    keep = wrk[wrk.metric == "http-rr-rate"].rate_per_s.median()
    close = wrk[wrk.metric == "http-crr-rate"].rate_per_s.median()
    assert keep > close  # a connection per request costs more than a request on an open connection
    assert {p["name"] for p in run.manifest()["service_ports"]} == {"echo", "http"}


def test_pod_modes_rates(store):
    """pod-modes measures transactions/s under load per mode, same node and across nodes; an overlay
    pod pays for VXLAN on every packet, so it serves fewer RR transactions than a routed veth pod."""
    from labkit.experiments import pod_modes

    params = pod_modes.PodModesParams(modes=["veth", "overlay"], metrics=["rr-rate", "udp-rr-rate"], repeats=2,
                                      rate_seconds=0.6, window_ms=200, concurrency=8)
    run = pod_modes.run(params, progress=False)
    pts = run.points()
    assert len(pts) == 2 * 2 * 2 * 2 and (pts.rate_per_s > 100).all() and (pts.errors == 0).all()
    rr = pts[(pts.metric == "rr-rate") & (pts.position == "cross-node")].groupby("mode").rate_per_s.median()
    assert rr["overlay"] < rr["veth"], rr
    from labkit import plots

    assert "modes-rr-rate" in plots.figures(run)


@pytest.mark.needs("root", "bcc-compile", "tc-clsact")
def test_pod_modes_variants(store):
    """pod-modes' variants beside the modes: the host-network baseline (node namespace to node
    namespace, no pod) and veth with eBPF host routing synced for its pods only, in the same lab as
    veth with the node's kernel routing; every row names its variant, the bpf-hr pods' cross-node
    traffic went through bpf_redirect_peer/neigh (counters), and nothing is left."""
    from labkit.experiments import pod_modes

    params = pod_modes.PodModesParams(modes=["host-network", "veth", "veth+bpf-hr"], metrics=["rr", "rr-rate"],
                                      repeats=1, samples=200, warmup=20, rate_seconds=0.4, window_ms=200,
                                      concurrency=4)
    run = pod_modes.run(params, progress=False)
    pts, m = run.points(), run.manifest()
    assert set(zip(pts["mode"], pts["position"], pts["metric"])) == {
        (v, w, metric) for v in params.modes for w in ("same-node", "cross-node") for metric in ("rr", "rr-rate")}
    assert (pts.errors == 0).all(), pts
    rr = pts[pts.metric == "rr"].set_index(["mode", "position"]).p50_us
    # no pod in the way: the node-to-node baseline is the fastest path across nodes
    assert rr["host-network", "cross-node"] < rr["veth", "cross-node"], rr
    # only the bpf-hr variant's pods are host-routed: c- and s- on node1, r- on node2
    assert m["host_routing"] == {"node1": {"endpoints": 2, "skipped": {}}, "node2": {"endpoints": 1, "skipped": {}}}
    stats = m["host_routing_stats"]
    assert stats["node2"]["redirect_peer"] > 0 and stats["node1"]["redirect_neigh"] > 0, stats
    lab = m["labs"]["pod-modes"]
    assert not [n for n in os.listdir("/run/netns") if lab in n]
