"""Runs side by side: ``labkit compare RUN RUN…`` — the same experiment measured on different machines
or backends (this host's namespaces, VMs, real servers, the shipped reference runs).

:func:`compare` opens the runs, labels each by where it ran (backend, kernel, CPUs, host), lines up
the points the runs share (same datapath or mode, N, position, metric) and divides each run's value
by the baseline run's: the median over repeats of p50 (latency metrics, lower is better) or of the
rate (transactions/s, higher is better), or of the value (load/update seconds). A ratio is only as
good as the two machines are comparable, so the facts come with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .errors import UsageError
from .results import Run

KEYS = ["datapath", "mode", "services", "position", "metric"]


@dataclass
class Comparison:
    runs: list[Run]
    baseline: str  # run id
    facts: pd.DataFrame  # one row per run: where and when it was measured
    table: pd.DataFrame  # one row per shared point: each run's value, and its ratio to the baseline's

    def label(self, run_id: str) -> str:
        return str(self.facts.set_index("run_id").loc[run_id, "label"])


def facts_of(run: Run) -> dict:
    m = run.manifest()
    mach = m.get("machine", {})
    params = m.get("params", {})
    backend = params.get("backend") or "netns"
    from . import reference

    where = "reference" if reference.is_reference(run) else backend
    kernel = ", ".join(reference.node_kernels(m)) or mach.get("kernel")  # the nodes' own (VMs)
    return {"run_id": run.run_id, "experiment": m.get("experiment"), "backend": backend,
            "kernel": kernel, "cpu_model": mach.get("cpu_model"), "cpu_count": mach.get("cpu_count"),
            "host": mach.get("hostname"), "started": m.get("started"), "status": m.get("status"),
            "git": (m.get("labkit") or {}).get("git"),
            "label": f"{run.run_id[:15]} ({where}, {kernel}, {mach.get('cpu_count', '?')} CPUs)"}


def _measure(points: pd.DataFrame) -> pd.DataFrame:
    """One value per point key: the median over repeats of p50 (latency), rate (rates) or value."""
    df = points.copy()
    df["measure"] = df["p50_us"].fillna(df["rate_per_s"]).fillna(df["value"])
    df["kind"] = np.select([df["p50_us"].notna(), df["rate_per_s"].notna()], ["latency_us", "rate_per_s"], "value")
    for k in KEYS:
        df[k] = df[k].fillna("")
    return df.dropna(subset=["measure"]).groupby(KEYS + ["kind"], as_index=False)["measure"].median()


def compare(run_ids: list[str], baseline: str | None = None) -> Comparison:
    if len(run_ids) < 2:
        raise UsageError("compare needs at least two runs (labkit results lists yours; labkit reference the shipped)")
    runs = [Run.open(r) for r in run_ids]
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise UsageError(f"a run is named twice: {', '.join(ids)}")
    facts = pd.DataFrame([facts_of(r) for r in runs])
    experiments = set(facts["experiment"])
    if len(experiments) != 1:
        raise UsageError("compare lines up runs of one experiment; these are "
                         + ", ".join(f"{r} ({e})" for r, e in zip(ids, facts["experiment"])))
    base = ids[0] if baseline is None else Run.open(baseline).run_id
    if base not in ids:
        raise UsageError(f"--baseline {baseline}: not one of the runs compared ({', '.join(ids)})")
    merged = None
    for run in runs:
        m = _measure(run.points()).rename(columns={"measure": run.run_id})
        merged = m if merged is None else merged.merge(m, on=KEYS + ["kind"], how="inner")
    assert merged is not None
    for rid in ids:
        if rid != base:
            merged[f"{rid} / baseline"] = merged[rid] / merged[base]
    return Comparison(runs, base, facts, merged.sort_values(KEYS).reset_index(drop=True))


def summary(cmp: Comparison) -> pd.DataFrame:
    """Per run against the baseline, per metric: the median ratio over the shared points and its range."""
    rows = []
    for run in cmp.runs:
        if run.run_id == cmp.baseline:
            continue
        col = f"{run.run_id} / baseline"
        for (metric, kind), g in cmp.table.groupby(["metric", "kind"]):
            rows.append({"run": cmp.label(run.run_id), "metric": metric, "unit": kind, "points": len(g),
                         "median ratio": g[col].median(), "min": g[col].min(), "max": g[col].max()})
    return pd.DataFrame(rows)


def figure(cmp: Comparison, metric: str | None = None) -> go.Figure:
    """The shared points of ``metric`` side by side: one bar group per point (datapath or mode, N,
    position), one bar per run, hover with the ratio to the baseline."""
    t = cmp.table
    metric = metric or (str(t["metric"].iloc[0]) if not t.empty else "")
    t = t[t["metric"] == metric]
    fig = go.Figure()
    if t.empty:
        fig.update_layout(title=f"no shared points for {metric}")
        return fig
    where = t.apply(lambda r: " · ".join(str(r[k]) for k in ("datapath", "mode", "services", "position")
                                         if r[k] != ""), axis=1)
    unit = {"latency_us": "p50 (µs)", "rate_per_s": "transactions/s", "value": "value"}[t["kind"].iloc[0]]
    for run in cmp.runs:
        rid = run.run_id
        ratio = t[rid] / t[cmp.baseline]
        fig.add_trace(go.Bar(x=where, y=t[rid], name=cmp.label(rid), customdata=ratio,
                             hovertemplate="%{x}<br>%{y:.4g}<br>×%{customdata:.3f} of the baseline<extra></extra>"))
    fig.update_layout(barmode="group", title=f"{metric}: {len(cmp.runs)} runs side by side (baseline "
                      f"{cmp.label(cmp.baseline)})", yaxis_title=unit, legend={"orientation": "h", "y": -0.3})
    return fig


def text(cmp: Comparison) -> str:
    lines = ["runs:"]
    for _, f in cmp.facts.iterrows():
        mark = "  (baseline)" if f["run_id"] == cmp.baseline else ""
        lines.append(f"  {f['run_id']}{mark}: {f['backend']}, kernel {f['kernel']}, {f['cpu_count']} x "
                     f"{f['cpu_model']}, host {f['host']}, {f['started']}")
    s = summary(cmp)
    if s.empty:
        lines.append("no points in common")
    else:
        lines.append(f"ratio to the baseline, per metric (median over {int(s['points'].max())} shared points at most):")
        for _, r in s.iterrows():
            lines.append(f"  {r['run']}: {r['metric']} ({r['unit']}) x{r['median ratio']:.3f} "
                         f"[{r['min']:.3f}..{r['max']:.3f}] over {r['points']} points")
    return "\n".join(lines)


__all__ = ["Comparison", "compare", "facts_of", "figure", "summary", "text"]
