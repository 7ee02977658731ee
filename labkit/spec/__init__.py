"""The lab spec: one declarative description of a lab, which never touches the kernel.

- :mod:`.types`     plain frozen types (:class:`Spec`, :class:`Node`, :class:`Pod`, :class:`ServiceSpec`,
                    :class:`PolicySpec` …); constructing them does not validate
- :mod:`.load`      YAML text, a YAML file or a mapping into those types (:func:`load_spec`,
                    :func:`parse_spec`): structural problems, then validation, all raised at once
- :mod:`.validate`  :func:`validate` / :func:`problems`: every problem with its path and fix
- :mod:`.serialize` back to plain data and YAML

The same model loads from YAML or is built from Python objects; a spec built in Python is validated
by :func:`validate`, which :func:`labkit.lab.up` calls before anything is built.

Interface names derived from spec names (Linux allows 15 characters): ``lx-<pod>`` (a pod's
node-side interface) and ``<node>-e<i>`` (a node NIC's peer in the VPC router), hence pod and node
names of at most 12 characters and at most 8 ENIs per node.
"""

from __future__ import annotations

from .types import (BULK_BASE_PORT, DEFAULT_BULK_PEER_CIDR, DEFAULT_SERVICE_CIDR, MAX_BULK_RULES, MAX_ENIS,
                    MAX_NAME, MAX_POLICIES, MAX_SERVICES, POLICY_TYPES, PROTOCOLS, IPBlock, Node, Pod, PolicyPeer,
                    PolicyPort, PolicyRule, PolicySpec, ServerSpec, ServiceSpec, Spec)
from .load import load_spec, parse_spec  # noqa: E402  (after the types it builds)
from .validate import problems, validate  # noqa: E402

__all__ = ["Spec", "Node", "Pod", "ServerSpec", "ServiceSpec", "PolicySpec", "PolicyRule", "PolicyPeer", "PolicyPort", "IPBlock",
           "load_spec", "parse_spec", "validate", "problems", "PROTOCOLS", "POLICY_TYPES", "MAX_POLICIES",
           "MAX_BULK_RULES", "DEFAULT_BULK_PEER_CIDR", "BULK_BASE_PORT", "MAX_NAME", "MAX_ENIS", "MAX_SERVICES",
           "DEFAULT_SERVICE_CIDR"]
