"""The shipped reference runs: full sweeps measured on labkit's own development machine, kept in
``notebooks/reference/`` so the notebooks and ``labkit report`` show real figures with no root, no
lab and no waiting (a classroom's participants, a reader of the docs, a machine without ipvlan).

Each is a run folder as the results store keeps it (``manifest.json`` with the machine it was
measured on, ``points.csv``, ``run.log``) with the raw samples only where a chart draws them (the
service-scale CDFs: the last Service at the fewest and the most Services); ``index.json`` names
which run is which. ``Run.open("reference", experiment=...)`` or ``Run.open("reference:pod-modes-vm")``
opens one; every chart labels them as this machine's, not the reader's.

``labkit reference --build`` measures them afresh (root; about 25 minutes here) and replaces them.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .errors import NoSuchRun, UsageError

FOLDER = Path(__file__).resolve().parent.parent / "notebooks" / "reference"
# key -> the `labkit run` arguments that measure it
RECIPES = {"service-scale": ["service-scale"],
           "policy-scale": ["policy-scale"],
           "pod-modes": ["pod-modes"],
           "pod-modes-vm": ["pod-modes", "--backend", "vagrant", "--quick"]}
CDF_POSITION = "last"


def index(folder: Path = FOLDER) -> dict[str, str]:
    """Reference key (experiment, or ``pod-modes-vm``) -> run id."""
    try:
        return json.loads((folder / "index.json").read_text())["runs"]
    except (OSError, ValueError, KeyError):
        return {}


def resolve(run_id: str, experiment: str | None = None, folder: Path = FOLDER) -> Path:
    """The folder of ``reference`` (with ``experiment``) or ``reference:KEY``."""
    key = run_id.partition(":")[2] or experiment
    runs = index(folder)
    if not key:
        raise NoSuchRun(f"{run_id!r}: which reference run? `reference:KEY` with KEY one of "
                        f"{', '.join(runs) or '(none)'}")
    if key not in runs:
        raise NoSuchRun(f"no reference run {key!r}; shipped: {', '.join(runs) or '(none)'} "
                        "(labkit reference lists them)")
    return folder / runs[key]


def is_reference(run) -> bool:
    """Whether ``run`` (a :class:`labkit.results.Run`) is one of the shipped reference runs."""
    return FOLDER.resolve() in run.path.resolve().parents


def caption(run) -> str | None:
    """One line saying where a shipped reference run was measured (None for the reader's own runs)."""
    if not is_reference(run):
        return None
    m = json.loads((run.path / "manifest.json").read_text())
    mach = m.get("machine", {})
    return (f"reference run {run.run_id}: measured {str(m.get('started', '?'))[:10]} on labkit's development machine "
            f"(kernel {mach.get('kernel')}, {mach.get('cpu_count')} x {mach.get('cpu_model')}), not on yours")


def node_kernels(manifest: dict) -> list[str]:
    """The kernels a run's nodes ran (VMs' own; a netns run records none, or nested per lab)."""
    found: set[str] = set()

    def walk(v) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, str):
            found.add(v)

    walk(manifest.get("node_kernels") or {})
    return sorted(found)


def listing(folder: Path = FOLDER) -> list[dict]:
    out = []
    for key, run_id in index(folder).items():
        m = json.loads((folder / run_id / "manifest.json").read_text())
        machine = m.get("machine", {})
        kernels = node_kernels(m) or [machine.get("kernel")]
        out.append({"key": key, "run_id": run_id, "experiment": m.get("experiment"), "measured": m.get("started"),
                    "status": m.get("status"), "kernel": ", ".join(map(str, kernels)), "cpu": machine.get("cpu_model"),
                    "cpus": machine.get("cpu_count"), "backend": m.get("params", {}).get("backend", "netns")})
    return out


def pack(source: Path, dest_folder: Path) -> Path:
    """Copy run ``source`` into ``dest_folder`` as a reference run: its manifest, points and log; raw
    samples only for the CDFs; no report (``labkit report`` draws it again)."""
    import pandas as pd

    target = dest_folder / source.name
    if target.exists():
        shutil.rmtree(target)
    (target / "raw").mkdir(parents=True)
    for name in ("manifest.json", "points.csv", "run.log"):
        if (source / name).exists():
            shutil.copy2(source / name, target / name)
    points = pd.read_csv(source / "points.csv")
    experiment = json.loads((source / "manifest.json").read_text()).get("experiment")
    if (experiment == "service-scale" and {"raw", "position", "services"} <= set(points.columns)
            and points["raw"].notna().any()):  # only service-scale's charts draw raw samples (its CDFs)
        rows = points[points["raw"].notna() & (points["position"] == CDF_POSITION)]
        if len(rows):
            keep = rows[rows["services"].isin([rows["services"].min(), rows["services"].max()])]
            for name in keep["raw"]:
                if (source / "raw" / name).exists():
                    shutil.copy2(source / "raw" / name, target / "raw" / name)
    return target


def build(keys: list[str] | None = None, folder: Path = FOLDER, say=print) -> dict[str, str]:
    """Measure the reference runs (``labkit run`` with each recipe) into a scratch store, then pack each
    into ``folder`` and point ``index.json`` at it. A run that fails leaves the shipped one in place."""
    import os
    import subprocess
    import sys
    import tempfile

    keys = keys or list(RECIPES)
    unknown = [k for k in keys if k not in RECIPES]
    if unknown:
        raise UsageError(f"unknown reference run {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    runs = index(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="labkit-reference-") as scratch:
        for key in keys:
            t0 = time.monotonic()
            say(f"reference {key}: labkit run {' '.join(RECIPES[key])}")
            before = set(os.listdir(scratch))
            proc = subprocess.run([sys.executable, "-m", "labkit.cli", "run", *RECIPES[key], "--quiet", "--no-report"],
                                  env={**os.environ, "LABKIT_RESULTS": scratch})
            made = sorted(set(os.listdir(scratch)) - before)
            if proc.returncode or not made:
                say(f"reference {key}: the run failed (exit {proc.returncode}); the shipped one stays")
                continue
            old = runs.get(key)
            runs[key] = pack(Path(scratch) / made[-1], folder).name
            if old and old != runs[key] and old not in runs.values():
                shutil.rmtree(folder / old, ignore_errors=True)
            _write_index(folder, runs)
            say(f"reference {key}: run {runs[key]} in {time.monotonic() - t0:.0f} s")
    return runs


def _write_index(folder: Path, runs: dict[str, str]) -> None:
    (folder / "index.json").write_text(json.dumps({"about": "labkit's reference runs, measured on its development "
                                                   "machine (see each manifest.json); `labkit reference` lists them",
                                                   "runs": runs}, indent=1) + "\n")


__all__ = ["FOLDER", "RECIPES", "build", "caption", "node_kernels", "index", "is_reference", "listing", "pack", "resolve"]
