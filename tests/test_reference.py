"""The shipped reference runs (``notebooks/reference``): complete, opened as ``reference``, rendered by
``labkit report`` and by the notebooks with no root, no daemon and no lab; and what notebooks record
is readable with scrapbook; the panel leaves its last chart as a plain output."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from labkit import nsexec, reference
from labkit.errors import NoSuchRun
from labkit.results import Run

NOBODY = 65534
BIN = Path(sys.executable).parent
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _nobody_home() -> Path:
    home = Path(tempfile.mkdtemp(prefix="lktest-ref-", dir="/var/tmp"))
    home.chmod(0o755)
    os.chown(home, NOBODY, NOBODY)
    return home


def _as_nobody(home: Path, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``argv`` as uid 65534 with no labkit daemon to turn to (only the shipped files and its own folder)."""
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "env", "-i",
                           f"HOME={home}", f"TMPDIR={home}", f"LABKIT_RESULTS={home}/results",
                           "LABKIT_SOCKET=/nonexistent/labkit.sock", f"PATH={BIN}:/usr/bin:/bin", *argv],
                          capture_output=True, text=True, timeout=timeout, cwd=str(NOTEBOOKS))


def test_every_reference_run_is_shipped_complete():
    idx = reference.index()
    assert set(idx) == set(reference.RECIPES)
    for key, run_id in idx.items():
        run = Run(reference.FOLDER / run_id)
        m = run.manifest()
        assert m["status"] == "complete" and m["experiment"] == reference.RECIPES[key][0], (key, m["status"])
        assert m["machine"]["kernel"] and m["machine"]["cpu_count"]
        points = run.points()
        assert len(points) >= 20 and not (run.path / "report.html").exists()
        assert (m["params"].get("backend", "netns") == "vagrant") == (key == "pod-modes-vm")
        folder = run.path / "raw"  # git keeps no empty folder
        raw = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
        if key == "service-scale":  # only what the CDFs draw: the last Service at the fewest and most
            last = points[(points["position"] == reference.CDF_POSITION) & points["raw"].notna()]
            want = last[last["services"].isin([last["services"].min(), last["services"].max()])]["raw"]
            assert raw == sorted(want) and len(raw) >= 10
        else:
            assert raw == []
    listing = reference.listing()
    assert {r["key"] for r in listing} == set(idx)


def test_reference_is_opened_by_name_and_reported_without_root():
    idx = reference.index()
    assert Run.open("reference", experiment="service-scale").path == reference.FOLDER / idx["service-scale"]
    assert Run.open("reference:pod-modes-vm").run_id == idx["pod-modes-vm"]
    assert Run.open(idx["policy-scale"], root=Path("/nonexistent")).run_id == idx["policy-scale"]  # by its id
    with pytest.raises(NoSuchRun, match="which reference run"):
        Run.open("reference")
    with pytest.raises(NoSuchRun, match="no reference run 'nope'"):
        Run.open("reference:nope")
    before = _digest(reference.FOLDER)
    home = _nobody_home()
    try:
        res = _as_nobody(home, str(BIN / "labkit"), "report", "reference:service-scale")
        assert res.returncode == 0, res.stderr
        assert "measured" in res.stdout and "not on yours" in res.stdout
        page = home / "results" / "reports" / idx["service-scale"] / "report.html"
        text = page.read_text()
        assert "A reference run shipped with labkit" in text and "crr-vs-published" in text
        res = _as_nobody(home, str(BIN / "labkit"), "report", "reference:policy-scale")
        assert res.returncode == 0, res.stderr
        text = (home / "results" / "reports" / idx["policy-scale"] / "report.html").read_text()
        assert "policy-crr-vs-policies" in text and "policies" in text and "-vs-services" not in text
        listed = _as_nobody(home, str(BIN / "labkit"), "reference", "--json")
        assert {r["key"] for r in json.loads(listed.stdout)} == set(idx)
    finally:
        subprocess.run(["rm", "-rf", str(home)])
    assert _digest(reference.FOLDER) == before  # the shipped folder is never written


@pytest.mark.parametrize("name, params", [
    ("02-pod-network-modes", {"run_id": "reference"}),
    ("03-service-scale", {"run_id": "reference"}),
    ("04-network-policy", {"run_id": "reference", "matrix": False}),
])
def test_notebooks_render_the_reference_run_without_root(name, params):
    """As uid 65534 with no daemon: the notebook draws the shipped run, says whose machine it was,
    every self-check right against it, nothing built; its run id is readable with scrapbook."""
    import scrapbook as sb
    from test_notebooks import all_checks_right

    netns = sorted(nsexec.list_netns("lk-"))
    home = _nobody_home()
    try:
        out = home / "out.ipynb"
        res = _as_nobody(home, str(BIN / "papermill"), "--no-progress-bar", "-y",
                         json.dumps({**params, "solutions": True, "results_dir": str(home / "results")}),
                         f"{name}.ipynb", str(out))
        assert res.returncode == 0, res.stderr[-3000:]
        import nbformat

        nb = nbformat.read(out, as_version=4)
        text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
        if name == "04-network-policy":  # exercise 1 reads the matrix labs, which a re-rendering does not build
            assert "✓ exercise 2" in text and "✓ exercise 3" in text and "self-checks: 2/2 right" in text, text
        else:
            all_checks_right(nb, name)
        assert "on labkit's development machine" in text and "not on yours" in text
        key = {"02-pod-network-modes": "pod-modes", "03-service-scale": "service-scale",
               "04-network-policy": "policy-scale"}[name]
        assert sb.read_notebook(str(out)).scraps["run_id"].data == reference.index()[key]
    finally:
        subprocess.run(["rm", "-rf", str(home)])
    assert sorted(nsexec.list_netns("lk-")) == netns


def test_pack_keeps_only_the_cdfs_raw_samples(tmp_path):
    src = tmp_path / "src" / "20990101-000000-service-scale-abcd"
    (src / "raw").mkdir(parents=True)
    rows = []
    for n in (1, 100, 1000):
        for pos in ("first", "last"):
            name = f"services={n}-position={pos}.i64"
            (src / "raw" / name).write_bytes(b"\0" * 8)
            rows.append({"services": n, "position": pos, "raw": name, "metric": "crr"})
    pd.DataFrame(rows).to_csv(src / "points.csv", index=False)
    (src / "manifest.json").write_text('{"experiment": "service-scale"}')
    (src / "report.html").write_text("big")
    out = reference.pack(src, tmp_path / "ref")
    assert sorted(p.name for p in (out / "raw").iterdir()) == ["services=1-position=last.i64",
                                                                "services=1000-position=last.i64"]
    assert not (out / "report.html").exists() and (out / "points.csv").exists()
