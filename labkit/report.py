"""Reports of a run: the printed summary with ratios and a self-contained HTML page.

``labkit report RUN_ID`` re-renders the HTML of any past run from the results store.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import plots, reference
from .results import Run, results_root


def _pick_position(points: pd.DataFrame) -> str:
    present = set(points["position"].dropna())
    return next((p for p in ("last", "middle", "first", "random", "kube-proxy-order", "pod") if p in present), "last")


def summary_frame(run: Run, metric: str = "crr", stat: str = "p50_us", position: str | None = None) -> pd.DataFrame:
    """Median across repeats of ``stat`` per datapath (rows) × number of services (columns)."""
    points = run.points()
    pos = position or _pick_position(points)
    df = points[(points["metric"] == metric) & (points["position"] == pos)]
    if df.empty or df[stat].isna().all():
        return pd.DataFrame()
    return df.groupby(["datapath", "services"])[stat].median().unstack()


def pod_modes_frame(points: pd.DataFrame) -> pd.DataFrame:
    """Median across repeats per mode × (metric, same-node/cross-node): p50 µs, bandwidth Gbit/s,
    transactions/s for the rate metrics."""
    df = points.copy()
    df["figure"] = df["p50_us"].where(df["metric"] != "bandwidth", df["value"])
    df["figure"] = df["figure"].where(~df["metric"].str.endswith("-rate"), df["rate_per_s"])
    return df.groupby(["mode", "metric", "position"])["figure"].median().unstack(["metric", "position"])


def _table_lines(table: pd.DataFrame, who: str, fmt: str, base: str | None = "ebpf") -> list[str]:
    """Rows per datapath, a column per N, the ratio N_last / N_first, and each datapath relative to
    ``base`` at the largest N."""
    ns = list(table.columns)
    lines = [who.ljust(16) + "".join(f"{n:>10}" for n in ns) + f"{'ratio':>10}  (N={ns[-1]} / N={ns[0]})"]
    for dp, row in table.iterrows():
        ratio = row[ns[-1]] / row[ns[0]] if row[ns[0]] else float("nan")
        lines.append(dp.ljust(16) + "".join(format(row[n], f">10{fmt}") for n in ns) + f"{ratio:>9.2f}x")
    if base in table.index and len(table.index) > 1:
        ref = table.loc[base, ns[-1]]
        others = ", ".join(f"{dp} {table.loc[dp, ns[-1]] / ref:.2f}x" for dp in table.index if dp != base)
        lines.append(f"at N={ns[-1]}, relative to {base}: {others}")
    return lines


def summary_data(run: Run) -> dict:
    """The summary as data (``labkit run --json``): per metric, the median of repeats per datapath
    (or pod mode) and N; rates with their CPU per transaction; load and update times."""
    points = run.points()
    m = run.manifest()
    out: dict = {"run_id": run.run_id, "experiment": m["experiment"], "status": m["status"], "path": str(run.path),
                 "points": len(points), "metrics": {}}
    if points.empty:
        return out
    pos = _pick_position(points)
    for metric, g in points.groupby("metric"):
        stat = ("value" if metric in ("load", "update", "bandwidth") else
                "rate_per_s" if str(metric).endswith("-rate") else "p50_us")
        by = ["mode", "position"] if m["experiment"] == "pod-modes" else ["datapath", "services"]
        sel = g if m["experiment"] == "pod-modes" or metric in ("load", "update") else g[g.position == pos]
        med = sel.groupby(by)[stat].median()
        entry = {"stat": stat, "position": None if m["experiment"] == "pod-modes" else pos,
                 "median": {str(a): {str(b): v for (a2, b), v in med.items() if a2 == a} for a in med.index.levels[0]}}
        if stat == "rate_per_s":
            cpu = sel.groupby(by)["cpu_us_per_txn"].median()
            entry["cpu_us_per_txn"] = {str(a): {str(b): v for (a2, b), v in cpu.items() if a2 == a}
                                       for a in cpu.index.levels[0]}
        out["metrics"][str(metric)] = entry
    return out


def summary_text(run: Run, metric: str = "crr") -> str:
    points = run.points()
    if points.empty:
        return "no points measured"
    experiment = run.manifest()["experiment"]
    if experiment == "pod-modes":
        table = pod_modes_frame(points)
        return "\n".join(["p50 in µs (crr, rr, udp_rr), Gbit/s (bandwidth), transactions/s (…-rate), median of "
                          "repeats:", table.round(2).to_string(), *_errors_lines(run, points)])
    pos = _pick_position(points)
    policy = experiment == "policy-scale"
    unit, who = ("policies", "engine") if policy else ("services", "datapath")
    target = f"the server the {pos} policy admits" if policy else f"the {pos} service"
    lines: list[str] = []
    if (points["metric"] == metric).any():
        table = summary_frame(run, metric)
        lines.append(f"{metric.upper()} p50 in µs to {target} (median of repeats), by number of {unit}:")
        lines += _table_lines(table, who, ".1f") if not table.empty else ["  none"]
        spread = points[(points["metric"] == metric) & (points["position"] == pos)].groupby(
            [who if policy is False else "datapath", "services"])["p50_us"].agg(
            lambda v: (v.max() - v.min()) / v.median() if len(v) > 1 else 0)
        lines.append(f"largest spread of p50 across repeats: {spread.max() * 100:.1f}%")
        floor = summary_frame(run, metric, position="pod") if pos != "pod" else pd.DataFrame()
        if not floor.empty:
            lines.append("straight to a backend (no Service; kube-proxy iptables still walks its whole chain): "
                         + "; ".join(f"{dp} " + " ".join(f"{n}:{v:.1f}" for n, v in r.items())
                                     for dp, r in floor.iterrows()) + " µs")
    for rate in ("crr-rate", "rr-rate", "udp-rr-rate", "http-crr-rate", "http-rr-rate"):
        table = summary_frame(run, rate, "rate_per_s")
        if table.empty:
            continue
        conc = points.loc[points["metric"] == rate, "concurrency"].dropna()
        at = f", {int(conc.iloc[0])} at once" if not conc.empty else ""
        lines += ["", f"{rate.upper()} transactions/s to {target} (median of repeats{at}), by number of {unit}:"]
        lines += _table_lines(table, who, ".0f")
        sel = points[(points["metric"] == rate) & (points["position"] == pos)]
        spread = sel.groupby(["datapath", "services"])["rate_per_s"].agg(
            lambda v: (v.max() - v.min()) / v.median() if len(v) > 1 else 0)
        lines.append(f"largest spread of the rate across repeats: {spread.max() * 100:.1f}%")
        cpu = summary_frame(run, rate, "cpu_us_per_txn")
        if not cpu.empty and cpu.notna().any().any():
            lines.append("CPU µs per transaction on the load CPU: " + "; ".join(
                f"{dp} " + " ".join(f"{n}:{v:.1f}" for n, v in r.items()) for dp, r in cpu.iterrows()))
    costs = []
    for metric_name, label, scale, unit_ in (("load", "whole-table load", 1, "s"), ("update", "one update", 1000, "ms")):
        df = points[points["metric"] == metric_name]
        if not df.empty:
            piv = df.groupby(["datapath", "services"])["value"].median().unstack() * scale
            costs.append(f"{label} ({unit_}, median):")
            costs += ["  " + line for line in _table_lines(piv, who, ".3g", base=None)]
    if costs:
        lines += [""] + costs
    lines += _errors_lines(run, points)
    return "\n".join(lines)


def _errors_lines(run: Run, points: pd.DataFrame) -> list[str]:
    """How many attempts failed, in how many points, and which points were cut short."""
    errs = pd.to_numeric(points["errors"], errors="coerce").fillna(0)
    if not errs.any():
        return []
    out = ["", f"errors: {int(errs.sum())} failed attempts in {int((errs > 0).sum())} of {len(points)} points "
               "(the errors column of points.csv says which)"]
    for cut in run.manifest().get("cut_short", []):
        out.append(f"  cut short: {cut['point']} ({cut['target']} stopped answering: {cut['errors']})")
    return out


def write_report(run: Run, path: Path | None = None, images: bool = False) -> Path:
    """The run's self-contained HTML page (plotly.js inlined once): summary, every figure of
    :func:`labkit.plots.figures` (with the published overlays), the published figures' sources and
    caveats, and the parameters. ``images``: also write each figure as PNG and SVG into
    ``<run>/figures/`` (kaleido with the system's Chromium)."""
    import html as htmlmod

    from . import anchors

    points = run.points()
    m = run.manifest()
    figs = plots.figures(run) if not points.empty else {}
    parts = [f"<h2 id='{name}'>{name}</h2>" + f.to_html(full_html=False, include_plotlyjs=(i == 0))
             for i, (name, f) in enumerate(figs.items())]
    used = [a for a in anchors.ANCHORS.values()
            if any(a.short in (t.name or "") for f in figs.values() for t in f.data)]
    sources = "".join(f"<li><b>{htmlmod.escape(a.short)}</b> — {htmlmod.escape(a.title)} ({htmlmod.escape(a.unit)}). "
                      f"Source: {htmlmod.escape(a.source)}. Caveats: {htmlmod.escape(a.caveats)}</li>" for a in used)
    mach = m["machine"]
    shipped = reference.is_reference(run)
    where = (f"<p><b>A reference run shipped with labkit</b>: measured on labkit's development machine (below), not "
             f"on this one. <code>labkit run {htmlmod.escape(m['experiment'])}</code> measures yours.</p>" if shipped else "")
    head = (f"<h1>labkit {m['experiment']} — run {m['run_id']}</h1>{where}"
            f"<p>kernel {mach['kernel']}, {mach['cpu_model']} × {mach['cpu_count']}, labkit "
            f"{m['labkit']['version']} ({m['labkit']['git']}); {m['started']} → {m.get('ended')} ({m['status']})</p>"
            f"<pre>{htmlmod.escape(summary_text(run))}</pre>"
            f"<p>figures: {' · '.join(f'<a href=#{n}>{n}</a>' for n in figs)}</p>")
    tail = (f"<h2>published figures drawn here</h2><p>Dotted traces with open diamonds; normalised as their "
            f"legend says (only shapes compare across machines).</p><ul>{sources}</ul>" if used else "")
    out = results_root() / "reports" / run.run_id if shipped else run.path  # the shipped folder stays as shipped
    out.mkdir(parents=True, exist_ok=True)
    path = path or out / "report.html"
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{m['run_id']}</title></head>"
                    f"<body style='font-family:sans-serif;max-width:1100px;margin:auto'>{head}{''.join(parts)}"
                    f"{tail}<h2>parameters</h2><pre>{htmlmod.escape(str(m['params']))}</pre></body></html>")
    if images and figs:
        plots.export(figs, out / "figures")
    return path
