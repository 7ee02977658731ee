"""The results store: one folder per run, a tidy table written point by point, raw samples, provenance.

``results/<run-id>/`` holds
- ``manifest.json``: what was run (experiment, every parameter), where (kernel, CPU model and count,
  tool versions, labkit version and git commit) and when (start, end, status);
- ``points.csv``: one row per measured point (:data:`COLUMNS`), appended and flushed to disk as each
  point finishes, so a crash loses at most the point being measured and ``--resume`` can skip what
  is there;
- ``raw/<point>.i64``: every kept sample of a latency point in nanoseconds (little-endian int64).

:func:`load` reads one or many runs into one pandas DataFrame; ``labkit results`` lists runs.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from . import __version__
from .errors import LabkitError, NoSuchRun

COLUMNS = ("run_id", "experiment", "datapath", "mode", "services", "position", "service_index", "repeat",
           "metric", "p50_us", "p90_us", "p99_us", "p999_us", "mean_us", "min_us", "max_us", "samples",
           "errors", "value", "unit", "raw", "time",
           # rates under load (crr-rate, …; wrk's): transactions/s, CPU µs per transaction, at how many at once
           "rate_per_s", "cpu_us_per_txn", "concurrency",
           # what a new connection walks: rules of KUBE-SERVICES before its match (iptables), rules of the
           # nat table, elements of the nftables service map, entries of the eBPF service maps
           "rules_walked", "nat_rules", "set_elements", "map_entries")
LATENCY_METRICS = ("crr", "rr", "udp_rr")


def results_root() -> Path:
    return Path(os.environ.get("LABKIT_RESULTS", "results"))


def new_run_id(experiment: str) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{experiment}-{secrets.token_hex(2)}"


class Run:
    """One run's folder. Create with :meth:`create`, reopen with :meth:`open` (to resume or read)."""

    def __init__(self, path: Path):
        self.path = path
        self.run_id = path.name

    @classmethod
    def create(cls, experiment: str, params: dict[str, Any], root: Path | None = None) -> Run:
        root = root or results_root()
        run = cls(root / new_run_id(experiment))
        (run.path / "raw").mkdir(parents=True)
        run.write_manifest({"run_id": run.run_id, "experiment": experiment, "params": params,
                            "status": "running", "started": _now(), "ended": None,
                            "machine": machine_info(), "labkit": {"version": __version__, "git": git_commit()}})
        with open(run.points_path, "w", newline="") as f:
            csv.writer(f).writerow(COLUMNS)
        return run

    @classmethod
    def open(cls, run_id: str, root: Path | None = None, experiment: str | None = None) -> Run:
        """A run by id (or a unique part of one) in the store, else among the shipped reference runs;
        ``reference`` (with ``experiment``) or ``reference:KEY`` is the shipped reference run itself
        (:mod:`labkit.reference`)."""
        from . import reference

        if run_id == "reference" or run_id.startswith("reference:"):
            return cls(reference.resolve(run_id, experiment))
        root = root or results_root()
        if not (root / run_id / "manifest.json").exists() and (reference.FOLDER / run_id / "manifest.json").exists():
            return cls(reference.FOLDER / run_id)
        path = Path(run_id) if Path(run_id).is_dir() else root / run_id
        if not (path / "manifest.json").exists():
            matches = [p for p in root.glob(f"*{run_id}*") if (p / "manifest.json").exists()] if root.exists() else []
            if len(matches) != 1:
                known = ", ".join(sorted(p.name for p in matches)) or "see `labkit results`"
                raise NoSuchRun(f"no single run matches {run_id!r} under {root}/ ({known})")
            path = matches[0]
        return cls(path)

    def params_as(self, cls):
        """The run's parameters as ``cls`` (an experiment's Params dataclass; fields it does not know
        are left out): a notebook re-rendering a past run reads it with the run's own parameters."""
        import dataclasses

        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in self.manifest()["params"].items() if k in names})

    # ------------------------------------------------------------ manifest
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def points_path(self) -> Path:
        return self.path / "points.csv"

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text())

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=1, default=str))
        tmp.replace(self.manifest_path)

    def update_manifest(self, **values: Any) -> None:
        m = self.manifest()
        m.update(values)
        self.write_manifest(m)

    def finish(self, status: str = "complete") -> None:
        self.update_manifest(status=status, ended=_now())

    # ------------------------------------------------------------ points
    def raw_path(self, key: str) -> Path:
        return self.path / "raw" / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", key) + ".i64")

    def append(self, row: dict[str, Any]) -> None:
        """Write one point and push it to disk before returning. The columns are the file's own (a
        run made by an older labkit keeps its header when resumed)."""
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown result columns {sorted(unknown)}")
        columns = self._columns()
        lost = {k for k, v in row.items() if k not in columns and v not in (None, "")}
        if lost:
            raise LabkitError(f"run {self.run_id}'s points.csv has no column for {sorted(lost)} (made by an "
                              "older labkit: resume it with that version, or start a new run)")
        row = {"run_id": self.run_id, "time": _now(), **{k: v for k, v in row.items() if k in columns}}
        with open(self.points_path, "a", newline="") as f:
            csv.DictWriter(f, columns).writerow(row)
            f.flush()
            os.fsync(f.fileno())

    def _columns(self) -> list[str]:
        if not hasattr(self, "_header"):
            with open(self.points_path, newline="") as f:
                self._header = next(csv.reader(f), list(COLUMNS))
        return self._header

    def points(self) -> pd.DataFrame:
        """Every point, with every column of :data:`COLUMNS` (empty where an older run had none)."""
        try:
            df = pd.read_csv(self.points_path)
        except (FileNotFoundError, pd.errors.EmptyDataError):
            return pd.DataFrame(columns=COLUMNS)
        return df.reindex(columns=[*COLUMNS, *(c for c in df.columns if c not in COLUMNS)])


