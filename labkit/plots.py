"""Plotly figures read from the results store: any figure re-renders from a past run with one call.

Every results figure takes a *source*: a :class:`~labkit.results.Run`, a run id (or unique part of
one), or a points DataFrame (``results.load(...)``); figures that need raw samples find the run
through the frame's ``run_id`` column.

- :func:`latency_vs_services`: a latency statistic (p50 by default; median of repeats, error bars
  min..max across repeats) versus the number of services, one trace per datapath and position;
  log-x optional; ``relative=True`` divides each trace by its value at the fewest services, and
  ``anchors=True`` overlays the published figures (:mod:`labkit.anchors`), normalised the same way.
- :func:`rate_vs_services`: transactions (requests) per second under load, or CPU µs per
  transaction, versus services (or the table's size: ``x="table"``), per datapath and position;
  ``anchors=True`` overlays Alibaba's nginx requests/s, both relative to one service.
- :func:`latency_cdf`: the distribution of every raw sample, one line per datapath and N.
- :func:`cost_vs_services`: seconds to load the whole table or to add one service.
- :func:`mode_bars`: one bar per pod network mode, same node and across nodes.
- :func:`topology`: the lab drawn from its spec and address plan (a live :class:`~labkit.lab.Lab` or
  a :class:`~labkit.spec.Spec` that was never built).
- :func:`figures`: every figure of a run by name; :func:`export` writes them as PNG/SVG (kaleido,
  with the system's Chromium).

Published values are always drawn dotted with open markers, their legend entry starting with the
source ("Alibaba 2020 …", "Cilium 1.6 …"), and their hover text naming the source and its caveats.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from . import anchors as anchormod
from .measure.stats import load_raw, summarize
from .results import Run

COLORS = {"iptables-legacy": "#d62728", "iptables-nft": "#ff7f0e", "nftables": "#2ca02c", "nftables-vmap": "#17becf",
          "ebpf": "#1f77b4", "ebpf-tc": "#9467bd", "ipvs": "#8c564b", "none": "#7f7f7f"}
POSITION_DASH = {"last": "solid", "middle": "dash", "first": "dot", "random": "dashdot", "pod": "longdash"}
STAT_NAMES = {"p50_us": "p50", "p90_us": "p90", "p99_us": "p99", "p999_us": "p99.9", "mean_us": "mean"}
PUBLISHED = {"line": {"dash": "dot", "width": 1.5}, "marker": {"symbol": "diamond-open", "size": 10}}
TEMPLATE = "plotly_white"


# ---------------------------------------------------------------- reading the store

def points_of(source) -> pd.DataFrame:
    """The points of a run (a Run, a run id) or the frame itself."""
    if isinstance(source, pd.DataFrame):
        return source
    if isinstance(source, Run):
        return source.points()
    return Run.open(str(source)).points()


def runs_of(source) -> dict[str, Run]:
    """Run id -> Run for a source (raw samples live in the run's folder)."""
    if isinstance(source, Run):
        return {source.run_id: source}
    if isinstance(source, pd.DataFrame):
        return {rid: Run.open(rid) for rid in source["run_id"].dropna().unique()}
    run = Run.open(str(source))
    return {run.run_id: run}


def _positions(position: str | Sequence[str]) -> list[str]:
    return [position] if isinstance(position, str) else list(position)


# ---------------------------------------------------------------- latency vs services

def latency_summary(points: pd.DataFrame, metric: str = "crr", position: str | Sequence[str] = "last",
                    stats: Sequence[str] = ("p50_us", "p99_us")) -> pd.DataFrame:
    """Median across repeats (and min/max/spread) of each datapath × N (× position when several)."""
    pos = _positions(position)
    df = points[(points["metric"] == metric) & (points["position"].isin(pos))]
    if df.empty or df["p50_us"].isna().all():
        return pd.DataFrame()
    by = ["datapath", "services"] + (["position"] if len(pos) > 1 else [])
    df = df[by + ["repeat", *stats]].dropna(subset=["p50_us"])
    return summarize(df.drop(columns=["repeat"]), by=by, metrics=list(stats))


def latency_vs_services(source, metric: str = "crr", position: str | Sequence[str] = "last",
                        log_x: bool = False, title: str | None = None, stat: str = "p50_us",
                        relative: bool = False, anchors: bool = False, x: str = "services") -> go.Figure:
    """``stat`` of ``metric`` versus N, one trace per datapath (× position, told apart by dash).

    ``relative``: each trace divided by its own value at the fewest services (so shapes compare).
    ``anchors``: overlay the published Service figures; implies ``relative`` (they are requests/s,
    ms and µs on other machines, so only shapes compare). ``x="table"``: versus the size of the
    table a lookup runs against (:func:`table_size`: nat rules for kube-proxy iptables), the axis the
    study's "50,000 rules" figures belong on (only those are overlaid then; on the services axis only
    the figures counted in services)."""
    relative = relative or anchors
    points = points_of(source)
    positions = _positions(position)
    s = latency_summary(points, metric, positions, stats=("p50_us", stat) if stat != "p50_us" else ("p50_us",))
    if not s.empty and "position" not in s:
        s["position"] = positions[0]
    if not s.empty and x == "table":
        sel = points[points["metric"] == metric]
        sizes = sel.assign(size=table_size(sel)).groupby(["datapath", "services"])["size"].median()
        s = s.assign(services_n=s["services"], services=[sizes.get((d, n)) for d, n in zip(s["datapath"], s["services"])])
    fig = go.Figure()
    name_stat = STAT_NAMES.get(stat, stat)
    order = {p: i for i, p in enumerate(positions)}
    groups = sorted(s.groupby(["datapath", "position"], sort=False), key=lambda kv: (kv[0][0], order[kv[0][1]])) \
        if not s.empty else []
    for (dp, pos), g in groups:
        g = g.sort_values("services")
        y, lo, hi = g[stat], g[f"{stat}_min"], g[f"{stat}_max"]
        if relative:
            ref = y.iloc[0]
            y, lo, hi = y / ref, lo / ref, hi / ref
        name = dp if len(positions) == 1 else f"{dp} · {pos}"
        unit = "× (rel. to fewest services)" if relative else "µs"
        fig.add_trace(go.Scatter(
            x=g["services"], y=y, name=name, mode="lines+markers", legendgroup=dp,
            line={"color": COLORS.get(dp), "dash": POSITION_DASH.get(pos, "solid")},
            error_y={"type": "data", "symmetric": False, "array": hi - y, "arrayminus": y - lo},
            customdata=np.stack([g["runs"]], axis=-1),
            hovertemplate=f"{name}<br>%{{x}} services<br>{name_stat} %{{y:.3g}} {unit}"
                          "<br>%{customdata[0]} repeats (bars: min–max)<extra></extra>"))
    if anchors:
        for trace in service_anchor_traces(set(s["datapath"]) if not s.empty else set(), positions):
            if ("[x = rules]" in trace.name) == (x == "table"):
                fig.add_trace(trace)
    what = f"{metric.upper()} {name_stat}"
    where = positions[0] if len(positions) == 1 else "/".join(positions)
    default_title = (f"{what} to the {where} service vs number of services"
                     + (", relative to the fewest services" if relative else "")
                     + " (median of repeats; bars: min–max)")
    if x == "table":
        default_title = default_title.replace("vs number of services", "vs rules / entries of the table")
    fig.update_layout(title=title or default_title,
                      xaxis_title="rules / entries in the table a lookup runs against" if x == "table" else "services",
                      yaxis_title=f"{what} relative to fewest services" if relative else f"{what} (µs)",
                      template=TEMPLATE, legend_title="datapath" + (" / published" if anchors else ""))
    if anchors:  # long source names: a legend under the plot leaves the plot its width
        fig.update_layout(legend={"orientation": "h", "yanchor": "top", "y": -0.18, "xanchor": "left", "x": 0},
                          height=640)
    if log_x:
        fig.update_xaxes(type="log")
    fig.update_yaxes(rangemode="tozero")
    return fig


def _family_color(maps_to: Iterable[str], measured: set[str]) -> str | None:
    for dp in maps_to:
        if dp in measured:
            return COLORS.get(dp)
    return None


def service_anchor_traces(measured: set[str], positions: Sequence[str] = ("last",)) -> list[go.Scatter]:
    """Published Service figures as relative traces (value / value at the first x; rates inverted),
    for the datapath families that were measured (all of them when nothing was)."""
    traces = []
    for a in (anchormod.ALIBABA_NGINX, anchormod.CILIUM_HTTP, anchormod.ALIBABA_IPTABLES):
        for series, maps_to in a.maps_to.items():
            if measured and not measured & set(maps_to):
                continue
            names = [series]
            if a is anchormod.ALIBABA_IPTABLES:  # the 50,000-rule points exist per position
                names += [p for p in positions if p in a.series]
            for sname in names:
                rel = anchormod.relative(a, sname)
                how = "1/rate rel. to 1 svc" if a.throughput else f"rel. to 1 {a.x[:-1]}"
                label = f"{a.short}: {sname} ({how})" + (" [x = rules]" if a.x == "rules" else "")
                traces.append(go.Scatter(
                    x=list(rel), y=list(rel.values()), name=label, mode="lines+markers", legendgroup="published",
                    line={**PUBLISHED["line"], "color": _family_color(maps_to, measured) or "#555"},
                    marker={**PUBLISHED["marker"]},
                    customdata=[[v, a.unit] for v in a.series[sname].values()],
                    hovertemplate=f"<b>published</b>: {label}<br>%{{x}} {a.x}: %{{y:.2f}}× "
                                  f"(as published: %{{customdata[0]:.4g}} %{{customdata[1]}})"
                                  f"<br>source: {_wrap(a.source)}<br>caveats: {_wrap(a.caveats)}<extra></extra>"))
    return traces


def _wrap(text: str, width: int = 90) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) > width:
            lines.append(line)
            line = ""
        line = f"{line} {w}".strip()
    return "<br>".join(lines + [line])


