"""Batch: run a notebook over a grid of parameters with papermill, one output notebook per combination.

``labkit sweep notebooks/03-service-scale.ipynb -p datapaths='[ebpf]','[iptables-nft,ebpf]' -p repeats=2,3``
executes the notebook once per combination (the Cartesian product of every ``-p``), each with its
parameters injected by papermill after the cell tagged ``parameters``, and writes

- ``<out>/<stem>-<k>.ipynb``: the executed notebook, saved even when a cell fails (papermill saves
  before raising); papermill records the parameters in ``metadata.papermill.parameters``, and labkit
  adds ``metadata.labkit`` = the parameters, the values the notebook glued (:func:`glue`: its run ids)
  and the status;
- ``<out>/sweep.json`` and ``sweep.csv``: one row per combination (parameters, notebook, run ids,
  status, seconds) — the index from a sweep to the results store.

A value is YAML (``3``, ``true``, ``ebpf``, ``[1,500]``); commas inside brackets belong to the value.
Notebooks run with their own folder as working directory and ``results_dir`` set to the results
store (``LABKIT_RESULTS`` or ``./results``), so every run lands where ``labkit results`` looks.

:func:`glue` is the notebook side (scrapbook's idea, without the dependency): it displays a value
under a labkit MIME type, which :func:`read_glue` finds in an executed notebook.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import time
from pathlib import Path
from typing import Any

import yaml

from .errors import LabkitError, UsageError

GLUE_MIME = "application/vnd.labkit.glue+json"  # what labkit wrote before it wrote scrapbook's scraps
SCRAP_MIME_PREFIX = "application/scrapbook.scrap"


# ---------------------------------------------------------------- notebook side

def glue(name: str, value: Any) -> None:
    """Record ``value`` under ``name`` in the notebook's outputs, as scrapbook records it
    (``scrapbook.read_notebook(path).scraps[name].data`` reads it back; so does :func:`read_glue`), and
    show it as a line of text."""
    import scrapbook
    from IPython.display import display

    if value is None:  # scrapbook's schema has no null: labkit's own form (read_glue reads both)
        display({GLUE_MIME: {"name": name, "value": None}, "text/plain": f"glued {name} = None"}, raw=True)
        return
    # scrapbook's json encoder parses a string as JSON: strings go as text
    scrapbook.glue(name, value, encoder="text" if isinstance(value, str) else "json")
    display({"text/plain": f"glued {name} = {value!r}"}, raw=True)


def read_glue(notebook: str | Path | Any) -> dict[str, Any]:
    """Every value a notebook glued (the last one wins for a repeated name): scrapbook's scraps, and
    the labkit-only form earlier notebooks wrote."""
    import nbformat

    nb = notebook if hasattr(notebook, "cells") else nbformat.read(str(notebook), as_version=4)
    out: dict[str, Any] = {}
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            for mime, item in data.items():
                if mime == GLUE_MIME or mime.startswith(SCRAP_MIME_PREFIX):
                    item = json.loads(item) if isinstance(item, str) else item
                    out[item["name"]] = item.get("value", item.get("data"))
    return out


# ---------------------------------------------------------------- grid

def split_values(text: str) -> list[str]:
    """``a,[1,2],b`` -> ``["a", "[1,2]", "b"]``: commas split values only outside brackets/quotes."""
    parts, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_assignments(items: list[str]) -> dict[str, list[Any]]:
    """``["repeats=2,3", "datapaths=[ebpf],[ebpf,nftables]"]`` -> ``{"repeats": [2, 3], ...}``."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not name.strip().isidentifier():
            raise UsageError(f"-p {item!r}: expected NAME=VALUE[,VALUE...], e.g. -p repeats=2,3")
        try:
            grid[name.strip()] = [yaml.safe_load(v) for v in split_values(values)]
        except yaml.YAMLError as exc:
            raise UsageError(f"-p {item!r}: a value is not YAML: {exc}") from None
    return grid


def combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))] or [{}]


def notebook_parameters(path: str | Path) -> dict[str, Any]:
    """The names and defaults of a notebook's ``parameters`` cell (papermill's own inspection)."""
    import papermill

    return {name: p.get("default") for name, p in papermill.inspect_notebook(str(path)).items()}


# ---------------------------------------------------------------- running

def run_sweep(notebook: str | Path, grid: dict[str, list[Any]], out: str | Path | None = None,
              results_dir: str | Path | None = None, keep_going: bool = False, kernel: str | None = None,
              log=print) -> list[dict[str, Any]]:
    """Execute ``notebook`` once per combination of ``grid``; returns (and writes) the sweep index."""
    import os

    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    from .results import results_root

    notebook = Path(notebook).resolve()
    if not notebook.exists():
        raise LabkitError(f"no notebook {notebook}")
    known = notebook_parameters(notebook)
    unknown = sorted(set(grid) - set(known))
    if unknown:
        raise UsageError(f"{notebook.name} has no parameter {', '.join(unknown)}; its parameters: "
                          f"{', '.join(known) or '(no cell tagged parameters)'}")
    results_dir = Path(results_dir or results_root()).resolve()
    os.environ["LABKIT_RESULTS"] = str(results_dir)  # kernels inherit it: notebooks without results_dir too
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(out) if out else results_dir / "sweeps" / f"{stamp}-{notebook.stem}"
    out.mkdir(parents=True, exist_ok=True)
    combos = combinations(grid)
    index: list[dict[str, Any]] = []
    for k, combo in enumerate(combos, 1):
        target = out / f"{notebook.stem}-{k}.ipynb"
        params = {**combo, **({"results_dir": str(results_dir)} if "results_dir" in known else {})}
        log(f"[{k}/{len(combos)}] {notebook.name} {json.dumps(combo)} -> {target}")
        t0, status, error = time.perf_counter(), "complete", ""
        try:
            pm.execute_notebook(str(notebook), str(target), parameters=params, cwd=str(notebook.parent),
                                kernel_name=kernel, progress_bar=False, request_save_on_cell_execute=True)
        except PapermillExecutionError as exc:
            status, error = "failed", f"{exc.ename}: {exc.evalue}"
        row = _record(target, combo, status, error, time.perf_counter() - t0)
        index.append(row)
        _write_index(out, index)
        log(f"    {status} in {row['seconds']:.0f} s; run ids: {', '.join(row['run_ids']) or '-'}"
            + (f"; {error}" if error else ""))
        if status != "complete" and not keep_going:
            break
    return index


def _record(target: Path, combo: dict, status: str, error: str, seconds: float) -> dict[str, Any]:
    import nbformat

    nb = nbformat.read(str(target), as_version=4)
    glued = read_glue(nb)
    run_ids = [v for k, v in glued.items() if k == "run_id" or k.endswith("_run_id")]
    nb.metadata["labkit"] = {"parameters": combo, "glue": glued, "run_ids": run_ids, "status": status,
                             "error": error}
    nbformat.write(nb, str(target))
    return {"notebook": str(target), "parameters": combo, "run_ids": run_ids, "status": status, "error": error,
            "seconds": round(seconds, 1)}


def _write_index(out: Path, index: list[dict[str, Any]]) -> None:
    import pandas as pd

    (out / "sweep.json").write_text(json.dumps(index, indent=1, default=str))
    flat = [{**{f"p.{k}": json.dumps(v) for k, v in r["parameters"].items()}, "run_ids": " ".join(r["run_ids"]),
             **{k: r[k] for k in ("status", "seconds", "notebook", "error")}} for r in index]
    pd.DataFrame(flat).to_csv(out / "sweep.csv", index=False)
