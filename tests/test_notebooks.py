"""Every notebook under papermill at small scale, `labkit sweep`, and the panel's Stop on a real run.

Notebooks are stored without outputs and with a cell tagged ``parameters``; each one is executed top
to bottom with small parameters and ``solutions=True`` (its solution cells fill in every exercise, so a
wrong solution fails) into a temporary results store, then its outputs are checked (every self-check
said ✓, the glued run id exists in the store, the plotly figures carry the expected traces and axes)
and no lab of it is left. ``04-network-policy`` is executed by tests/test_policy_engines.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from labkit import plots

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
PLOTLY = "application/vnd.plotly.v1+json"
SMALL_SCALE = {"datapaths": ["iptables-nft", "ebpf"], "services": [1, 500], "repeats": 2, "samples": 300,
               "warmup": 30, "progress": False}


def _datapaths(wanted):
    """The wanted datapaths that are registered here (others are being written concurrently)."""
    from labkit.datapath import DATAPATHS

    return [d for d in wanted if d in DATAPATHS] or ["ebpf"]


def _netns_of(lab: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    return [n for n in out if n.startswith(f"lk-{lab}.")]


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_is_stored_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "stored with outputs"
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
    assert nb.metadata.kernelspec.name == "python3"


def execute(name: str, tmp_path: Path, **parameters) -> nbformat.NotebookNode:
    import papermill as pm

    out = tmp_path / f"{name}.out.ipynb"
    t0 = time.monotonic()
    pm.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(out), cwd=str(NOTEBOOKS), progress_bar=False,
                        parameters={"results_dir": str(tmp_path / "results"), **parameters})
    print(f"{name}: {time.monotonic() - t0:.1f} s")
    return nbformat.read(out, as_version=4)


def figures(nb) -> list[dict]:
    return [o["data"][PLOTLY] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if PLOTLY in o.get("data", {})]


def names(fig: dict) -> list[str]:
    return [t.get("name") for t in fig["data"]]


def shown_offline(nb, html: Path, count: int) -> None:
    """The executed notebook as `jupyter nbconvert --to html` writes it, opened in headless Chromium
    offline and with JavaScript off: every figure is on the page as a decoded SVG of real size (each
    output keeps a static SVG beside plotly's interactive one, which needs plotly.js)."""
    from nbconvert import HTMLExporter
    from playwright.sync_api import sync_playwright

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if PLOTLY in o.get("data", {})]
    assert len(outputs) == count and all("image/svg+xml" in o["data"] for o in outputs)
    html.write_text(HTMLExporter().from_notebook_node(nb)[0])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_context(java_script_enabled=False, offline=True).new_page()
            page.goto(html.as_uri())
            charts = page.locator(".jp-RenderedSVG img")  # nbconvert's rendering of an image/svg+xml output
            boxes = [charts.nth(i).bounding_box() for i in range(charts.count())]
            # a decoded chart is laid out at its drawn size (a broken image would be its alt text's line)
            assert len(boxes) == count and all(b and b["width"] > 300 and b["height"] > 200 for b in boxes), boxes
        finally:
            browser.close()


def all_checks_right(nb, name: str) -> None:
    """Every exercise of notebook ``name`` was checked and found right (it ran with solutions=True)."""
    from labkit.notebooks import exercises

    n = len(exercises(nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)))
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert text.count("✓ exercise") == n and f"self-checks: {n}/{n} right, 0 not answered" in text, text[-2000:]


def glued_run(nb, tmp_path: Path):
    from labkit.results import Run
    from labkit.sweep import read_glue

    run_id = read_glue(nb)["run_id"]
    run = Run.open(run_id, tmp_path / "results")
    assert run.manifest()["status"] == "complete"
    return run


@pytest.mark.needs("root")
@pytest.mark.slow
def test_00_workshop(tmp_path, lab_name):
    dps = _datapaths(SMALL_SCALE["datapaths"])
    nb = execute("00-workshop", tmp_path, lab_name=lab_name, solutions=True,
                 **{**SMALL_SCALE, "datapaths": dps})
    all_checks_right(nb, "00-workshop")
    figs = figures(nb)
    assert figs[0]["layout"]["title"]["text"].startswith(f"lab {lab_name}")  # the topology
    assert any(n and n.startswith("Alibaba 2020 nginx") for n in names(figs[-1]))
    glued_run(nb, tmp_path)
    assert not _netns_of(lab_name)