# ---------------------------------------------------------------- CDF from raw samples

def latency_cdf(source, metric: str = "crr", position: str = "last", services: Sequence[int] | None = None,
                log_x: bool = True, max_points: int = 500) -> go.Figure:
    """CDF of every raw sample (all repeats pooled) per datapath and N, read from ``raw/*.i64``.

    ``services`` picks the Ns (default: the fewest and the most). Each line is drawn through at most
    ``max_points`` quantiles so that a 100k-sample run stays a small figure."""
    points = points_of(source)
    runs = runs_of(source)
    df = points[(points["metric"] == metric) & (points["position"] == position) & points["raw"].notna()]
    ns = sorted(df["services"].unique())
    if services is None:
        services = sorted({ns[0], ns[-1]}) if ns else []
    dashes = ["solid", "dash", "dot", "dashdot", "longdash"]
    fig = go.Figure()
    for dp, g in df.groupby("datapath", sort=False):
        for k, n in enumerate(services):
            rows = g[g["services"] == n]
            samples = [load_raw(runs[r.run_id].path / "raw" / r.raw) for r in rows.itertuples()
                       if (runs[r.run_id].path / "raw" / r.raw).exists()]
            if not samples:
                continue
            us = np.sort(np.concatenate(samples)) / 1000.0
            q = np.linspace(0, 1, min(max_points, us.size))
            x = np.quantile(us, q)
            fig.add_trace(go.Scatter(
                x=x, y=q, mode="lines", name=f"{dp} · {n} svc", legendgroup=dp,
                line={"color": COLORS.get(dp), "dash": dashes[k % len(dashes)]},
                hovertemplate=f"{dp}, {n} services<br>%{{x:.1f}} µs: %{{y:.3f}} of {us.size} samples"
                              "<extra></extra>"))
    fig.update_layout(title=f"{metric.upper()} latency CDF to the {position} service (raw samples, repeats pooled)",
                      xaxis_title=f"{metric.upper()} latency (µs)", yaxis_title="fraction of samples ≤ x",
                      template=TEMPLATE, legend_title="datapath · services")
    if log_x:
        fig.update_xaxes(type="log")
    return fig


