"""Plotly figures read from the results store: any figure can be re-rendered from a past run.

- :func:`latency_vs_services`: p50 (median of repeats, error bars min..max across repeats) of a
  latency metric versus the number of services, one trace per datapath; log-x optional.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from .measure.stats import summarize

COLORS = {"iptables-legacy": "#d62728", "iptables-nft": "#ff7f0e", "nftables": "#2ca02c", "ebpf": "#1f77b4",
          "ebpf-tc": "#9467bd", "ipvs": "#8c564b", "none": "#7f7f7f"}


def latency_summary(points: pd.DataFrame, metric: str = "crr", position: str = "last") -> pd.DataFrame:
    """Median across repeats (and min/max) of each datapath × N for one metric and position."""
    df = points[(points["metric"] == metric) & (points["position"] == position)]
    if df.empty or df["p50_us"].isna().all():
        return pd.DataFrame()
    df = df[["datapath", "services", "repeat", "p50_us", "p99_us"]].dropna(subset=["p50_us"])
    return summarize(df.drop(columns=["repeat"]), by=["datapath", "services"], metrics=["p50_us", "p99_us"])


def latency_vs_services(points: pd.DataFrame, metric: str = "crr", position: str = "last",
                        log_x: bool = False, title: str | None = None) -> go.Figure:
    s = latency_summary(points, metric, position)
    fig = go.Figure()
    for dp, g in s.groupby("datapath", sort=False):
        g = g.sort_values("services")
        fig.add_trace(go.Scatter(
            x=g["services"], y=g["p50_us"], name=dp, mode="lines+markers",
            line={"color": COLORS.get(dp)},
            error_y={"type": "data", "symmetric": False, "array": g["p50_us_max"] - g["p50_us"],
                     "arrayminus": g["p50_us"] - g["p50_us_min"]},
            hovertemplate=f"{dp}<br>%{{x}} services<br>p50 %{{y:.1f}} µs<extra></extra>"))
    fig.update_layout(
        title=title or f"{metric.upper()} p50 to the {position} service vs number of services "
                       "(median of repeats; bars: min–max)",
        xaxis_title="services", yaxis_title=f"{metric.upper()} p50 (µs)", template="plotly_white",
        legend_title="datapath")
    if log_x:
        fig.update_xaxes(type="log")
    fig.update_yaxes(rangemode="tozero")
    return fig


def cost_vs_services(points: pd.DataFrame, metric: str = "load") -> go.Figure:
    """Seconds to load the whole table (``load``) or to add one service (``update``) vs N."""
    df = points[points["metric"] == metric].dropna(subset=["value"])
    fig = go.Figure()
    for dp, g in df.groupby("datapath", sort=False):
        agg = g.groupby("services")["value"].median().reset_index()
        fig.add_trace(go.Scatter(x=agg["services"], y=agg["value"], name=dp, mode="lines+markers",
                                 line={"color": COLORS.get(dp)}))
    fig.update_layout(title=f"{'whole-table load' if metric == 'load' else 'one-service update'} time",
                      xaxis_title="services", yaxis_title="seconds", template="plotly_white")
    fig.update_yaxes(type="log")
    return fig


def mode_bars(points: pd.DataFrame, metric: str = "crr") -> go.Figure:
    """One bar per pod mode, same-node and cross-node side by side (median of repeats, min–max bars):
    p50 µs for latency metrics, Gbit/s for bandwidth."""
    df = points[points["metric"] == metric].copy()
    col = "value" if metric == "bandwidth" else "p50_us"
    fig = go.Figure()
    for where, g in df.groupby("position", sort=True):
        agg = g.groupby("mode")[col].agg(["median", "min", "max"]).reset_index()
        fig.add_trace(go.Bar(x=agg["mode"], y=agg["median"], name=where,
                             error_y={"type": "data", "symmetric": False, "array": agg["max"] - agg["median"],
                                      "arrayminus": agg["median"] - agg["min"]}))
    unit = "Gbit/s" if metric == "bandwidth" else "p50 (µs)"
    fig.update_layout(barmode="group", title=f"{metric.upper()} by pod network mode", xaxis_title="mode",
                      yaxis_title=f"{metric.upper()} {unit}", template="plotly_white")
    return fig
