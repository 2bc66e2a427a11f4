"""BASELINE: early rejection on the *current* load, wrapped around the real routing policy.

Mooncake (Qin et al., FAST'25, "Overload-oriented scheduling") contrasts two ways to refuse work
at arrival:

- **early rejection** (this module, the baseline): decide with the load the cluster has *now*:
  the chosen prefill instance's queue and the chosen decode instance's current batch and KV;
- **prediction-based early rejection**: decide with the decode load predicted for when the
  prefill finishes (requests finishing meanwhile, the growth of those that stay, the request's
  own predicted lifetime). That is ``transfer_aware`` with ``RoutingConfig.reject``, in the
  router; the simulator runs it unchanged.

The router has no current-load rejection mode, so the baseline lives here, clearly labelled:
:func:`early_rejection_route` routes with the real policy (rejection off), then refuses the
request when, on the chosen pair, the predicted TTFT (queue + prefill + transfer, now) misses the
TTFT SLO, the decode step with the request added to the batch and context the instance has
*now* (nothing finishes, nothing grows) misses the TBT SLO, or the blocks in use and in flight now plus the request's prompt
exceed the decode instance's usable KV. It reads the same snapshot and estimates as the router.
"""

from __future__ import annotations

import dataclasses

from router.cost_model import CostModel
from router.estimates import calibration
from router.policy import route
from router.routing_config import RoutingConfig
from router.snapshot import (
    REJECT_KV,
    REJECT_TBT,
    REJECT_TTFT,
    ClusterSnapshot,
    RoutingDecision,
    RoutingRequest,
)

NAME = "early_rejection"


def early_rejection_route(request: RoutingRequest, snapshot: ClusterSnapshot, cost: CostModel,
                          config: RoutingConfig) -> RoutingDecision:
    """The policy's decision, refused on the current load of the chosen pair (see the module docstring)."""
    decision = route(request, snapshot, cost, dataclasses.replace(config, reject=False)
                     if config.reject else config)
    if decision.rejected or decision.decode_id is None:
        return decision
    slo = config.slo_for(request)
    decode = snapshot.instance(decision.decode_id)
    total = decode.num_total_blocks or cost.kv_capacity_blocks(decode.block_size)
    usable = int(total * (1.0 - config.kv_reserve_fraction))
    need = decode.num_used_blocks + decode.num_inflight_blocks + -(-request.num_prompt_tokens // decode.block_size)
    context = decode.num_used_blocks * decode.block_size + decode.num_inflight_tokens + request.num_prompt_tokens
    tbt_now = cost.decode_step_time(decode.num_requests + 1, context) * calibration(decode, cost, config)
    reason = ""
    if usable > 0 and need > usable:
        reason = REJECT_KV
    elif tbt_now > slo.tbt_s * config.slo_margin:
        reason = REJECT_TBT
    elif decision.predicted_ttft_s > slo.ttft_s * config.slo_margin:
        reason = REJECT_TTFT
    if not reason:
        return decision
    return RoutingDecision.reject(request.request_id, NAME, reason, retry_after_s=config.min_retry_after_s,
                                  explain=f"{reason} on current load: {decision.explain}",
                                  predicted_ttft_s=decision.predicted_ttft_s, predicted_tbt_s=tbt_now)