# ---------------------------------------------------------------- rates under load

RATE_STATS = {"rate_per_s": "transactions/s", "cpu_us_per_txn": "CPU µs per transaction"}


def table_size(points: pd.DataFrame) -> pd.Series:
    """The size of the table a new connection's lookup runs against: nat rules (kube-proxy iptables),
    service-map elements (nftables), eBPF map entries; the x of the rules axis."""
    return points["nat_rules"].fillna(points["set_elements"]).fillna(points["map_entries"])


def rate_vs_services(source, metric: str = "crr-rate", position: str | Sequence[str] = "last",
                     stat: str = "rate_per_s", relative: bool = False, anchors: bool = False, x: str = "services",
                     log_x: bool = False, title: str | None = None) -> go.Figure:
    """``stat`` (transactions/s, or ``cpu_us_per_txn``) of a rate metric versus the number of services
    (``x="table"``: versus the table's size, :func:`table_size`), one trace per datapath × position,
    median of repeats, bars min–max. ``relative`` divides each trace by its value at the fewest
    services; ``anchors`` (implies ``relative``) overlays Alibaba's nginx requests/s, also relative to
    one service (rates stay rates here: higher is faster)."""
    relative = relative or anchors
    points = points_of(source)
    positions = _positions(position)
    df = points[(points["metric"] == metric) & points["position"].isin(positions)].copy()
    fig = go.Figure()
    if not df.empty:
        df["x"] = table_size(df) if x == "table" else df["services"]
        g = df.groupby(["datapath", "position", "services"]).agg(
            y=(stat, "median"), lo=(stat, "min"), hi=(stat, "max"), x=("x", "median"), runs=(stat, "count"))
        for (dp, pos), t in g.reset_index().groupby(["datapath", "position"], sort=True):
            t = t.sort_values("services")
            y, lo, hi = t["y"], t["lo"], t["hi"]
            if relative:
                ref = y.iloc[0]
                y, lo, hi = y / ref, lo / ref, hi / ref
            name = dp if len(positions) == 1 else f"{dp} · {pos}"
            fig.add_trace(go.Scatter(
                x=t["x"], y=y, name=name, mode="lines+markers", legendgroup=dp,
                line={"color": COLORS.get(dp), "dash": POSITION_DASH.get(pos, "solid")},
                error_y={"type": "data", "symmetric": False, "array": hi - y, "arrayminus": y - lo},
                customdata=np.stack([t["services"], t["runs"]], axis=-1),
                hovertemplate=f"{name}<br>%{{customdata[0]}} services (x %{{x}})<br>{RATE_STATS.get(stat, stat)} "
                              "%{y:.4g}<br>%{customdata[1]} repeats (bars: min–max)<extra></extra>"))
    if anchors:
        a = anchormod.ALIBABA_NGINX
        measured = set(df["datapath"]) if not df.empty else set()
        for series, maps_to in a.maps_to.items():
            if measured and not measured & set(maps_to):
                continue
            values = a.series[series]
            base = next(iter(values.values()))
            label = f"{a.short}: {series} (rel. to 1 svc)"
            fig.add_trace(go.Scatter(
                x=list(values), y=[v / base for v in values.values()], name=label, mode="lines+markers",
                legendgroup="published", line={**PUBLISHED["line"], "color": _family_color(maps_to, measured) or "#555"},
                marker={**PUBLISHED["marker"]}, customdata=[[v, a.unit] for v in values.values()],
                hovertemplate=f"<b>published</b>: {label}<br>%{{x}} services: %{{y:.2f}}× (as published: "
                              f"%{{customdata[0]:.4g}} %{{customdata[1]}})<br>source: {_wrap(a.source)}"
                              f"<br>caveats: {_wrap(a.caveats)}<extra></extra>"))
    what = f"{metric} {RATE_STATS.get(stat, stat)}"
    where = "/".join(positions)
    fig.update_layout(
        title=title or f"{what} to the {where} service vs {'table size' if x == 'table' else 'number of services'}"
                       + (", relative to the fewest services" if relative else "") + " (median of repeats)",
        xaxis_title="rules / entries in the table a lookup runs against" if x == "table" else "services",
        yaxis_title=f"{what}" + (" relative to fewest services" if relative else ""), template=TEMPLATE,
        legend_title="datapath" + (" / published" if anchors else ""))
    if log_x:
        fig.update_xaxes(type="log")
    fig.update_yaxes(rangemode="tozero")
    return fig


# ---------------------------------------------------------------- load / update cost

