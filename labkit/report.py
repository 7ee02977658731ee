"""Reports of a run: the printed summary with ratios and a self-contained HTML page.

``labkit report RUN_ID`` re-renders the HTML of any past run from the results store.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import plots
from .results import Run


def _pick_position(points: pd.DataFrame) -> str:
    present = set(points["position"].dropna())
    return next((p for p in ("last", "middle", "first", "random", "pod") if p in present), "last")


def summary_frame(run: Run, metric: str = "crr") -> pd.DataFrame:
    points = run.points()
    pos = _pick_position(points)
    s = plots.latency_summary(points, metric, pos)
    if s.empty:
        return s
    return s.pivot(index="datapath", columns="services", values="p50_us")


def pod_modes_frame(points: pd.DataFrame) -> pd.DataFrame:
    """Median across repeats per mode × (metric, same-node/cross-node): p50 µs, bandwidth Gbit/s."""
    df = points.copy()
    df["figure"] = df["p50_us"].where(df["metric"] != "bandwidth", df["value"])
    return df.groupby(["mode", "metric", "position"])["figure"].median().unstack(["metric", "position"])


def summary_text(run: Run, metric: str = "crr") -> str:
    points = run.points()
    if points.empty:
        return "no points measured"
    if run.manifest()["experiment"] == "pod-modes":
        table = pod_modes_frame(points)
        return ("p50 in µs (crr, rr, udp_rr) and Gbit/s (bandwidth), median of repeats:\n"
                + table.round(2).to_string())
    pos = _pick_position(points)
    table = summary_frame(run, metric)
    policy = run.manifest()["experiment"] == "policy-scale"
    unit, who = ("policies", "engine") if policy else ("services", "datapath")
    target = f"the server the {pos} policy admits" if policy else f"the {pos} service"
    lines = [f"{metric.upper()} p50 in µs to {target} (median of repeats), by number of {unit}:"]
    if table.empty:
        return lines[0] + " none"
    ns = list(table.columns)
    lines.append(who.ljust(16) + "".join(f"{n:>10}" for n in ns) + f"{'ratio':>10}  (N={ns[-1]} / N={ns[0]})")
    for dp, row in table.iterrows():
        ratio = row[ns[-1]] / row[ns[0]] if row[ns[0]] else float("nan")
        lines.append(dp.ljust(16) + "".join(f"{row[n]:>10.1f}" for n in ns) + f"{ratio:>9.2f}x")
    if "ebpf" in table.index:
        base = table.loc["ebpf", ns[-1]]
        others = ", ".join(f"{dp} {table.loc[dp, ns[-1]] / base:.2f}x" for dp in table.index if dp != "ebpf")
        lines.append(f"at N={ns[-1]}, relative to ebpf: {others}")
    spread = points[(points["metric"] == metric) & (points["position"] == pos)].groupby(
        ["datapath", "services"])["p50_us"].agg(lambda v: (v.max() - v.min()) / v.median() if len(v) > 1 else 0)
    lines.append(f"largest spread of p50 across repeats: {spread.max() * 100:.1f}%")
    for metric_name in ("load", "update"):
        df = points[points["metric"] == metric_name]
        if not df.empty:
            piv = df.groupby(["datapath", "services"])["value"].median().unstack()
            unit, scale = ("s", 1) if metric_name == "load" else ("ms", 1000)
            lines.append(f"{metric_name} time ({unit}): " + "; ".join(
                f"{dp} " + " ".join(f"{n}:{v * scale:.3g}" for n, v in r.items()) for dp, r in piv.iterrows()))
    return "\n".join(lines)


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
    head = (f"<h1>labkit {m['experiment']} — run {m['run_id']}</h1>"
            f"<p>kernel {mach['kernel']}, {mach['cpu_model']} × {mach['cpu_count']}, labkit "
            f"{m['labkit']['version']} ({m['labkit']['git']}); {m['started']} → {m.get('ended')} ({m['status']})</p>"
            f"<pre>{htmlmod.escape(summary_text(run))}</pre>"
            f"<p>figures: {' · '.join(f'<a href=#{n}>{n}</a>' for n in figs)}</p>")
    tail = (f"<h2>published figures drawn here</h2><p>Dotted traces with open diamonds; normalised as their "
            f"legend says (only shapes compare across machines).</p><ul>{sources}</ul>" if used else "")
    path = path or run.path / "report.html"
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{m['run_id']}</title></head>"
                    f"<body style='font-family:sans-serif;max-width:1100px;margin:auto'>{head}{''.join(parts)}"
                    f"{tail}<h2>parameters</h2><pre>{htmlmod.escape(str(m['params']))}</pre></body></html>")
    if images and figs:
        plots.export(figs, run.path / "figures")
    return path
