"""A real browser: JupyterLab runs 03-service-scale at small scale, the charts and the panel render,
and the panel's Run fills its live chart. Playwright drives Debian's Chromium (no browser download).

The test starts JupyterLab on 127.0.0.1 with a random token and its own config, settings and
runtime folders (windowing off, so every output is in the page; no news or update checks), and
kills it afterwards. Screenshots go to tests/artifacts/ (gitignored) for a person to look at.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.needs("root"), pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (setup.sh installs it)")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(folder: Path) -> None:
    """JupyterLab user settings: render every cell (no windowing), fetch nothing from outside."""
    for plugin, values in {"@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
                           "@jupyterlab/apputils-extension/notification": {"fetchNews": "false",
                                                                           "checkForUpdates": False}}.items():
        path = folder / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


@pytest.fixture
def jupyter(tmp_path):
    """JupyterLab serving tmp_path/work; yields (base url, token, work folder, results folder)."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from labkit.datapath import DATAPATHS

    work, results = tmp_path / "work", tmp_path / "results"
    work.mkdir()
    dps = [d for d in ("iptables-nft", "ebpf") if d in DATAPATHS]
    nb = load_notebook_node(str(ROOT / "notebooks" / "03-service-scale.ipynb"))  # papermill's view of it
    nb = parameterize_notebook(nb, {"results_dir": str(results), "datapaths": dps, "services": [1, 500],
                                    "positions": ["first", "middle", "last"], "repeats": 2, "samples": 300,
                                    "warmup": 30, "updates": 1, "progress": False})
    nbformat.write(nb, work / "03-service-scale.ipynb")
    _settings(tmp_path / "settings")
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"), "LABKIT_RESULTS": str(results)}
    log = open(tmp_path / "jupyter.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
                             f"--port={port}", f"--ServerApp.token={token}", f"--ServerApp.root_dir={work}"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (tmp_path / "jupyter.log").read_text()[-3000:])
                time.sleep(0.5)
        yield base, token, work, results
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started (own session)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _shot(locator, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    locator.scroll_into_view_if_needed()
    locator.screenshot(path=str(path))
    return path


def test_service_scale_notebook_in_jupyterlab(jupyter, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    base, token, work, results = jupyter
    t0 = time.monotonic()
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                    headless=True, args=FLAGS,
                                                    viewport={"width": 1400, "height": 1000})
        try:
            page = ctx.new_page()
            page.goto(f"{base}/lab/tree/03-service-scale.ipynb?token={token}")
            page.locator(".jp-Notebook").first.wait_for(timeout=90_000)
            # the kernel has started and connected (before that, Run All would be dropped)
            expect(page.get_by_text("Python 3 (ipykernel) | Idle")).to_be_visible(timeout=90_000)
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

            panel = page.locator(".labkit-panel")
            panel.wait_for(timeout=int(os.environ.get("LABKIT_BROWSER_TIMEOUT", "240")) * 1000)  # the last cell
            charts = page.locator(".jp-Notebook .js-plotly-plot")  # mime outputs and the panel's FigureWidget
            # nine figures (latency p50/p99, requests/s, CPU per request, published, rules axis, CDF, load,
            # update) and the panel's live chart
            expect(charts).to_have_count(10, timeout=60_000)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            assert "Traceback" not in " ".join(errors.all_inner_texts())
            first = charts.first
            expect(first.locator(".legendtext").first).to_be_visible()
            legend = first.locator(".legendtext").all_text_contents()
            assert any("ebpf" in t for t in legend), legend
            assert "services" in first.locator(".xtitle").text_content()
            _shot(first, "browser-service-scale-chart.png")
            published = charts.nth(4)
            assert any(t.startswith("Alibaba 2020") for t in published.locator(".legendtext").all_text_contents())
            _shot(published, "browser-service-scale-vs-published.png")

            # the panel: a form, Run/Stop, a progress bar, a chart; Run fills the chart live
            for label in ("datapaths", "services", "repeats", "samples"):
                expect(panel.get_by_text(label, exact=True).first).to_be_visible()
            _shot(panel, "browser-panel-before-run.png")
            panel.get_by_role("button", name="Run").click()
            expect(panel.get_by_text(re.compile(r"point \d+/\d+: .*metric crr")).first).to_be_visible(timeout=60_000)
            _shot(panel, "browser-panel-running.png")
            expect(panel.get_by_text("done", exact=False).first).to_be_visible(timeout=180_000)
            live = panel.locator(".js-plotly-plot")
            assert live.locator(".scatterlayer .trace").count() >= 1
            assert any("ebpf" in t for t in live.locator(".legendtext").all_text_contents())
            _shot(panel, "browser-panel-done.png")
            page.screenshot(path=str(ARTIFACTS / "browser-jupyterlab.png"))
        except Exception:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "browser-failure.png"))
            (ARTIFACTS / "browser-failure.html").write_text(page.content())
            raise
        finally:
            ctx.close()
    print(f"browser test: {time.monotonic() - t0:.0f} s in the browser")
    # the notebook's and the panel's runs are complete, and their labs are gone
    from labkit.results import list_runs

    runs = list_runs(results)
    assert len(runs) == 2 and all(r["status"] == "complete" for r in runs), runs
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for r in runs:
        labs = json.loads((results / r["run_id"] / "manifest.json").read_text()).get("labs", {})
        assert not [lb for lb in labs.values() if f"lk-{lb}." in names]