def load(runs: str | Iterable[str] | None = None, root: Path | None = None) -> pd.DataFrame:
    """Points of one run, several runs, or (``None``) every run, as one DataFrame."""
    root = root or results_root()
    if runs is None:
        ids = [r["run_id"] for r in list_runs(root)]
    elif isinstance(runs, str):
        ids = [runs]
    else:
        ids = list(runs)
    frames = [Run.open(i, root).points() for i in ids]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def list_runs(root: Path | None = None) -> list[dict[str, Any]]:
    root = root or results_root()
    out = []
    if not root.exists():
        return out
    for path in sorted(root.iterdir()):
        if not (path / "manifest.json").exists():
            continue
        m = Run(path).manifest()
        points = sum(1 for _ in open(path / "points.csv")) - 1 if (path / "points.csv").exists() else 0
        out.append({"run_id": m["run_id"], "experiment": m["experiment"], "status": m["status"],
                    "started": m["started"], "ended": m.get("ended"), "points": points})
    return out


# ---------------------------------------------------------------- provenance

def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _cmd(argv: list[str]) -> str | None:
    if not shutil.which(argv[0]):
        return None
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (p.stdout or p.stderr).strip().splitlines()
    return text[0] if text else None


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent.parent
    sha = _cmd(["git", "-C", str(here), "rev-parse", "HEAD"])
    if sha and _cmd(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"]):
        sha += "-dirty"
    return sha


def machine_info() -> dict[str, Any]:
    cpu = None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import bcc  # noqa: F401

        bcc_version = getattr(__import__("bcc.version", fromlist=["__version__"]), "__version__", "?")
    except Exception:
        bcc_version = None
    return {
        "kernel": platform.release(), "kernel_version": platform.version(), "machine": platform.machine(),
        "cpu_model": cpu, "cpu_count": os.cpu_count(), "cpus_allowed": sorted(os.sched_getaffinity(0)),
        "python": platform.python_version(), "hostname": platform.node(),
        "tools": {"iptables": _cmd(["iptables", "--version"]), "nft": _cmd(["nft", "--version"]),
                  "gcc": _cmd(["gcc", "--version"]), "iperf3": _cmd(["iperf3", "--version"]),
                  "ipvsadm": _cmd(["ipvsadm", "--version"]), "bcc": bcc_version},
    }