def cost_vs_services(source, metric: str = "load", anchors: bool = False, log_x: bool = False) -> go.Figure:
    """Seconds to load the whole table (``load``) or to add one service (``update``) vs N; median of
    the repeats (updates: error bars min..max). ``anchors`` adds Huawei's 2017 rule-add times to
    ``update`` (absolute seconds: a 2017 kube-proxy rewrote the whole table per change)."""
    points = points_of(source)
    df = points[points["metric"] == metric].dropna(subset=["value"])
    fig = go.Figure()
    for dp, g in df.groupby("datapath", sort=False):
        agg = g.groupby("services")["value"].agg(["median", "min", "max", "count"]).reset_index()
        fig.add_trace(go.Scatter(
            x=agg["services"], y=agg["median"], name=dp, mode="lines+markers", line={"color": COLORS.get(dp)},
            error_y={"type": "data", "symmetric": False, "array": agg["max"] - agg["median"],
                     "arrayminus": agg["median"] - agg["min"]},
            customdata=agg[["count"]], hovertemplate=f"{dp}<br>%{{x}} services: %{{y:.3g}} s"
                                                     "<br>%{customdata[0]} measurements<extra></extra>"))
    if anchors and metric == "update":
        a = anchormod.HUAWEI_UPDATE
        for series, values in a.series.items():
            if not set(df["datapath"]) & set(a.maps_to[series]):
                continue
            label = f"{a.short}: {series} (absolute s)"
            fig.add_trace(go.Scatter(
                x=list(values), y=list(values.values()), name=label, mode="lines+markers",
                line={**PUBLISHED["line"], "color": "#555"}, marker=PUBLISHED["marker"], legendgroup="published",
                hovertemplate=f"<b>published</b>: {label}<br>%{{x}} services: %{{y:.4g}} s"
                              f"<br>source: {_wrap(a.source)}<br>caveats: {_wrap(a.caveats)}<extra></extra>"))
    what = "whole-table load" if metric == "load" else "one-service update"
    fig.update_layout(title=f"{what} time vs number of services (median; bars: min–max)", xaxis_title="services",
                      yaxis_title="seconds (log)", template=TEMPLATE, legend_title="datapath")
    fig.update_yaxes(type="log")
    if log_x:
        fig.update_xaxes(type="log")
    return fig


# ---------------------------------------------------------------- pod network modes

def mode_bars(source, metric: str = "crr", relative: bool = False, anchors: bool = False,
              baseline: str = anchormod.ALIBABA_BASELINE) -> go.Figure:
    """One bar per pod mode, same-node and cross-node side by side (median of repeats, bars min–max):
    p50 µs for latency metrics, Gbit/s for bandwidth.

    ``relative``: every bar divided by ``baseline``'s bar at the same position. ``anchors``: overlay
    Alibaba's published mode figures for this metric, relative to exclusive ENI (implies
    ``relative``; TCP_RR and UDP PPS are rates and are inverted, see :mod:`labkit.anchors`)."""
    relative = relative or anchors
    df = points_of(source)
    df = df[df["metric"] == metric].copy()
    is_rate = metric.endswith("-rate")
    col = "value" if metric == "bandwidth" else ("rate_per_s" if is_rate else "p50_us")
    fig = go.Figure()
    from .modes import names as mode_names

    # pod-modes' variants beside their modes: the host-network baseline first, then each mode followed by
    # <mode>+bpf-hr and <mode>+ebpf-tc (labkit.experiments.pod_modes.SUFFIXES)
    order = ["host-network", *(v for m in mode_names() for v in (m, m + "+bpf-hr", m + "+ebpf-tc"))]
    present = sorted(dict.fromkeys(df["mode"]), key=lambda m: order.index(m) if m in order else len(order))
    if relative and baseline not in present:
        raise ValueError(f"mode_bars(relative=True): baseline mode {baseline!r} was not measured "
                         f"(measured: {', '.join(present)}); pass baseline=one of them")
    for where, g in df.groupby("position", sort=True):
        agg = g.groupby("mode")[col].agg(["median", "min", "max", "count"]).reset_index()
        if relative:
            ref = float(agg.loc[agg["mode"] == baseline, "median"].iloc[0])
            agg[["median", "min", "max"]] = agg[["median", "min", "max"]] / ref
        fig.add_trace(go.Bar(
            x=agg["mode"], y=agg["median"], name=where, customdata=agg[["count"]],
            error_y={"type": "data", "symmetric": False, "array": agg["max"] - agg["median"],
                     "arrayminus": agg["median"] - agg["min"]},
            hovertemplate=f"%{{x}}, {where}: %{{y:.3g}}<br>%{{customdata[0]}} repeats<extra></extra>"))
    if anchors:
        for a in anchormod.for_metric(metric):
            rel = anchormod.relative(a, "Alibaba", invert=not is_rate)
            how = "1/rate" if a.throughput and not is_rate else "as published"
            label = f"{a.short} ({how}, rel. to exclusive ENI)"
            fig.add_trace(go.Scatter(
                x=list(rel), y=list(rel.values()), name=label, mode="markers", legendgroup="published",
                marker={**PUBLISHED["marker"], "size": 14, "line": {"width": 2}},
                customdata=[[v, a.unit, anchormod.ALIBABA_MODES_KEYS[m]] for m, v in a.series["Alibaba"].items()],
                hovertemplate=f"<b>published</b>: {label}<br>%{{customdata[2]}}: %{{y:.2f}}× "
                              "(as published: %{customdata[0]:.4g} %{customdata[1]})"
                              f"<br>source: {_wrap(a.source)}<br>caveats: {_wrap(a.caveats)}<extra></extra>"))
    if metric == "bandwidth":
        unit = "bandwidth" + (f" relative to {baseline}" if relative else " (Gbit/s)")
    elif is_rate:
        unit = "transactions/s" + (f" relative to {baseline}" if relative else "")
    else:
        unit = "p50" + (f" relative to {baseline}" if relative else " (µs)")
    fig.update_layout(barmode="group", title=f"{metric.upper()} by pod network mode (median of repeats; bars: min–max)",
                      xaxis_title="mode", yaxis_title=f"{metric.upper()} {unit}", template=TEMPLATE,
                      legend_title="position" + (" / published" if anchors else ""))
    fig.update_xaxes(categoryorder="array", categoryarray=present + [m for m in anchormod.ALIBABA_MODES_KEYS
                                                                       if anchors and m not in present])
    return fig


