"""Measuring a lab: load generation, CPU placement and the statistics labkit reports.

- :mod:`labkit.measure.loadgen` starts in-pod servers and runs latency clients (C programs from
  :mod:`labkit.native`) inside namespaces.
- :mod:`labkit.measure.cpus` decides which CPU carries the measured traffic and which carries labkit.
- :mod:`labkit.measure.stats` turns raw nanosecond samples and repeated runs into figures.
"""

from labkit.measure.cpus import CpuPlan, plan_cpus
from labkit.measure.loadgen import WhoResult, run_client, start_server, stop_server, who
from labkit.measure.stats import across_repeats, latency_stats, load_raw, relative_spread, summarize

__all__ = [
    "CpuPlan", "WhoResult", "across_repeats", "latency_stats", "load_raw", "plan_cpus",
    "relative_spread", "run_client", "start_server", "stop_server", "summarize", "who",
]
