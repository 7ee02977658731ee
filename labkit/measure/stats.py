"""Latency statistics: from raw nanosecond samples to the figures labkit reports. Pure functions.

Percentiles use numpy's default method, ``"linear"``: the value at position ``q * (n - 1)`` of the
sorted samples, interpolated between the two closest ranks. ``lkclient`` computes its JSON figures
with the same arithmetic, so a run's JSON and its raw file agree to the printed 0.001 µs.

A single run's tail (p99 and beyond) can jump 10x on a shared 2-core machine, so results are
repeated and reported as the median across repeats, with the relative spread
``(max - min) / median`` saying how much the repeats disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

PERCENTILE_METHOD = "linear"
PERCENTILES = {"p50_us": 50.0, "p90_us": 90.0, "p99_us": 99.0, "p999_us": 99.9}
LATENCY_COLUMNS = (*PERCENTILES, "mean_us", "min_us", "max_us")
# Columns of a run's result that are measurements, not the identity of what was measured.
RESULT_COLUMNS = frozenset({*LATENCY_COLUMNS, "samples", "errors", "elapsed_s", "run", "aborted",
                            "error_kinds", "names"})


def load_raw(path: str | Path) -> np.ndarray:
    """Samples written by ``lkclient --raw``: little-endian int64 nanoseconds, no header."""
    return np.fromfile(path, dtype="<i8")


def latency_stats(samples_ns: Sequence[int] | np.ndarray) -> dict[str, float | int | None]:
    """``samples`` and p50/p90/p99/p999/mean/min/max in microseconds (None when there are none)."""
    ns = np.asarray(samples_ns, dtype=np.int64)
    out: dict[str, float | int | None] = {"samples": int(ns.size)}
    if ns.size == 0:
        return out | {col: None for col in LATENCY_COLUMNS}
    pct = np.percentile(ns, list(PERCENTILES.values()), method=PERCENTILE_METHOD)
    out.update({col: float(v) / 1000.0 for col, v in zip(PERCENTILES, pct)})
    out["mean_us"] = float(ns.mean()) / 1000.0
    out["min_us"] = float(ns.min()) / 1000.0
    out["max_us"] = float(ns.max()) / 1000.0
    return out


def relative_spread(values: Iterable[float]) -> float:
    """``(max - min) / median`` of repeated measurements; 0 for a single value, NaN if median is 0."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        raise ValueError("relative_spread of no values")
    med = float(np.median(v))
    return float((v.max() - v.min()) / med) if med else float("nan")


def across_repeats(values: Iterable[float]) -> dict[str, float | int]:
    """The median of repeated measurements, their range and relative spread."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        raise ValueError("across_repeats of no values")
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()),
            "spread": relative_spread(v), "runs": int(v.size)}


def summarize(
    df: pd.DataFrame,
    by: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per group of repeats: ``runs``, and for each metric its median across the repeats
    (named like the metric), ``<metric>_min``, ``<metric>_max`` and ``<metric>_spread``.

    ``df`` has one row per run. ``by`` defaults to every column that is not a result (datapath,
    N, mode, target...); ``metrics`` to the latency columns present."""
    metrics = list(metrics) if metrics is not None else [c for c in LATENCY_COLUMNS if c in df]
    by = list(by) if by is not None else [c for c in df.columns if c not in RESULT_COLUMNS]
    if not metrics:
        raise ValueError(f"summarize: no metric columns in {list(df.columns)}")
    rows = []
    groups = df.groupby(by, sort=True, dropna=False) if by else [((), df)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, object] = dict(zip(by, key)) | {"runs": len(group)}
        for m in metrics:
            values = group[m].dropna()
            if values.empty:
                row.update({m: np.nan, f"{m}_min": np.nan, f"{m}_max": np.nan, f"{m}_spread": np.nan})
                continue
            agg = across_repeats(values)
            row.update({m: agg["median"], f"{m}_min": agg["min"], f"{m}_max": agg["max"],
                        f"{m}_spread": agg["spread"]})
        rows.append(row)
    return pd.DataFrame(rows)