# ---------------------------------------------------------------- topology

def topology(lab_or_spec, plan=None, title: str | None = None) -> go.Figure:
    """The lab as a diagram: the VPC router on top, one box per node with its NICs (``eth0``,
    ``eni<k>``) wired to the router, and the pods below, coloured by network mode and attached where
    their traffic leaves the node (their ENI for ENI modes, the node for veth/bridge/overlay; VXLAN
    drawn between nodes). Hover shows every address. Works on a live Lab or a Spec never built."""
    from . import addressing, modes

    spec = getattr(lab_or_spec, "spec", lab_or_spec)
    plan = plan or getattr(lab_or_spec, "plan", None) or addressing.plan(spec)
    widths = [max(2, len(n.pods), n.enis + 1) for n in spec.nodes]
    gap, top, node_y0, node_y1, pod_y = 1.0, 3.2, 1.0, 2.0, 0.0
    fig = go.Figure()
    x0 = 0.0
    centers, nic_xy, attach = {}, {}, {}
    for node, w in zip(spec.nodes, widths):
        centers[node.name] = x0 + w / 2
        fig.add_shape(type="rect", x0=x0, x1=x0 + w, y0=node_y0, y1=node_y1, line={"color": "#444"},
                      fillcolor="#f2f2f2", layer="below")
        np_ = plan.nodes[node.name]
        fig.add_annotation(x=x0 + w / 2, y=(node_y0 + node_y1) / 2, showarrow=False,
                           text=f"<b>{node.name}</b><br>pods {np_.native_subnet}"
                                + (f"<br>overlay {np_.overlay_subnet}" if np_.overlay_subnet else ""))
        for k, nic in enumerate(np_.nics):
            nic_xy[(node.name, k)] = (x0 + (k + 0.5) * w / len(np_.nics), node_y1)
        attach[node.name] = (x0 + w / 2, node_y0)
        x0 += w + gap
    total = x0 - gap
    router = (total / 2, top)
    # VPC links
    lx, ly, nx, ny, ntext = [], [], [], [], []
    for (node, k), (x, y) in nic_xy.items():
        lx += [router[0], x, None]
        ly += [router[1], y, None]
        nic = plan.nodes[node].nics[k]
        nx.append(x)
        ny.append(y)
        ntext.append(f"{node} {nic.ifname}: {nic.ip}/{plan.vpc.prefixlen}<br>router side {nic.router_ifname}")
    fig.add_trace(go.Scatter(x=lx, y=ly, mode="lines", line={"color": "#888"}, name="VPC link", hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=nx, y=ny, mode="markers+text", marker={"symbol": "square", "size": 12, "color": "#444"},
                             text=[t.split(":")[0].split(" ", 1)[1] for t in ntext], textposition="top right",
                             name="node NIC / ENI", hovertext=ntext, hoverinfo="text"))
    fig.add_trace(go.Scatter(x=[router[0]], y=[router[1]], mode="markers+text", name="VPC router",
                             marker={"symbol": "hexagon", "size": 26, "color": "#333"}, textposition="middle right",
                             text=[f"  VPC router {plan.vpc} (gw {plan.vpc_gateway})"],
                             hovertext=[f"VPC {plan.vpc}, gateway {plan.vpc_gateway}, pod CIDR {plan.pod_cidr}"],
                             hoverinfo="text"))
    # pods
    by_mode: dict[str, dict[str, list]] = {}
    wires_x, wires_y = [], []
    x0 = 0.0
    overlay_nodes = []
    for node, w in zip(spec.nodes, widths):
        for i, pod in enumerate(node.pods):
            pp = plan.pods[pod.name]
            x = x0 + (i + 0.5) * w / max(1, len(node.pods))
            tgt = nic_xy[(node.name, pp.nic)] if pp.nic is not None else attach[node.name]
            wires_x += [x, tgt[0], None]
            wires_y += [pod_y, tgt[1], None]
            d = by_mode.setdefault(pod.mode, {"x": [], "y": [], "text": [], "hover": []})
            d["x"].append(x)
            d["y"].append(pod_y)
            d["text"].append(pod.name)
            via = f"{plan.nodes[node.name].nics[pp.nic].ifname}" if pp.nic is not None else "node"
            d["hover"].append(f"<b>{pod.name}</b> ({pod.mode}) on {node.name}<br>{pp.ip}/{pp.prefixlen} "
                              f"gw {pp.gateway}, MTU {pp.mtu}<br>via {via}"
                              + (f"<br>labels {dict(pod.labels)}" if pod.labels else ""))
            if modes.get(pod.mode).pool == "overlay" and node.name not in overlay_nodes:
                overlay_nodes.append(node.name)
        x0 += w + gap
    fig.add_trace(go.Scatter(x=wires_x, y=wires_y, mode="lines", line={"color": "#bbb", "width": 1},
                             name="pod attachment", hoverinfo="skip", showlegend=False))
    if len(overlay_nodes) > 1:
        xs = [attach[n][0] for n in overlay_nodes]
        overlay = next(m for m in modes.MODES if m.pool == "overlay")
        fig.add_trace(go.Scatter(x=xs, y=[node_y0 - 0.25] * len(xs), mode="lines",
                                 line={"color": overlay.color, "dash": "dash"},
                                 name="VXLAN (overlay pods)", hoverinfo="skip"))
    for mode, d in by_mode.items():
        fig.add_trace(go.Scatter(x=d["x"], y=d["y"], mode="markers+text", name=mode, text=d["text"],
                                 textposition="bottom center", hovertext=d["hover"], hoverinfo="text",
                                 marker={"size": 18, "color": modes.get(mode).color}))
    n_svc = sum(s.count or 1 for s in spec.services)
    fig.update_layout(
        title=title or f"lab {spec.name}: {len(spec.nodes)} nodes, {len(spec.pods())} pods, "
                       f"datapath {spec.datapath}, {n_svc} service{'s' * (n_svc != 1)} ({spec.backend} backend)",
        template=TEMPLATE, showlegend=True, legend_title="pod mode / link", height=480,
        xaxis={"visible": False, "range": [-0.5, total + 0.5 + 2.5]},
        yaxis={"visible": False, "range": [pod_y - 0.7, top + 0.5]})
    return fig


