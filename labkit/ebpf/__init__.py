"""labkit's eBPF runtime: everything between a C entry file under ``bpf/`` and a running program,
shared by its two clients, the eBPF Service datapaths (:mod:`labkit.datapath.ebpf`: ``ebpf``
socket-LB, ``ebpf-tc``) and the eBPF NetworkPolicy engine (:mod:`labkit.policy.ebpf`). As Cilium
keeps ``pkg/bpf`` and ``pkg/datapath/loader`` apart from the programs and from ``pkg/maps/lbmap``,
the clients here only say what to load, where to attach it and what to write into its maps.

    :mod:`.libbpf`    libbpf's syscall wrappers through ctypes; program and attach type numbers
    :mod:`.maps`      map descriptions, and pinned maps read and written in batches (per-CPU too)
    :mod:`.loader`    sources flattened, compiled with bcc and pinned in a private bpffs; state files
    :mod:`.netlink`   rtnetlink round trips inside a namespace; tc filter and qdisc queries
    :mod:`.tc`        the tc clsact attach/detach lifecycle, one per client (priority, name prefix)
    :mod:`.cgroup`    cgroup v2 attach/detach, refusing cgroup roots

Every kernel object a client creates is named ``lk_…`` (the C's names); everything is pinned under
``<state_dir>/bpffs/<client folder>/{maps,progs}`` and never in /sys/fs/bpf.
"""
