"""labkit: reproduce and extend the Terway / Cilium pod-network and Service-datapath study.

A lab is described by a :class:`labkit.spec.Spec` (pure data, validated, never touches the kernel)
and realised by a backend chosen by name (``netns`` on this host, ``vagrant`` with one VM per node).
Service datapaths (kube-proxy iptables / IPVS / nftables, eBPF socket-LB and tc) implement one
interface in :mod:`labkit.datapath`.
"""

__version__ = "0.1.0"