# ---------------------------------------------------------------- all figures of a run, export

def variant_bars(source, metric: str = "rr", baseline: str = anchormod.VARIANT_BASELINE) -> go.Figure:
    """:func:`mode_bars` relative to ``baseline`` (veth with the node's kernel routing) with the
    published figures for host routing, netkit and the host network drawn over it
    (:func:`labkit.anchors.for_variants`: the redirect_peer kernel commit, Cilium's CNI benchmark,
    ByteDance's netkit), each marked as a published overlay naming its source. The published
    figures are all pod to remote pod (or node to node): compare them with the cross-node bars."""
    fig = mode_bars(source, metric, relative=True, baseline=baseline)
    is_rate = metric.endswith("-rate")
    for a in anchormod.for_variants(anchormod.RATE_OF.get(metric, metric)):
        rel = anchormod.relative(a, "published", base=baseline, invert=not is_rate)
        how = "1/rate" if a.throughput and not is_rate else "as published"
        label = f"published: {a.short} ({how}, rel. to {baseline})"
        fig.add_trace(go.Scatter(
            x=list(rel), y=list(rel.values()), name=label, mode="markers", legendgroup="published",
            marker={**PUBLISHED["marker"], "size": 14, "line": {"width": 2}},
            customdata=[[v, a.unit] for v in a.series["published"].values()],
            hovertemplate=f"<b>published</b>: {label}<br>%{{x}}: %{{y:.2f}}× (as published: %{{customdata[0]:.4g}} "
                          f"%{{customdata[1]}})<br>source: {_wrap(a.source)}<br>caveats: {_wrap(a.caveats)}<extra></extra>"))
    shown = list(fig.layout.xaxis.categoryarray or [])
    extra = [x for a in anchormod.for_variants(anchormod.RATE_OF.get(metric, metric)) for x in a.series["published"]
             if x not in shown]
    fig.update_xaxes(categoryarray=shown + list(dict.fromkeys(extra)))
    fig.update_layout(title=f"{metric.upper()} relative to {baseline}, with published host-routing and netkit "
                            "figures (cross-node)", legend_title="position / published")
    return fig


def figures(source, anchors: bool = True, log_x: bool = False) -> dict[str, go.Figure]:
    """Every figure of a run, by a file-friendly name (what the report shows and :func:`export` writes)."""
    points = points_of(source)
    experiment = points["experiment"].dropna().iloc[0] if not points.empty else ""
    figs: dict[str, go.Figure] = {}
    if experiment == "pod-modes":
        for metric in ("crr", "rr", "udp_rr", "bandwidth", "crr-rate", "rr-rate", "udp-rr-rate"):
            if (points["metric"] == metric).any():
                figs[f"modes-{metric}"] = mode_bars(points, metric)
                if anchors and anchormod.for_metric(metric) and (points["mode"] == anchormod.ALIBABA_BASELINE).any():
                    figs[f"modes-{metric}-vs-published"] = mode_bars(points, metric, anchors=True)
                if (anchors and anchormod.for_variants(anchormod.RATE_OF.get(metric, metric))
                        and (points["mode"] == anchormod.VARIANT_BASELINE).any()):
                    figs[f"modes-{metric}-vs-published-host-routing"] = variant_bars(points, metric)
        return figs
    if experiment == "policy-scale":  # policies on the x axis, engines as traces (not services, datapaths)
        present = set(points["position"].dropna())
        pos = next((p for p in ("last", "first") if p in present), "last")
        for metric in ("crr", "rr"):
            if ((points["metric"] == metric) & points["p50_us"].notna()).any():
                figs[f"policy-{metric}-vs-policies"] = policy_scale(points, metric, pos)
        return figs
    present = set(points["position"].dropna())
    order = [p for p in ("first", "middle", "last", "kube-proxy-order") if p in present]
    floor = ["pod"] if "pod" in present else []
    main = next((p for p in ("last", "middle", "first", "random", "kube-proxy-order", "pod") if p in present), "last")
    anchors = anchors and experiment == "service-scale"  # nothing was published for the others
    for metric in ("crr", "rr"):
        if not ((points["metric"] == metric) & points["p50_us"].notna()).any():
            continue
        figs[f"{metric}-p50-vs-services"] = latency_vs_services(points, metric, (order or [main]) + floor, log_x=log_x)
        figs[f"{metric}-p99-vs-services"] = latency_vs_services(points, metric, main, log_x=log_x, stat="p99_us")
        if anchors:
            # published x runs to 50,000 rules: only a log axis shows a 1..5,000-service lab beside it
            figs[f"{metric}-vs-published"] = latency_vs_services(points, metric, main, log_x=True, anchors=True)
        if (points["raw"].notna()).any():
            figs[f"{metric}-cdf"] = latency_cdf(source if not isinstance(source, pd.DataFrame) else points,
                                                metric, main)
        if points["rules_walked"].notna().any():
            figs[f"{metric}-vs-table-size"] = latency_vs_services(points, metric, (order or [main]), log_x=True,
                                                                  x="table", anchors=anchors)
    for metric in ("crr-rate", "rr-rate", "udp-rr-rate", "http-crr-rate", "http-rr-rate"):
        if not ((points["metric"] == metric) & points["rate_per_s"].notna()).any():
            continue
        figs[f"{metric}-vs-services"] = rate_vs_services(points, metric, (order or [main]) + floor, log_x=log_x)
        if anchors:
            figs[f"{metric}-vs-published"] = rate_vs_services(points, metric, main, anchors=True, log_x=True)
        if points.loc[points["metric"] == metric, "cpu_us_per_txn"].notna().any():
            figs[f"{metric}-cpu"] = rate_vs_services(points, metric, [main] + floor, stat="cpu_us_per_txn",
                                                     log_x=log_x)
    for metric in ("load", "update"):
        if (points["metric"] == metric).any():
            figs[f"{metric}-cost"] = cost_vs_services(points, metric, anchors=anchors, log_x=log_x)
    return figs


