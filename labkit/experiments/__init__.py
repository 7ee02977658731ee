"""Experiments: functions with parameters, a CLI (``labkit run NAME``), results in the store.

- ``service-scale`` (:mod:`.service_scale`): Service latency versus number of services per datapath.
- ``pod-modes`` (:mod:`.pod_modes`): CRR/RR/UDP_RR/bandwidth per pod network mode, same and cross node.
- ``policy-scale`` (:mod:`.policy_scale`): latency and policy load/update time versus the number of
  NetworkPolicies per policy engine (``--datapaths`` names engines, ``--services`` numbers of policies).

Each experiment is a small class run by :func:`labkit.experiments.core.execute`; ``labkit run`` is
:mod:`labkit.commands.experiments`.
"""

from __future__ import annotations

from . import pod_modes, policy_scale, service_scale

# name -> (parameter class, run function)
EXPERIMENTS = {"service-scale": (service_scale.ServiceScaleParams, service_scale.run),
               "pod-modes": (pod_modes.PodModesParams, pod_modes.run),
               "policy-scale": (policy_scale.PolicyScaleParams, policy_scale.run)}

__all__ = ["EXPERIMENTS", "service_scale", "pod_modes", "policy_scale"]
