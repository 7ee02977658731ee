"""Published figures labkit compares against (shared/reference/ANCHORS.md), as data with their sources.

Each :class:`Anchor` is one published chart or table: its values as read off the source (most were
read off a chart, hence approximate), the unit they were published in, where they come from and
what to keep in mind when putting them next to a netns measurement on a 2-core machine. Plots
(:mod:`labkit.plots`) draw them as overlay traces whose legend names the source.

The published Service figures are requests/s or milliseconds on bare metal; labkit measures
microseconds between namespaces. Only *shapes* compare, so every overlay is normalised: a value
relative to the same series' value at its first point (1 service, or the baseline pod mode), and
a throughput (requests/s, transactions/s, packets/s) is inverted first (time per request ∝ 1/rate),
so that "higher is slower" holds for every trace on a relative-latency axis. :func:`relative`
does exactly that and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALIBABA = ("Alibaba Cloud blog, 'How Does Alibaba Cloud Build High-Performance Cloud-Native Pod Networks "
           "in Production Environments' (2020; charts also in Cilium's 'Cilium in Alibaba Cloud', 2020-10-09)")
CILIUM_16 = "Cilium 1.6 release blog (2019-08-20): HTTP GET latency through a Service"
KUBE_PROXY_NFT = "Kubernetes blog 'NFTables mode for kube-proxy' (2025-02-28): first-packet RTT"
HUAWEI = "Huawei, KubeCon EU 2017 'Scale Kubernetes to support 50,000 services' (via secondary sources)"


@dataclass(frozen=True)
class Anchor:
    """One published figure: ``series`` name -> {x: y} in ``unit``; x is services (or rules), or a
    pod mode. ``throughput`` says y is a rate (higher is faster), which :func:`relative` inverts."""

    key: str
    title: str  # what was measured, in the source's words
    short: str  # legend prefix, e.g. "Alibaba 2020 nginx"
    source: str
    unit: str
    series: dict[str, dict]
    x: str = "services"  # what the x values count: services, rules, mode, variant (of pod-modes)
    throughput: bool = False
    caveats: str = ""
    # which labkit datapath or pod mode each series corresponds to
    maps_to: dict[str, tuple[str, ...]] = field(default_factory=dict)
    metric: str = ""  # for pod-mode anchors: the labkit metric it sits next to (rr, udp_rr, bandwidth)


ANCHORS: dict[str, Anchor] = {}


def _add(a: Anchor) -> Anchor:
    ANCHORS[a.key] = a
    return a


# ------------------------------------------------------------------ Service datapaths

ALIBABA_NGINX = _add(Anchor(
    key="alibaba-nginx", title="Nginx performance test through a Service", short="Alibaba 2020 nginx",
    source=ALIBABA, unit="requests/s (probably)", throughput=True,
    series={"eBPF": {1: 28.1e3, 1000: 28.0e3, 5000: 28.0e3},
            "kube-proxy iptables": {1: 21.2e3, 1000: 19.0e3, 5000: 8.2e3},
            "kube-proxy IPVS": {1: 17.4e3, 1000: 17.3e3, 5000: 17.1e3}},
    maps_to={"eBPF": ("ebpf", "ebpf-tc"), "kube-proxy iptables": ("iptables-legacy", "iptables-nft"),
             "kube-proxy IPVS": ("ipvs",)},
    caveats="read off a chart (≈); unit not stated, probably requests/s; whole-request throughput on bare "
            "metal, not connection latency; drawn as 1/rate relative to 1 service"))

ALIBABA_IPTABLES = _add(Anchor(
    key="alibaba-iptables-rules", title="iptables Service access latency versus number of rules",
    short="Alibaba 2020 iptables latency", source=ALIBABA, unit="µs", x="rules",
    series={"kube-proxy iptables": {1: 575.0, 5000: 1000.0},
            # at 50,000 rules, by the position of the service in the chain
            "first": {1: 575.0, 50000: 1800.0}, "middle": {1: 575.0, 50000: 4200.0},
            "last": {1: 575.0, 50000: 7000.0}},
    maps_to={"kube-proxy iptables": ("iptables-legacy", "iptables-nft")},
    caveats="x counts iptables rules, not services (kube-proxy writes several rules per service); the "
            "50,000-rule first/middle/last values share the 1-rule baseline"))

CILIUM_HTTP = _add(Anchor(
    key="cilium-1.6-http", title="HTTP GET latency through a Service", short="Cilium 1.6 HTTP",
    source=CILIUM_16, unit="µs",
    series={"eBPF": {1: 300.0, 2768: 300.0},
            "kube-proxy iptables": {1: 290.0, 1000: 380.0, 2000: 455.0, 2768: 575.0}},
    maps_to={"eBPF": ("ebpf", "ebpf-tc"), "kube-proxy iptables": ("iptables-legacy", "iptables-nft")},
    caveats="read off a chart (≈); eBPF given as flat ≈300 µs from 1 to 2,768 services"))

KUBE_PROXY_NFT_RTT = _add(Anchor(
    key="kube-proxy-nft-rtt", title="iptables first-packet RTT", short="kube-proxy blog 2025 iptables RTT",
    source=KUBE_PROXY_NFT, unit="ms",
    series={"p50": {5000: 0.047, 10000: 0.062, 30000: 0.27}, "p99": {5000: 0.15, 10000: 0.26, 30000: 0.71}},
    maps_to={"p50": ("iptables-legacy", "iptables-nft"), "p99": ("iptables-legacy", "iptables-nft")},
    caveats="no 1-service value: relative figures are to 5,000 services; nftables p50 at 5k/10k was "
            "about iptables' p01 (no numbers published)"))

HUAWEI_UPDATE = _add(Anchor(
    key="huawei-update", title="time to add one iptables rule", short="Huawei 2017 rule add",
    source=HUAWEI, unit="s",
    series={"kube-proxy iptables": {5000: 11 * 60.0, 20000: 5 * 3600.0}},
    maps_to={"kube-proxy iptables": ("iptables-legacy", "iptables-nft")},
    caveats="2017 kube-proxy (full iptables-save/restore per change), 40k and 160k rules; secondary sources; "
            "IPVS updates reported as about a millisecond"))

# ------------------------------------------------------------------ pod network modes

# the study's pod-mode series, by the labkit mode that reproduces each; the first is the baseline the
# study's table is read relative to
ALIBABA_MODES_KEYS = {"eni-exclusive": "exclusive ENI", "eni-ipvlan": "shared ENI + IPVLAN",
                      "overlay": "Flannel VXLAN overlay"}
ALIBABA_BASELINE = next(iter(ALIBABA_MODES_KEYS))


def _modes(key: str, title: str, unit: str, values: tuple[float, float, float], metric: str,
           throughput: bool, caveat: str) -> Anchor:
    series = {"Alibaba": dict(zip(ALIBABA_MODES_KEYS, values))}
    return _add(Anchor(key=key, title=title, short=f"Alibaba 2020 {title}", source=ALIBABA, unit=unit,
                       series=series, x="mode", throughput=throughput, metric=metric,
                       caveats="read off a chart (≈); netperf-style on one bare-metal instance type; " + caveat))


ALIBABA_TCP_RR = _modes("alibaba-modes-tcp-rr", "TCP_RR", "transactions/s", (11.8e3, 10.3e3, 9.2e3), "rr", True,
                        "drawn as 1/rate relative to exclusive ENI")
ALIBABA_LATENCY = _modes("alibaba-modes-latency", "latency", "ms", (0.097, 0.117, 0.133), "rr", False,
                         "relative to exclusive ENI")
ALIBABA_UDP_PPS = _modes("alibaba-modes-udp-pps", "UDP PPS", "packets/s", (3.2e6, 1.7e6, 1.13e6), "udp_rr", True,
                         "a packet rate, not a request-response latency: drawn as 1/rate relative to exclusive ENI")
ALIBABA_BANDWIDTH = _modes("alibaba-modes-bandwidth", "bandwidth", "Gbit/s", (29.6, 29.5, 28.5), "bandwidth", False,
                           "relative to exclusive ENI")


# ------------------------------------------------------------------ past the study: host routing, netkit

KERNEL_REDIRECT_PEER = ("Linux kernel commit 'bpf: Add redirect_peer helper' (merged for "
                        "Linux 5.10, 2020-10), the commit message's netperf figures")
CILIUM_CNI_BENCH = ("Cilium documentation, 'CNI Performance Benchmark' (docs.cilium.io, operations/performance/"
                    "benchmark): netperf, 2 bare-metal nodes, 100G NIC, 1 process")
NETKIT_BLOG = "Isovalent blog 'Cilium netkit' (Cilium 1.16), citing ByteDance's proof of concept"

# which pod-modes variant each published configuration corresponds to; the baseline is veth with the
# node's kernel routing (labkit's ``veth``), and every overlay is drawn relative to it
VARIANT_BASELINE = "veth"


def _variants(key: str, title: str, short: str, source: str, unit: str, values: dict, metric: str,
              throughput: bool, caveat: str) -> Anchor:
    return _add(Anchor(key=key, title=title, short=short, source=source, unit=unit, series={"published": values},
                       x="variant", throughput=throughput, metric=metric, caveats=caveat))


REDIRECT_PEER_RR = _variants(
    "kernel-redirect-peer-rr", "pod to remote pod TCP_RR latency", "Linux 5.10 redirect_peer TCP_RR",
    KERNEL_REDIRECT_PEER, "µs", {"veth": 118.5, "veth+bpf-hr": 44.4}, "rr", False,
    "4 CPUs; the 'before' is bpf_redirect() into the pod's veth through the CPU backlog (not the node's "
    "routing), p50; the 'after' with bpf_redirect_peer() is a mean; relative to the before")
CILIUM_HOST_ROUTING_RR = _variants(
    "cilium-host-routing-rr", "TCP_RR across nodes", "Cilium CNI benchmark TCP_RR", CILIUM_CNI_BENCH,
    "transactions/s", {"veth": 34.0e3, "veth+bpf-hr": 45.3e3, "host-network": 47.9e3}, "rr", True,
    "read off a chart (≈); legacy host routing (the node's stack, iptables) as veth, eBPF host routing as "
    "veth+bpf-hr, node to node as host-network; drawn as 1/rate relative to legacy host routing")
CILIUM_HOST_ROUTING_CRR = _variants(
    "cilium-host-routing-crr", "TCP_CRR across nodes", "Cilium CNI benchmark TCP_CRR", CILIUM_CNI_BENCH,
    "connections/s", {"veth": 9.8e3, "veth+bpf-hr": 12.5e3, "host-network": 13.0e3}, "crr", True,
    "read off a chart (≈); as the TCP_RR figure; drawn as 1/rate relative to legacy host routing")
NETKIT_CPS = _variants(
    "netkit-bytedance-cps", "connections per second, netkit over veth", "ByteDance netkit CPS", NETKIT_BLOG,
    "connections/s relative to veth", {"veth": 1.0, "netkit": 1.12}, "crr", True,
    "one relative figure (+12 %), no absolute values or setup published; drawn as 1/rate relative to veth")


def for_variants(metric: str) -> list[Anchor]:
    """Published figures for the pod-modes variants (host routing, netkit, host network) next to a
    labkit metric (``rr``, ``crr``), each relative to veth with kernel routing."""
    return [a for a in ANCHORS.values() if a.x == "variant" and a.metric == metric]


def relative(anchor: Anchor, series: str, base=None, invert: bool = True) -> dict:
    """``series`` relative to its value at ``base`` (default: its first x). A throughput of requests
    (``throughput=True``) is inverted first unless ``invert`` is false, so that 2.0 means "twice as
    slow" as for a latency (next to a rate, a rate stays a rate); bandwidth stays a ratio of
    bandwidths (labkit's bandwidth bars are relative the same way)."""
    values = anchor.series[series]
    base = next(iter(values)) if base is None else base
    ref = values[base]
    if anchor.throughput and invert:
        return {x: ref / v for x, v in values.items()}
    return {x: v / ref for x, v in values.items()}


RATE_OF = {"crr-rate": "crr", "rr-rate": "rr", "udp-rr-rate": "udp_rr"}  # a labkit rate metric -> the latency metric beside it


def for_metric(metric: str) -> list[Anchor]:
    """Pod-mode anchors that sit next to a labkit metric (``rr``, ``udp_rr``, ``bandwidth``; beside the
    rates ``rr-rate`` and ``udp-rr-rate`` the published rates: TCP_RR, UDP PPS)."""
    if metric in RATE_OF:
        return [a for a in ANCHORS.values() if a.x == "mode" and a.metric == RATE_OF[metric] and a.throughput]
    return [a for a in ANCHORS.values() if a.x == "mode" and a.metric == metric]


def table():
    """Every anchor value as one tidy DataFrame (anchor, series, x, value, unit, source, caveats)."""
    import pandas as pd

    rows = [{"anchor": a.key, "figure": a.title, "series": s, "x": x, "value": v, "unit": a.unit,
             "source": a.source, "caveats": a.caveats}
            for a in ANCHORS.values() for s, vals in a.series.items() for x, v in vals.items()]
    return pd.DataFrame(rows)