def export(figs: dict[str, go.Figure] | go.Figure, outdir: str | Path, formats: Sequence[str] = ("png", "svg"),
           width: int = 1000, height: int = 560, scale: float = 1.0) -> list[Path]:
    """Write each figure as ``<outdir>/<name>.<fmt>`` with kaleido (≥ 1), which drives a Chrome it
    finds on PATH: Debian's ``chromium`` (setup.sh installs it; ``BROWSER_PATH`` overrides). One
    browser serves every image (starting it costs seconds; each image then well under one)."""
    import kaleido
    import plotly.io as pio

    if isinstance(figs, go.Figure):
        figs = {"figure": figs}
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = [outdir / f"{name}.{fmt}" for name in figs for fmt in formats]
    objs = [fig for fig in figs.values() for _ in formats]
    started = False
    try:
        kaleido.start_sync_server(silence_warnings=True)
        started = True
    except Exception:  # a server already running in this process (another export) is fine
        pass
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "kopts is ignored if using a server"
            pio.write_images(objs, paths, width=width, height=height, scale=scale)
    finally:
        if started:
            kaleido.stop_sync_server(silence_warnings=True)
    return paths


STATIC_RENDERER = "labkit"  # plotly's interactive output and a static SVG of it, in one output


def static_figures(width: int = 1000, height: int = 560) -> bool:
    """From now on, every figure a notebook shows carries a static SVG beside plotly's interactive
    output (one display bundle, two mimetypes): JupyterLab shows the interactive one, while
    ``jupyter nbconvert --to html``, a course site and a plain file viewer, which have no plotly.js,
    show the SVG, offline. The SVG is drawn by kaleido in one Chromium kept for the kernel's life.
    Returns False (and figures stay interactive only) where kaleido cannot start a browser."""
    import atexit
    import warnings

    import kaleido
    import plotly.io as pio
    from plotly.io._base_renderers import MimetypeRenderer

    class InteractiveAndStatic(MimetypeRenderer):
        def to_mimebundle(self, fig_dict):
            bundle = pio.renderers["plotly_mimetype"].to_mimebundle(fig_dict)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "kopts is ignored if using a server"
                svg = pio.to_image(fig_dict, format="svg", width=width, height=height)
            return {**bundle, "image/svg+xml": svg.decode() if isinstance(svg, bytes) else svg}

    try:
        kaleido.start_sync_server(silence_warnings=True)
        atexit.register(kaleido.stop_sync_server, silence_warnings=True)
    except Exception:  # already running in this kernel: fine
        pass
    problem = _kaleido_draws()
    if problem:
        print(f"labkit: figures stay interactive only (no static copy): kaleido could not draw ({problem})")
        return False
    pio.renderers[STATIC_RENDERER] = InteractiveAndStatic()
    pio.renderers.default = STATIC_RENDERER
    return True


def _kaleido_draws(seconds: float = 60.0) -> str | None:
    """Why kaleido cannot draw (None: it drew a small figure). Tried in a thread with a time limit:
    when its browser dies at start (no writable temporary folder, say), kaleido's call never returns."""
    import threading
    import warnings

    import plotly.io as pio

    outcome: list[str | None] = []

    def draw() -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pio.to_image(go.Figure(), format="svg", width=100, height=100)
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - any failure means: no static copies
            outcome.append(f"{type(exc).__name__}: {str(exc)[:200]}")

    t = threading.Thread(target=draw, daemon=True, name="labkit-kaleido-probe")
    t.start()
    t.join(seconds)
    return outcome[0] if outcome else f"its browser did not answer within {seconds:.0f} s"


PATH_LAYERS = {"pod": ("#9ecae1", "the pod's own stack"), "device": ("#c7e9c0", "a virtual device"),
               "node": ("#fdae6b", "the node's stack (routing, netfilter): the cost the study measured"),
               "bpf": ("#bcbddc", "a BPF program that skips the node's stack"), "nic": ("#d9d9d9", "a NIC")}
HOST_ROUTING_PATH = (("pod", "pod's stack"), ("device", "veth pair"),
                     ("bpf", "tc BPF on the node's veth: bpf_redirect_neigh (no netfilter)"),
                     ("nic", "eth0, onto the VPC"))


