"""Nodes on other machines, driven over SSH: the same node, only elsewhere.

A remote node is a whole machine (a Vagrant VM, or a real host) that runs labkit's node runtime
(:mod:`labkit.node`) through labkit's agent (:mod:`.agent`, ``python3 -m labkit.remote.agent``); this
side drives it with the interface every backend gives (Mininet's cluster edition: ``RemoteMixin``
overrides ``_popen`` and the ``Node`` API stays). Nothing here knows how the machine came to exist.

- :mod:`.ssh`       :class:`~.ssh.Machine`: commands, streams and file copies over one multiplexed SSH
                    connection
- :mod:`.payload`   what is copied to the machine (labkit, pyroute2, the native helpers, the spec) and
                    the paths it lands at (``/opt/labkit``)
- :mod:`.agent`     the agent, run on the machine: build a node, serve datapath requests, run in a pod
- :mod:`.wire`      the JSON form of service tables and change sets between the two sides
- :mod:`.node`      :class:`~.node.RemoteNode`: a node of a lab on a machine, seen from here (pods,
                    its datapaths as :class:`~.node.RemoteDatapath`, the load client as
                    :class:`~.node.RemoteClientSession`)
"""
