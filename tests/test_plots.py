"""Figures from a synthetic results store (no root, no kernel objects): the expected traces, axes,
normalisation of the published figures, CDFs from raw files, the topology of a spec, PNG/SVG export,
the sweep grid and the widget form. Kernel-side runs are in test_notebooks.py."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from labkit import anchors, plots, report, sweep
from labkit.results import Run
from labkit.spec import load_spec


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results"


def _latency_row(run, dp, n, pos, rep, p50, rng):
    key = f"datapath={dp}-services={n}-position={pos}-repeat={rep}-metric=crr"
    raw = run.raw_path(key)
    rng.normal(p50 * 1000, p50 * 50, 200).astype("<i8").tofile(raw)
    run.append({"experiment": "service-scale", "datapath": dp, "mode": "veth", "services": n, "position": pos,
                "repeat": rep, "metric": "crr", "p50_us": p50, "p99_us": p50 * 2, "samples": 200, "errors": 0,
                "raw": raw.name})


@pytest.fixture
def scale_run(store):
    """iptables-nft slows with N at the last position, ebpf stays flat; 2 repeats; load and update."""
    rng = np.random.default_rng(1)
    run = Run.create("service-scale", {"datapaths": ["iptables-nft", "ebpf"], "services": [1, 1000, 5000]})
    for n in (1, 1000, 5000):
        for dp in ("iptables-nft", "ebpf"):
            run.append({"experiment": "service-scale", "datapath": dp, "mode": "veth", "services": n, "position": "",
                        "repeat": 0, "metric": "load", "value": 0.001 * n if dp != "ebpf" else 1e-5 * n, "unit": "s"})
            for rep in (1, 2):
                for pos in ("first", "middle", "last"):
                    slow = {"first": 0, "middle": 0.5, "last": 1}[pos] * n / 100 if dp == "iptables-nft" else 0
                    _latency_row(run, dp, n, pos, rep, 100 + slow + rep, rng)
                run.append({"experiment": "service-scale", "datapath": dp, "mode": "veth", "services": n,
                            "position": "", "repeat": rep, "metric": "update", "value": 0.01 * rep, "unit": "s"})
    run.finish()
    return run


@pytest.fixture
def modes_run(store):
    run = Run.create("pod-modes", {})
    for mode, base in (("eni-exclusive", 80), ("veth", 100), ("overlay", 120)):
        for where in ("same-node", "cross-node"):
            for rep in (1, 2):
                for metric in ("crr", "rr", "udp_rr"):
                    run.append({"experiment": "pod-modes", "datapath": "none", "mode": mode, "services": 0,
                                "position": where, "repeat": rep, "metric": metric, "p50_us": base + rep})
                run.append({"experiment": "pod-modes", "datapath": "none", "mode": mode, "services": 0,
                            "position": where, "repeat": rep, "metric": "bandwidth", "value": 10 - base / 20,
                            "unit": "Gbit/s"})
    run.finish()
    return run


def test_latency_vs_services_traces_and_axes(scale_run):
    fig = plots.latency_vs_services(scale_run.run_id, "crr", ["first", "middle", "last"], log_x=True)
    assert plots.trace_names(fig) == [f"{dp} · {p}" for dp in ("ebpf", "iptables-nft")
                                      for p in ("first", "middle", "last")]
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.title.text == "services"
    assert fig.layout.yaxis.title.text == "CRR p50 (µs)"
    last = next(t for t in fig.data if t.name == "iptables-nft · last")
    assert list(last.x) == [1, 1000, 5000]
    assert last.y[-1] == pytest.approx(100 + 50 + 1.5)  # median of the two repeats
    assert list(last.error_y.array) == pytest.approx([0.5, 0.5, 0.5])  # max - median
    p99 = plots.latency_vs_services(scale_run, "crr", "last", stat="p99_us")
    assert p99.layout.yaxis.title.text == "CRR p99 (µs)" and plots.trace_names(p99) == ["ebpf", "iptables-nft"]


def test_published_overlay_is_relative_and_named(scale_run):
    fig = plots.latency_vs_services(scale_run, "crr", "last", anchors=True)
    names = plots.trace_names(fig)
    published = [n for n in names if n.startswith(("Alibaba", "Cilium"))]
    assert "Alibaba 2020 nginx: kube-proxy iptables (1/rate rel. to 1 svc)" in published
    assert "Cilium 1.6 HTTP: eBPF (rel. to 1 service)" in published
    assert not any("[x = rules]" in n for n in published)  # the 50,000-rule points need the rules axis
    on_rules = [n for n in plots.trace_names(plots.latency_vs_services(scale_run, "crr", "last", anchors=True, x="table"))
                if n.startswith("Alibaba")]
    assert on_rules and all("[x = rules]" in n for n in on_rules)
    assert not any("IPVS" in n for n in names)  # ipvs was not measured
    assert "relative" in fig.layout.yaxis.title.text
    for t in fig.data:
        assert t.y[0] == pytest.approx(1.0)  # everything relative to its first point
        if t.name in published:
            assert "source: " in t.hovertemplate and t.line.dash == "dot"
    nginx = next(t for t in fig.data if t.name.startswith("Alibaba 2020 nginx: kube-proxy iptables"))
    assert nginx.y[-1] == pytest.approx(21.2e3 / 8.2e3)  # 1/rate, relative to 1 service


def test_anchor_normalisation():
    rel = anchors.relative(anchors.ALIBABA_NGINX, "eBPF")
    assert rel == {1: 1.0, 1000: pytest.approx(28.1 / 28.0), 5000: pytest.approx(28.1 / 28.0)}
    assert anchors.relative(anchors.CILIUM_HTTP, "kube-proxy iptables")[2768] == pytest.approx(575 / 290)
    assert anchors.relative(anchors.ALIBABA_BANDWIDTH, "Alibaba")["overlay"] == pytest.approx(28.5 / 29.6)
    t = anchors.table()
    assert {"anchor", "series", "x", "value", "unit", "source", "caveats"} <= set(t.columns)
    assert t.source.str.len().min() > 20 and (t.caveats.str.len() > 0).all()


def test_cdf_reads_raw_samples(scale_run):
    fig = plots.latency_cdf(scale_run, "crr", "last")
    assert plots.trace_names(fig) == ["iptables-nft · 1 svc", "iptables-nft · 5000 svc", "ebpf · 1 svc",
                                      "ebpf · 5000 svc"]
    t = fig.data[1]
    assert t.y[0] == 0 and t.y[-1] == 1 and np.all(np.diff(t.x) >= 0)
    assert np.median(t.x) == pytest.approx(151.5, rel=0.05)  # µs, from ns samples around 150-152 µs
    assert fig.layout.xaxis.type == "log" and "fraction" in fig.layout.yaxis.title.text


def test_cost_and_mode_bars(scale_run, modes_run):
    load = plots.cost_vs_services(scale_run, "load")
    assert plots.trace_names(load) == ["iptables-nft", "ebpf"] and load.layout.yaxis.type == "log"
    update = plots.cost_vs_services(scale_run, "update", anchors=True)
    assert plots.trace_names(update)[-1].startswith("Huawei 2017")
    bars = plots.mode_bars(modes_run, "rr")
    assert [t.type for t in bars.data] == ["bar", "bar"] and [t.name for t in bars.data] == ["cross-node", "same-node"]
    assert list(bars.layout.xaxis.categoryarray) == ["eni-exclusive", "veth", "overlay"]  # spec.MODES order
    assert bars.layout.yaxis.title.text == "RR p50 (µs)"
    rel = plots.mode_bars(modes_run, "rr", anchors=True)
    names = plots.trace_names(rel)
    assert "Alibaba 2020 TCP_RR (1/rate, rel. to exclusive ENI)" in names
    assert rel.data[0].y[0] == pytest.approx(1.0)
    assert "eni-ipvlan" in rel.layout.xaxis.categoryarray  # published only: still shown
    with pytest.raises(ValueError, match="baseline"):
        plots.mode_bars(modes_run, "rr", relative=True, baseline="macvlan")


def test_figures_and_report_from_the_store(scale_run, modes_run):
    figs = plots.figures(scale_run.run_id)
    assert set(figs) == {"crr-p50-vs-services", "crr-p99-vs-services", "crr-vs-published", "crr-cdf", "load-cost",
                         "update-cost"}
    html = report.write_report(scale_run).read_text()
    assert html.count("plotly.js") >= 1 and "Alibaba Cloud blog" in html and "crr-cdf" in html
    mfigs = plots.figures(modes_run)
    assert "modes-rr-vs-published" in mfigs and "modes-crr-vs-published" not in mfigs


def test_topology_of_a_spec():
    spec = load_spec("examples/demo.yaml")
    fig = plots.topology(spec)
    names = plots.trace_names(fig)
    assert {"VPC router", "node NIC / ENI", "eni-exclusive", "eni-policy-route", "veth", "overlay", "bridge"} <= set(names)
    assert "VXLAN (overlay pods)" not in names  # overlay pods on one node only
    pods = [p for t in fig.data if t.name in spec.modes() for p in t.text]
    assert sorted(pods) == sorted(p.name for _, p in spec.pods())
    assert len(fig.layout.shapes) == len(spec.nodes)
    web0 = next(t for t in fig.data if t.name == "eni-exclusive").hovertext[0]
    assert "10.10." in web0 and "eni1" in web0


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (setup.sh installs it)")
def test_export_png_svg(scale_run, tmp_path):
    figs = plots.figures(scale_run)
    paths = plots.export({k: figs[k] for k in ("crr-p50-vs-services", "crr-cdf")}, tmp_path / "img")
    assert sorted(p.name for p in paths) == ["crr-cdf.png", "crr-cdf.svg", "crr-p50-vs-services.png",
                                             "crr-p50-vs-services.svg"]
    png = (tmp_path / "img" / "crr-cdf.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (tmp_path / "img" / "crr-cdf.svg").read_text().lstrip().startswith("<svg")


def test_sweep_grid():
    grid = sweep.parse_assignments(["datapaths=[ebpf],[iptables-nft,ebpf]", "repeats=2,3", "log_x=true"])
    assert grid == {"datapaths": [["ebpf"], ["iptables-nft", "ebpf"]], "repeats": [2, 3], "log_x": [True]}
    combos = sweep.combinations(grid)
    assert len(combos) == 4 and combos[0] == {"datapaths": ["ebpf"], "repeats": 2, "log_x": True}
    assert sweep.split_values("a,'b,c',{x: 1, y: 2}") == ["a", "'b,c'", "{x: 1, y: 2}"]
    with pytest.raises(Exception, match="NAME=VALUE"):
        sweep.parse_assignments(["repeats"])


def test_panel_form_sets_parameters():
    from labkit import widgets
    from labkit.experiments.service_scale import ServiceScaleParams

    p = widgets.ServiceScalePanel(ServiceScaleParams(datapaths=["ebpf"], services=[1, 10], positions=["last"],
                                                     repeats=1, samples=100, warmup=10, updates=1))
    p.services.value = "1, 500,5_000"
    p.repeats.value = 2
    params = p.params()
    assert params.services == [1, 500, 5000] and params.repeats == 2 and params.datapaths == ["ebpf"]
    assert p.expected_points(params) == 3 * 1 * (1 + 1 + 2 * 1)
    p.services.value = "0"
    assert p.start() is None and "not started" in p.status_text  # validation, nothing runs
    live = p.live_figure(pd.DataFrame([{"datapath": "ebpf", "services": 1, "position": "last", "repeat": 1,
                                        "metric": "crr", "p50_us": 10.0, "p99_us": 20.0}]))
    assert plots.trace_names(live) == ["ebpf"]


def test_mode_bars_put_each_variant_after_its_mode(store):
    """<mode>+bpf-hr and <mode>+ebpf-tc follow their mode (in that order), the modes in the study's
    order, host-network first, whatever order the rows came in."""
    rows = [{"experiment": "pod-modes", "datapath": "ebpf-tc" if m.endswith("+ebpf-tc") else "none", "mode": m,
             "services": 0, "position": "cross-node", "repeat": 1, "metric": "rr", "p50_us": 10.0}
            for m in ("macvlan+ebpf-tc", "veth+ebpf-tc", "macvlan", "veth+bpf-hr", "veth", "host-network",
                      "eni-ipvlan+ebpf-tc", "eni-ipvlan")]
    fig = plots.mode_bars(pd.DataFrame(rows), "rr")
    assert list(fig.layout.xaxis.categoryarray) == ["host-network", "eni-ipvlan", "eni-ipvlan+ebpf-tc", "veth",
                                                    "veth+bpf-hr", "veth+ebpf-tc", "macvlan", "macvlan+ebpf-tc"]


def test_variant_bars_mark_published_host_routing_figures(store):
    """pod-modes' variants in the modes' order (host-network first, <mode>+bpf-hr after <mode>), drawn
    relative to veth, with the published host-routing and netkit figures as overlays naming their
    source: the redirect_peer commit's 118.5 -> 44.4 µs, Cilium's CNI benchmark (1/rate), ByteDance's
    +12 % connections per second (1/1.12 beside CRR)."""
    run = Run.create("pod-modes", {})
    for mode, base in (("veth+bpf-hr", 90), ("overlay", 130), ("veth", 100), ("host-network", 80)):
        for where in ("same-node", "cross-node"):
            for metric in ("crr", "rr"):
                run.append({"experiment": "pod-modes", "datapath": "none", "mode": mode, "services": 0,
                            "position": where, "repeat": 1, "metric": metric, "p50_us": base})
    run.finish()
    figs = plots.figures(run)
    assert {"modes-rr-vs-published-host-routing", "modes-crr-vs-published-host-routing"} <= set(figs)
    rr = figs["modes-rr-vs-published-host-routing"]
    assert list(rr.layout.xaxis.categoryarray) == ["host-network", "veth", "veth+bpf-hr", "overlay"]
    cross = next(t for t in rr.data if t.name == "cross-node")
    assert dict(zip(cross.x, cross.y)) == {"host-network": 0.8, "overlay": 1.3, "veth": 1.0, "veth+bpf-hr": 0.9}
    published = {t.name: dict(zip(t.x, t.y)) for t in rr.data if t.name.startswith("published: ")}
    peer = published["published: Linux 5.10 redirect_peer TCP_RR (as published, rel. to veth)"]
    assert peer["veth+bpf-hr"] == pytest.approx(44.4 / 118.5)
    cilium = published["published: Cilium CNI benchmark TCP_RR (1/rate, rel. to veth)"]
    assert cilium == {"veth": 1.0, "veth+bpf-hr": pytest.approx(34.0 / 45.3), "host-network": pytest.approx(34 / 47.9)}
    assert all("source: " in t.hovertemplate for t in rr.data if t.name.startswith("published: "))
    crr = figs["modes-crr-vs-published-host-routing"]
    netkit = next(t for t in crr.data if t.name.startswith("published: ByteDance netkit CPS"))
    assert dict(zip(netkit.x, netkit.y))["netkit"] == pytest.approx(1 / 1.12)
    assert "netkit" in crr.layout.xaxis.categoryarray  # a published point with no bar yet
