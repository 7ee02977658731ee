"""The ``vagrant`` backend, one VM per node, split along its seams:

- :mod:`.backend`  :class:`VagrantBackend`: the lab's host objects, ``vagrant up``, the nodes
- :mod:`.names`    every name a VM lab uses on the host, fixed MACs and management addresses
- :mod:`.libvirt`  libvirtd/virtlogd started and stopped for labs, transient networks, KVM or TCG
- :mod:`.up`       ``vagrant up`` in the background, its log and milestones
- :mod:`.box`      the Debian box, built offline from the host's mirror (``labkit box``)

Each VM is a remote node (:mod:`labkit.remote`): the same node runtime as the netns backend, run by
labkit's agent inside the VM over SSH.
"""

from __future__ import annotations

from .backend import TB_CACHE_MIB, VagrantBackend
from .names import VmNames, vagrant_dir, vagrantfile_source

__all__ = ["VagrantBackend", "VmNames", "TB_CACHE_MIB", "vagrant_dir", "vagrantfile_source"]