def packet_paths(modes: Sequence[str] | None = None, host_routing: bool = True) -> go.Figure:
    """Where a packet goes from a pod towards a pod on another node, per pod mode: one row of boxes
    per mode, left to right, coloured by layer; the node's stack (routing and netfilter) in orange.
    ``host_routing``: also veth with eBPF host routing (``veth+bpf-hr``)."""
    from . import modes as modemod

    names = list(modes) if modes else modemod.names()
    rows = [(n, modemod.get(n).path) for n in names if modemod.get(n).path]
    if host_routing and (not modes or "veth" in names):
        rows.append(("veth+bpf-hr", HOST_ROUTING_PATH))
    fig = go.Figure()
    width, gap = 2.6, 0.35
    for y, (name, hops) in enumerate(reversed(rows)):
        crosses = sum(layer == "node" for layer, _ in hops)
        for k, (layer, what) in enumerate(hops):
            x0 = k * (width + gap)
            color, _ = PATH_LAYERS[layer]
            fig.add_shape(type="rect", x0=x0, x1=x0 + width, y0=y - 0.35, y1=y + 0.35, fillcolor=color,
                          line={"color": "#555", "width": 1}, layer="below")
            fig.add_annotation(x=x0 + width / 2, y=y, text=_box_text(what, 30), showarrow=False, font={"size": 10})
            if k:
                fig.add_annotation(x=x0, y=y, ax=x0 - gap, ay=y, xref="x", yref="y", axref="x", ayref="y",
                                   text="", showarrow=True, arrowhead=2, arrowsize=1, arrowwidth=1.2)
        end = len(hops) * (width + gap)
        fig.add_annotation(x=end, y=y, xanchor="left", showarrow=False, font={"size": 10},
                           text=f"{len(hops)} hops; node's stack {'×' + str(crosses) if crosses else 'skipped'}")
    for layer, (color, meaning) in PATH_LAYERS.items():  # a legend of the layers
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=meaning,
                                 marker={"symbol": "square", "size": 12, "color": color}))
    fig.update_yaxes(tickvals=list(range(len(rows))), ticktext=[n for n, _ in reversed(rows)],
                     range=[-0.7, len(rows) - 0.3], showgrid=False, zeroline=False)
    fig.update_xaxes(visible=False, range=[-0.2, 6 * (width + gap) + 1.5])
    fig.update_layout(title="The packet's path from a pod towards another node, per pod mode", template=TEMPLATE,
                      height=90 + 62 * len(rows), legend={"orientation": "h", "y": -0.05}, margin={"l": 130})
    return fig


def _box_text(text: str, width: int) -> str:
    import textwrap

    return "<br>".join(textwrap.wrap(text, width))


def trace_names(fig: go.Figure) -> list[str]:
    """Legend names of a figure's traces (tests and notebooks' self-checks use it)."""
    return [t.name for t in fig.data]


__all__ = ["packet_paths", "latency_vs_services", "latency_cdf", "cost_vs_services", "mode_bars", "variant_bars", "topology", "figures",
           "export", "latency_summary", "service_anchor_traces", "points_of", "runs_of", "trace_names", "COLORS"]



# ---------------------------------------------------------------- network policy (policy-scale)

POLICY_COLORS = {"iptables": "#ff7f0e", "ebpf": "#1f77b4", "none": "#7f7f7f"}


def policy_scale(source, metric: str = "crr", position: str = "last") -> go.Figure:
    """A ``policy-scale`` run in two panels, one trace per policy engine, N policies as evenly spaced
    categories (0 = no policy): left, ``metric`` p50 from the client to the server the last (or
    first) policy admits (median of repeats, bars min–max); right, seconds to load the whole table
    (solid) and to add one policy (dotted), log scale."""
    from plotly.subplots import make_subplots

    points = points_of(source)
    s = latency_summary(points, metric, position)
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        f"{metric.upper()} p50, allowing policy {position} (µs)", "policy load / one-policy update (s, log)"))
    order = sorted(points["services"].dropna().unique())
    cats = [str(int(n)) for n in order]
    engines = list(dict.fromkeys(points["datapath"].dropna()))
    for eng in engines:
        color = POLICY_COLORS.get(eng, COLORS.get(eng))
        if not s.empty:
            g = s[s["datapath"] == eng].sort_values("services")
            fig.add_trace(go.Scatter(
                x=[str(int(n)) for n in g["services"]], y=g["p50_us"], name=f"{eng} {metric}", legendgroup=eng,
                mode="lines+markers", line={"color": color},
                error_y={"type": "data", "symmetric": False, "array": g["p50_us_max"] - g["p50_us"],
                         "arrayminus": g["p50_us"] - g["p50_us_min"]},
                hovertemplate=f"{eng}<br>%{{x}} policies<br>p50 %{{y:.1f}} µs<extra></extra>"), row=1, col=1)
        for what, dash in (("load", "solid"), ("update", "dot")):
            df = points[(points["metric"] == what) & (points["datapath"] == eng)].dropna(subset=["value"])
            df = df[df["value"] > 0]
            if df.empty:
                continue
            agg = df.groupby("services")["value"].median().reset_index().sort_values("services")
            fig.add_trace(go.Scatter(
                x=[str(int(n)) for n in agg["services"]], y=agg["value"], name=f"{eng} {what}", legendgroup=eng,
                mode="lines+markers", line={"color": color, "dash": dash},
                hovertemplate=f"{eng} {what}<br>%{{x}} policies: %{{y:.3g}} s<extra></extra>"), row=1, col=2)
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=cats, title_text="policies")
    fig.update_yaxes(rangemode="tozero", row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title="NetworkPolicy at scale: iptables vs eBPF enforcement", template=TEMPLATE,
                      legend_title="engine")
    return fig
