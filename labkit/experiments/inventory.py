"""An experiment's labs on the ``hosts`` backend: the hosts of an inventory file, given to each lab.

A user writes one inventory file for their machines (README, "Run it on your own machines"): its
``hosts:`` mapping, in order, each host with its ssh target, management interface and the NICs it lends
(``eth0``, ``eni1`` … to an interface name or a MAC), and optionally an ``ssh_config`` beside it. An
experiment's lab names its own nodes (``n0``; ``node1`` and ``node2``): :func:`lab_inventory` gives
them the file's hosts in order from the ``first``-th, each cut to the NICs its node uses, so that a
host lending more NICs than a lab needs is not refused for the ones it does not.
"""

from __future__ import annotations

from pathlib import Path


def inventory_file(path: str) -> dict:
    """The inventory file's data: a ``hosts:`` mapping that is not empty (ValueError naming the file)."""
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"inventory file {file} does not exist")
    data = yaml.safe_load(file.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("hosts"), dict) or not data["hosts"]:
        raise ValueError(f"{file} holds no 'hosts:' mapping")
    return data


def host_entries(path: str) -> list[tuple[str, dict]]:
    """The hosts of an inventory file, in its order (name, entry as written)."""
    return list(inventory_file(path)["hosts"].items())


def lab_nics(enis: int) -> list[str]:
    """The NICs a node with ``enis`` ENIs has: ``eth0``, ``eni1`` … (what its host must lend)."""
    return ["eth0"] + [f"eni{i}" for i in range(1, enis + 1)]


def lab_inventory(path: str, nodes: dict[str, int], first: int = 0) -> dict:
    """The inventory of a lab whose nodes (name -> its ENI count) run on the file's hosts from the
    ``first``-th on, in order; each host's NICs cut to ``eth0`` and the node's ENIs. The file's
    ``ssh_config`` is made absolute (it is read beside the file)."""
    data = inventory_file(path)
    entries = list(data["hosts"].values())[first:first + len(nodes)]
    if len(entries) < len(nodes):
        raise ValueError(f"{path} has {len(data['hosts'])} hosts; {first + len(nodes)} are needed")
    hosts = {}
    for (node, enis), entry in zip(nodes.items(), entries):
        wanted = lab_nics(enis)
        if isinstance(entry, dict):
            entry = {**entry, "nics": {n: v for n, v in (entry.get("nics") or {}).items() if n in wanted}}
        hosts[node] = entry  # anything else: the spec's validation names it
    out = {"hosts": hosts}
    if data.get("ssh_config"):
        out["ssh_config"] = str((Path(path).expanduser().resolve().parent / data["ssh_config"]).resolve())
    return out


def inventory_problems(backend: str, path: str | None, hosts_needed: int, why: str) -> list[str]:
    """An experiment's ``inventory`` parameter checked: given with ``--backend hosts`` and only then, a
    file that reads, with ``hosts_needed`` hosts at least (``why``: what needs them)."""
    if (backend == "hosts") != (path is not None):
        return ["inventory: give an inventory file with --backend hosts, and only then"]
    if path is None:
        return []
    try:
        hosts = host_entries(path)
    except Exception as exc:  # noqa: BLE001 - any reason the file cannot serve, said with its field
        return [f"inventory: {exc}"]
    if len(hosts) < hosts_needed:
        return [f"inventory: {why} need {hosts_needed} hosts, {path} has {len(hosts)}"]
    return []