@pytest.mark.needs("root")
@pytest.mark.parametrize("datapath", ["ebpf", "iptables-nft"])
def test_01_lab_tour(tmp_path, lab_name, datapath):
    datapath = _datapaths([datapath])[0]
    nb = execute("01-lab-tour", tmp_path, lab_name=lab_name, datapath=datapath, bulk_services=50, solutions=True)
    all_checks_right(nb, "01-lab-tour")
    text = "\n".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "node1: interfaces" in text and "lx-cli-0" in text and "all " in text
    html = "\n".join(o.get("data", {}).get("text/html", "") for c in nb.cells for o in c.get("outputs", []))
    if datapath.startswith("ebpf"):
        assert "lk_svc_v4" in html  # the pinned service map, with 51 entries
    else:
        assert "KUBE-SVC chains" in html
    topo = figures(nb)[0]
    assert {"VPC router", "eni-exclusive", "overlay", "bridge"} <= set(names(topo))
    assert "removed" in text and not _netns_of(lab_name)


@pytest.mark.needs("root")
@pytest.mark.slow
def test_02_pod_network_modes(tmp_path):
    nb = execute("02-pod-network-modes", tmp_path, modes=["eni-exclusive", "veth", "overlay"], repeats=1,
                 samples=200, warmup=20, progress=False, solutions=True)
    all_checks_right(nb, "02-pod-network-modes")
    run = glued_run(nb, tmp_path)
    figs = figures(nb)
    titles = [f["layout"]["title"]["text"] for f in figs]
    assert sum(t.endswith("by pod network mode (median of repeats; bars: min–max)") for t in titles) == 7
    published = [n for f in figs for n in names(f) if n and n.startswith("Alibaba 2020")]
    assert {"Alibaba 2020 TCP_RR (1/rate, rel. to exclusive ENI)",
            "Alibaba 2020 bandwidth (as published, rel. to exclusive ENI)"} <= set(published)
    # past the study: the host-routing and netkit figures, relative to veth, marked as published overlays
    overlays = {n for f in figs for n in names(f) if n and n.startswith("published: ")}
    assert {"published: Linux 5.10 redirect_peer TCP_RR (as published, rel. to veth)",
            "published: Cilium CNI benchmark TCP_RR (1/rate, rel. to veth)",
            "published: ByteDance netkit CPS (1/rate, rel. to veth)"} <= overlays, overlays
    assert set(run.points()["mode"]) == {"eni-exclusive", "veth", "overlay"}
    assert (run.path / "report.html").exists()


@pytest.mark.needs("root")
@pytest.mark.slow
def test_03_service_scale_and_sweep(tmp_path):
    dps = _datapaths(SMALL_SCALE["datapaths"])
    nb = execute("03-service-scale", tmp_path, **{**SMALL_SCALE, "datapaths": dps}, updates=1,
                 export_dir=str(tmp_path / "img"), rate_seconds=0.4, window_ms=100, concurrency=8, solutions=True)
    all_checks_right(nb, "03-service-scale")
    run = glued_run(nb, tmp_path)
    figs = figures(nb)
    assert len(figs) == 9
    p50, p99, rate, cpu, pub, rules, cdf, load, update = figs
    # requests/s beside latency, with the study's nginx series; CPU per transaction; the rules axis
    assert any(n.startswith("Alibaba 2020 nginx") for n in names(rate)) and set(dps) <= set(names(rate))
    assert cpu["layout"]["yaxis"]["title"]["text"].startswith("crr-rate CPU µs per transaction")
    assert any("[x = rules]" in n for n in names(rules)) and rules["layout"]["xaxis"]["type"] == "log"
    assert names(p50) == [f"{d} · {p}" for d in sorted(dps) for p in ("first", "middle", "last")]
    assert p50["layout"]["xaxis"]["title"]["text"] == "services"
    assert p50["layout"]["yaxis"]["title"]["text"] == "CRR p50 (µs)"
    assert p99["layout"]["yaxis"]["title"]["text"] == "CRR p99 (µs)"
    assert any(n.startswith("Cilium 1.6 HTTP") for n in names(pub)) and pub["layout"]["xaxis"]["type"] == "log"
    assert len(cdf["data"]) == 2 * len(dps) and cdf["layout"]["xaxis"]["type"] == "log"
    assert names(load) == names(update)[:len(dps)] and load["layout"]["yaxis"]["type"] == "log"
    assert len(list((tmp_path / "img" / run.run_id).glob("*.png"))) == len(plots.figures(run))  # every figure of the run
    shown_offline(nb, tmp_path / "03.html", len(figs))

    # the sweep: re-render that run twice (log-x off and on) -> two notebooks, index, metadata
    env = {**os.environ, "LABKIT_RESULTS": str(tmp_path / "results")}
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "labkit.cli", "sweep", str(NOTEBOOKS / "03-service-scale.ipynb"),
                           "-p", f"run_id={run.run_id}", "-p", "log_x=false,true", "-p", "show_panel=false",
                           "-o", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    index = json.loads((out / "sweep.json").read_text())
    assert [r["parameters"]["log_x"] for r in index] == [False, True]
    assert all(r["status"] == "complete" and r["run_ids"] == [run.run_id] for r in index)
    second = nbformat.read(index[1]["notebook"], as_version=4)
    assert second.metadata.papermill.parameters["log_x"] is True
    assert second.metadata.labkit["run_ids"] == [run.run_id]
    assert figures(second)[0]["layout"]["xaxis"]["type"] == "log"
    assert (out / "sweep.csv").read_text().count("\n") == 3


