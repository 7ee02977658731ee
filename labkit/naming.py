"""The one naming rule of everything a lab creates: every kernel object, folder and VM name starts
with the lab's prefix ``lk-<lab>``, so that ``labkit down`` (and the test run's leak check) finds a
lab's objects by name alone, also after a SIGKILL (kube-proxy's ``KUBE-`` chains, Mininet's lesson
of what not to do: ``killall`` on generic names).

- ``lk-<lab>``               cgroup folder (under the cgroup v2 mount), libvirt objects' prefix
- ``lk-<lab>.<obj>``         network namespaces: ``<obj>`` is a node, a pod or ``vpc`` (the router)
- ``lx-<pod>``               a pod's node-side interface (inside the node's namespace)
- ``/run/labkit/<lab>``      state folder and journal (:mod:`labkit.state`)
"""

from __future__ import annotations

import re

PREFIX = "lk-"
MAX_LAB_NAME = 20
LAB_NAME = re.compile(rf"^[a-z][a-z0-9-]{{0,{MAX_LAB_NAME - 1}}}$")
LAB_NAME_RULE = f"a lab name starts with a letter and has at most {MAX_LAB_NAME} lower-case letters, digits and '-'"


def lab_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a lab's name (None: it can). A name becomes part of paths and kernel
    object names, so nothing else gets in: no '/', '..', NUL or spaces."""
    if isinstance(name, str) and LAB_NAME.match(name):
        return None
    return f"lab name {name!r} is not valid: {LAB_NAME_RULE}"


def check_lab_name(name: object) -> str:
    """``name`` if it is a valid lab name; :class:`~labkit.errors.UsageError` otherwise."""
    problem = lab_name_problem(name)
    if problem:
        from .errors import UsageError

        raise UsageError(problem)
    return name  # type: ignore[return-value]


def lab_prefix(lab: str) -> str:
    """Prefix of every kernel object lab ``lab`` creates."""
    return f"{PREFIX}{lab}"


def netns_name(lab: str, obj: str) -> str:
    """The namespace of node, pod or router ``obj`` of ``lab``."""
    return f"{PREFIX}{lab}.{obj}"


def lab_of_netns(name: str) -> str | None:
    """The lab a namespace name belongs to (None: not a lab's)."""
    if not name.startswith(PREFIX) or "." not in name:
        return None
    return name[len(PREFIX):].split(".", 1)[0]


def node_iface(pod: str) -> str:
    """The node-side interface facing ``pod`` (veth-based modes)."""
    return f"lx-{pod}"


__all__ = ["PREFIX", "MAX_LAB_NAME", "LAB_NAME", "lab_name_problem", "check_lab_name", "lab_prefix", "netns_name",
           "lab_of_netns", "node_iface"]
