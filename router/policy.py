"""Routing policies by name, all with one signature, all pure.

    route(request: RoutingRequest, snapshot: ClusterSnapshot, cost: CostModel,
          config: RoutingConfig) -> RoutingDecision

A policy reads only its arguments, returns a new decision, and keeps no state: the router server,
the simulator and the tests call the same functions. What looks like state (the round-robin
cursor, the random seed) travels in the snapshot. ``route`` dispatches on ``config.policy``.

| name | module | picks |
|---|---|---|
| transfer_aware | policy_transfer_aware | the (prefill, decode) pair, or local prefill, with the best predicted TTFT meeting TTFT, TBT and KV; early rejection |
| round_robin, least_loaded, dynamo | policy_baselines | the usual load balancers, and NVIDIA Dynamo's KV router cost |
| random, load_balanced, local_cache_aware, global_cache_aware | policy_baselines | Mooncake's scheduling ablation |

A new policy is a function with the signature above, registered in :data:`POLICIES` and named in
``routing_config.POLICY_NAMES``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from common.errors import ConfigError
from router.cost_model import CostModel
from router.policy_baselines import (
    dynamo,
    global_cache_aware,
    least_loaded,
    load_balanced,
    local_cache_aware,
    random_policy,
    round_robin,
)
from router.policy_transfer_aware import transfer_aware, transfer_aware_reference
from router.routing_config import POLICY_NAMES, RoutingConfig
from router.snapshot import ClusterSnapshot, RoutingDecision, RoutingRequest

RoutePolicy = Callable[[RoutingRequest, ClusterSnapshot, CostModel, RoutingConfig], RoutingDecision]

POLICIES: Mapping[str, RoutePolicy] = MappingProxyType({
    "transfer_aware": transfer_aware,
    "round_robin": round_robin,
    "least_loaded": least_loaded,
    "dynamo": dynamo,
    "random": random_policy,
    "load_balanced": load_balanced,
    "local_cache_aware": local_cache_aware,
    "global_cache_aware": global_cache_aware,
})
assert tuple(POLICIES) == POLICY_NAMES, "register every policy in routing_config.POLICY_NAMES too"


def get_policy(name: str) -> RoutePolicy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ConfigError(f"unknown policy {name!r}; choose from {POLICY_NAMES}", field="policy") from None


def route(request: RoutingRequest, snapshot: ClusterSnapshot, cost: CostModel, config: RoutingConfig) -> RoutingDecision:
    """Route one request with the policy ``config`` names."""
    return POLICIES[config.policy](request, snapshot, cost, config)


__all__ = ["POLICIES", "RoutePolicy", "get_policy", "route", "transfer_aware_reference"]
