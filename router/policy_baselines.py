"""Baseline policies: what transfer_aware is measured against, in the router and in the simulator.

Each has the one policy signature ``(request, snapshot, cost, config) -> RoutingDecision``, never
rejects (except when no decode instance is up), and fills the decision's predictions with the same
estimates transfer_aware uses, so simulated predictions are comparable across policies. With no
prefill instance up, every policy prefills on the chosen decode instance.

- ``round_robin``: the ``snapshot.rr_cursor``-th instance of each pool (the caller advances it).
- ``least_loaded``: prefill with the fewest outstanding prefill tokens; decode with the fewest
  requests (ties: fewest used blocks). Counts only, no cost model (a gateway's least-request).
- ``dynamo``: NVIDIA Dynamo's KV router cost, per pool:
  ``cost = overlap_weight * prefill_blocks + active_blocks``, where prefill_blocks are the blocks
  still to compute there (outstanding prompt work plus this prompt's uncached blocks) and
  active_blocks the KV blocks in use; lowest cost wins, or a softmax sample when
  ``dynamo_temperature`` > 0 (costs normalised by their range, seeded by the snapshot). On the
  decode pool, the "prefill" blocks are the prompt blocks it must receive.

Mooncake's scheduling ablation (FAST'25, section "KVCache-centric scheduling"): the prefill choice
differs, the decode instance is the one with the least predicted pressure (KV use, TBT / SLO).

- ``random``: uniform prefill and decode, from ``random.Random`` seeded by the snapshot's seed
  and the request id (reproducible in the simulator, varied across requests).
- ``load_balanced``: prefill with the shortest predicted queue wait.
- ``local_cache_aware``: prefill minimising queue wait + prefill time of the tokens not cached on
  that instance itself.
- ``global_cache_aware``: as local, but when some instance (either pool) holds a prefix more than
  ``kvcache_balancing_threshold`` times longer than the candidate's own, the candidate may first
  fetch that prefix over the link from it (paying the transfer) and prefill only the rest, when
  that is predicted faster (Mooncake's threshold rule plus a sanity check on the link). The
  decision names the source in ``prefix_source_id``; the data plane has no instance-to-instance
  prefix fetch yet, so this policy is for the simulator.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable, Sequence

from router.cost_model import CostModel
from router.estimates import decode_estimate, effective_cached, evaluate_pair, prefill_queue_s
from router.routing_config import RoutingConfig
from router.snapshot import (
    REJECT_UNAVAILABLE,
    ClusterSnapshot,
    InstanceState,
    RoutingDecision,
    RoutingRequest,
)


def _rng(request: RoutingRequest, snapshot: ClusterSnapshot) -> random.Random:
    return random.Random((snapshot.seed * 0x9E3779B1) ^ zlib.crc32(request.request_id.encode()))


def _argmin(items: Sequence[InstanceState], key: Callable[[InstanceState], object]) -> InstanceState:
    return min(items, key=key)  # min keeps the first of equals: deterministic in pool order


def _route_with(policy: str, request: RoutingRequest, snapshot: ClusterSnapshot, cost: CostModel,
                config: RoutingConfig,
                choose: Callable[[list[InstanceState], list[InstanceState]], tuple[InstanceState | None, InstanceState]]
                ) -> RoutingDecision:
    prefills = [p for p in snapshot.prefill if not p.draining]
    decodes = [d for d in snapshot.decode if not d.draining]
    if not decodes:
        return RoutingDecision.reject(request.request_id, policy, REJECT_UNAVAILABLE, explain="no decode instance")
    prefill, decode = choose(prefills, decodes)
    est = evaluate_pair(request, snapshot, cost, config, prefill if prefills else None, decode)
    return RoutingDecision(
        request_id=request.request_id, policy=policy, decode_id=decode.instance_id, prefill_id=est.prefill_id,
        predicted_ttft_s=est.ttft_s, predicted_tbt_s=est.decode.tbt_s, predicted_transfer_s=est.transfer_s,
        num_cached_tokens=est.num_cached_tokens, explain=est.explain(policy))


def _first_or_none(items: list[InstanceState], pick: Callable[[list[InstanceState]], InstanceState]
                   ) -> InstanceState | None:
    return pick(items) if items else None


def round_robin(request: RoutingRequest, snapshot: ClusterSnapshot, cost: CostModel,
                config: RoutingConfig) -> RoutingDecision:
    k = snapshot.rr_cursor
    return _route_with("round_robin", request, snapshot, cost, config,
                       lambda ps, ds: (_first_or_none(ps, lambda xs: xs[k % len(xs)]), ds[k % len(ds)]))


def least_loaded(request: RoutingRequest, snapshot: ClusterSnapshot, cost: CostModel,
                 config: RoutingConfig) -> RoutingDecision:
    def choose(ps, ds):
        p = _first_or_none(ps, lambda xs: _argmin(xs, lambda x: (x.num_outstanding_prefill_tokens, x.num_requests)))
        d = _argmin(ds, lambda x: (x.num_requests, x.num_used_blocks + x.num_inflight_blocks))
        return p, d
    return _route_with("least_loaded", request, snapshot, cost, config, choose)


def _dynamo_pick(costs: list[float], rng: random.Random, temperature: float) -> int:
    lo = min(costs)
    if temperature <= 0:
        return costs.index(lo)
    spread = max(max(costs) - lo, 1e-9)
    weights = [math.exp(-(c - lo) / spread / temperature) for c in costs]
    return rng.choices(range(len(costs)), weights=weights)[0]


def dynamo(request: RoutingRequest, snapshot: ClusterSnapshot, cost: CostModel,
           config: RoutingConfig) -> RoutingDecision:
    w, prompt = config.dynamo_overlap_weight, request.num_prompt_tokens
    rng = _rng(request, snapshot)

    def choose(ps, ds):
        p = None
        if ps:
            costs = [w * (x.num_outstanding_prefill_tokens + prompt - effective_cached(snapshot, x.instance_id, prompt))
                     / x.block_size + x.num_used_blocks + x.num_inflight_blocks for x in ps]
            p = ps[_dynamo_pick(costs, rng, config.dynamo_temperature)]
        costs = [w * (prompt - effective_cached(snapshot, x.instance_id, prompt)) / x.block_size
                 + x.num_used_blocks + x.num_inflight_blocks for x in ds]
        return p, ds[_dynamo_pick(costs, rng, config.dynamo_temperature)]
    return _route_with("dynamo", request, snapshot, cost, config, choose)


def random_policy(request: RoutingRequest, snapshot: ClusterSnapshot, cost: CostModel,
                  config: RoutingConfig) -> RoutingDecision:
    rng = _rng(request, snapshot)
    return _route_with("random", request, snapshot, cost, config,
                       lambda ps, ds: (_first_or_none(ps, rng.choice), rng.choice(ds)))


def _least_pressure(request: RoutingRequest, decodes: list[InstanceState], cost: CostModel,
                    config: RoutingConfig) -> InstanceState:
    return _argmin(decodes, lambda d: decode_estimate(d, request, cost, config, 0.0).pressure)


def load_balanced(request: RoutingRequest, snapshot: ClusterSnapshot, cost: CostModel,
                  config: RoutingConfig) -> RoutingDecision:
    return _route_with("load_balanced", request, snapshot, cost, config, lambda ps, ds: (
        _first_or_none(ps, lambda xs: _argmin(xs, lambda x: prefill_queue_s(x, cost, config))),
        _least_pressure(request, ds, cost, config)))


def _local_ttft(p: InstanceState, request: RoutingRequest, snapshot: ClusterSnapshot, cost: CostModel,
                config: RoutingConfig) -> float:
    cached = effective_cached(snapshot, p.instance_id, request.num_prompt_tokens)
    return prefill_queue_s(p, cost, config) + cost.prefill_time(request.num_prompt_tokens - cached, cached)


def local_cache_aware(request: RoutingRequest, snapshot: ClusterSnapshot, cost: CostModel,
                      config: RoutingConfig) -> RoutingDecision:
    return _route_with("local_cache_aware", request, snapshot, cost, config, lambda ps, ds: (
        _first_or_none(ps, lambda xs: _argmin(xs, lambda x: _local_ttft(x, request, snapshot, cost, config))),
        _least_pressure(request, ds, cost, config)))


def global_cache_aware(request: RoutingRequest, snapshot: ClusterSnapshot, cost: CostModel,
                       config: RoutingConfig) -> RoutingDecision:
    policy, prompt = "global_cache_aware", request.num_prompt_tokens
    prefills = [p for p in snapshot.prefill if not p.draining]
    if not prefills:
        return _route_with(policy, request, snapshot, cost, config,
                           lambda ps, ds: (None, _least_pressure(request, ds, cost, config)))
    live = {x.instance_id for x in snapshot.prefill + snapshot.decode if not x.draining}
    holders = [(effective_cached(snapshot, i, prompt), i) for i in snapshot.cached_tokens if i in live]
    best_len, source = max(holders, default=(0, None))
    best: tuple[float, InstanceState, float, int, str | None] | None = None
    for p in prefills:
        own = effective_cached(snapshot, p.instance_id, prompt)
        ttft, fetch, cached, src = _local_ttft(p, request, snapshot, cost, config), 0.0, own, None
        if source is not None and source != p.instance_id and best_len > config.kvcache_balancing_threshold * own:
            fetch = snapshot.links.get(source, p.instance_id).transfer_time((best_len - own) * snapshot.kv_bytes_per_token)
            remote = fetch + prefill_queue_s(p, cost, config) + cost.prefill_time(prompt - best_len, best_len)
            if remote < ttft:
                ttft, cached, src = remote, best_len, source
            else:
                fetch = 0.0
        if best is None or ttft < best[0]:
            best = (ttft, p, fetch, cached, src)
    assert best is not None
    decision = _route_with(policy, request, snapshot, cost, config,
                           lambda ps, ds: (best[1], _least_pressure(request, ds, cost, config)))
    if decision.rejected or best[4] is None:
        return decision
    extra = best[0] - _local_ttft(best[1], request, snapshot, cost, config)  # fetch - compute saved
    return RoutingDecision(
        request_id=decision.request_id, policy=policy, decode_id=decision.decode_id, prefill_id=decision.prefill_id,
        predicted_ttft_s=decision.predicted_ttft_s + extra, predicted_tbt_s=decision.predicted_tbt_s,
        predicted_transfer_s=decision.predicted_transfer_s, num_cached_tokens=best[3], prefix_source_id=best[4],
        explain=f"{decision.explain} fetch {best[3]} tokens from {best[4]} in {best[2]:.3f}s")