@pytest.mark.needs("root")
def test_panel_stop_leaves_no_lab(tmp_path, monkeypatch):
    """Run from the panel in its worker thread, press Stop: teardown runs, the run is kept as interrupted."""
    from labkit import widgets
    from labkit.experiments.service_scale import ServiceScaleParams

    monkeypatch.setenv("LABKIT_RESULTS", str(tmp_path / "results"))
    dps = _datapaths(["iptables-nft", "ebpf"])
    panel = widgets.ServiceScalePanel(ServiceScaleParams(datapaths=dps, services=[1, 200], positions=["first", "last"],
                                                         repeats=3, samples=200, warmup=20, updates=1))
    _ = panel.widget  # built as in a notebook
    panel.start()
    deadline = time.monotonic() + 120
    def plotted():  # a latency point at the position the live chart shows (load times come first)
        return any(r["metric"] == "crr" and r["position"] == panel.plot_position.value for r in panel.rows)

    while not plotted() and panel.running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert panel.rows, panel.status_text
    panel.stop()
    assert panel.wait(120)
    assert "stopped" in panel.status_text, panel.status_text
    assert panel.run.manifest()["status"] == "interrupted"
    assert 3 <= len(panel.run.points()) < panel.progress.max  # two loads, a latency point or two
    assert len(panel.figure.data) >= 1 and panel.run_button.disabled is False
    for lb in panel.run.manifest()["labs"].values():
        assert not _netns_of(lb), lb


def test_panel_leaves_its_last_chart_as_a_plain_output(tmp_path):
    """A panel's run, started and finished in a kernel: the plain output under the panel becomes the
    run's chart, interactive and as a static SVG, so the saved notebook shows it without widgets."""
    import nbclient
    from nbformat.v4 import new_code_cell, new_notebook

    dps = _datapaths(["ebpf"])
    nb = new_notebook(cells=[
        new_code_cell(f"import os\nos.environ['LABKIT_RESULTS'] = {str(tmp_path / 'results')!r}\n"
                      "from labkit import plots, widgets\n"
                      "from labkit.experiments.service_scale import ServiceScaleParams\n"
                      "plots.static_figures()\n"
                      f"p = widgets.ServiceScalePanel(ServiceScaleParams(datapaths={dps!r}, services=[1, 50], "
                      "positions=['last'], repeats=1, samples=100, warmup=10, updates=1))\np"),
        new_code_cell("p.start()\nassert p.wait(240)\nprint(p.status_text, getattr(p, 'picture_error', None))")],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    said = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert "<b>done</b>" in said, nb.cells[1].outputs
    pictures = [o for o in nb.cells[0].outputs
                if o.get("output_type") == "display_data" and PLOTLY in o.get("data", {})]
    assert len(pictures) == 1 and "image/svg+xml" in pictures[0]["data"]
    assert len(pictures[0]["data"][PLOTLY]["data"]) >= 1  # the run's traces, not an empty chart
