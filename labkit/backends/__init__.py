"""Backends realise a :class:`~labkit.spec.Spec`; they are chosen by name (``backend:`` in the spec).

- ``netns``: network namespaces on this host (:mod:`labkit.backends.netns`), the default.
- ``vagrant``: one VM per node (:mod:`labkit.backends.vagrant`).

A backend provides ``up(spec) -> Lab`` (nothing half built on failure), ``down(name)`` (removes every
object of that lab and only of that lab, even after the builder was SIGKILLed; safe twice) and the
per-lab operations :class:`labkit.lab.Lab` needs (``pod_netns``, ``node_context``), including what
experiments use to stay backend-neutral: ``datapath(spec, node, name)`` (a Service datapath of a
node), ``run_client(spec, pod, mode, host, port, …)`` and ``client_session(spec, pod, cpus)`` (the load
client in a pod, once or kept for many runs; raw samples land on this machine) and ``kernels(spec)``
(each node's kernel, for the results' manifest).
"""

from __future__ import annotations

import importlib

from ..errors import LabkitError

BACKENDS = {"netns": "labkit.backends.netns:NetnsBackend", "vagrant": "labkit.backends.vagrant:VagrantBackend"}


def get_backend(name: str):
    """An instance of the backend registered as ``name``."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise LabkitError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}") from None
    module, cls = target.split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise LabkitError(f"backend {name!r} is not available in this version of labkit") from None
        raise
    return getattr(mod, cls)()
