"""Backends realise a :class:`~labkit.spec.Spec`; they are chosen by name (``backend:`` in the spec)
from :data:`BACKENDS`, into which each module or package here registers its class.

- ``netns``: network namespaces on this host (:mod:`labkit.backends.netns`), the default.
- ``vagrant``: one VM per node (:mod:`labkit.backends.vagrant`), each node built by labkit's agent
  inside the VM over SSH (:mod:`labkit.remote`).

Every backend implements :class:`~labkit.backends.base.Backend`.
"""

from __future__ import annotations

from ..registry import Registry
from .base import Backend

BACKENDS: Registry[type[Backend]] = Registry("backend", __name__)


def get_backend(name: str) -> Backend:
    """An instance of the backend registered as ``name``."""
    return BACKENDS.get(name)()


__all__ = ["BACKENDS", "Backend", "get_backend"]
