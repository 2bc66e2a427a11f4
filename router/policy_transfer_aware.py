"""transfer_aware: pick the (prefill, decode) pair with the best predicted TTFT that meets the SLOs.

The Mooncake approach (Qin et al., FAST'25, "KVCache-centric scheduling"), extended to choose the
pair jointly. For every option, a prefill instance P with a decode instance D, or D alone
("local": conditional disaggregation), it predicts

    TTFT = queue wait on P + prefill of the prompt tokens not cached on P
           + KV transfer P -> D of the tokens D does not hold (latency + bytes / link bandwidth),

and the decode instance's state when the request arrives there (TTFT from now): TBT with the
request added must stay under the TBT SLO, and the request's predicted lifetime in KV (prompt +
predicted output) must fit next to the predicted growth of everything already there. The
objective is ``TTFT / ttft_slo + decode_weight * pressure(D)``, where pressure is the larger of
peak KV use and TBT / SLO (so among similar TTFTs, the less loaded decode instance wins). Options
missing an SLO rank after every option meeting all of them (estimates.INFEASIBLE per miss).

Local prefill on D is an option when the decode worker would do it anyway (its own rule:
few uncached tokens, or mostly cached there; the remote options for D are then dropped), when there
is no prefill instance, or, with ``local_prefill_by_cost``, when it costs the requests decoding on D
less than it saves this one: a decode step carrying one prefill chunk stays under
``local_prefill_tbt_slack * tbt_slo`` (no TBT cost), or the TTFT it saves against the best remote
option, in units of the TTFT SLO, exceeds the delay its chunks add to each request decoding on D,
in units of the TBT SLO. So a decode-side cost never outweighs a larger TTFT difference: when the
prefill pool is backed up, a prompt of a few hundred uncached tokens is not left queueing for
seconds behind long ones to spare a busy decode batch one slower step. Local TTFT counts the
decode steps the prompt's chunks share.

Early rejection: if the best option misses an SLO and ``config.reject``, the decision is a reject
(reason kv_capacity / tbt_slo / ttft_slo) with ``retry_after_s`` from the predicted drain time.

:func:`transfer_aware` evaluates all pairs at once with numpy (P x D matrices);
:func:`transfer_aware_reference` loops over options with the scalar ``estimates.evaluate_pair``;
the tests check that they agree. The fast path memoises the request-independent numbers of each
instance and pool by object identity (InstanceState and the pool tuples are immutable, and
ClusterState reuses them until something changes): a cache, invisible in the results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from router.cost_model import CostModel
from router.estimates import (
    INFEASIBLE,
    LocalPrefill,
    PairEstimate,
    calibration,
    drain_time,
    evaluate_pair,
    local_prefill,
    prefill_queue_s,
)
from router.routing_config import RoutingConfig
from router.snapshot import (
    REJECT_KV,
    REJECT_TBT,
    REJECT_TTFT,
    REJECT_UNAVAILABLE,
    SLO,
    ClusterSnapshot,
    InstanceState,
    RoutingDecision,
    RoutingRequest,
)

NAME = "transfer_aware"


def _local_allowed(est: PairEstimate, local: LocalPrefill, best_remote_ttft_s: float, snapshot: ClusterSnapshot,
                   config: RoutingConfig, slo: SLO) -> bool:
    if est.local_reason in ("short", "cached") or not any(not p.draining for p in snapshot.prefill):
        return True
    if not config.local_prefill_by_cost:
        return False
    if local.stall_s <= config.local_prefill_tbt_slack * slo.tbt_s:
        return True
    return (best_remote_ttft_s - est.ttft_s) / slo.ttft_s > local.delay_s / slo.tbt_s


def _decide(request: RoutingRequest, est: PairEstimate, decode: InstanceState, cost: CostModel,
            config: RoutingConfig, policy: str = NAME) -> RoutingDecision:
    """The decision for the chosen option: accepted, or an early rejection with Retry-After."""
    slo = config.slo_for(request)
    d = est.decode
    explain = est.explain(policy)
    if config.reject and est.violations(slo, config):
        if not d.kv_ok:
            reason = REJECT_KV
            own = -(-(request.num_prompt_tokens + request.predicted_output_tokens) // decode.block_size)
            retry = drain_time(decode, (d.peak_blocks - d.capacity_blocks) / max(1, d.peak_blocks - own),
                               cost, config)
        elif not d.tbt_ok:
            reason = REJECT_TBT
            retry = drain_time(decode, 1.0 - slo.tbt_s * config.slo_margin / d.tbt_s, cost, config)
        else:
            reason = REJECT_TTFT
            retry = est.ttft_s - slo.ttft_s * config.slo_margin
        return RoutingDecision.reject(request.request_id, policy, reason, retry_after_s=config.clamp_retry(retry),
                                      explain=f"{reason}: {explain}", predicted_ttft_s=est.ttft_s,
                                      predicted_tbt_s=d.tbt_s)
    return RoutingDecision(
        request_id=request.request_id, policy=policy, decode_id=est.decode_id, prefill_id=est.prefill_id,
        predicted_ttft_s=est.ttft_s, predicted_tbt_s=d.tbt_s, predicted_transfer_s=est.transfer_s,
        num_cached_tokens=est.num_cached_tokens, explain=explain)


def transfer_aware_reference(request: RoutingRequest, snapshot: ClusterSnapshot, cost: CostModel,
                             config: RoutingConfig) -> RoutingDecision:
    """The slow path: every option through the scalar estimates. Same decisions as transfer_aware."""
    slo = config.slo_for(request)
    prefills = [p for p in snapshot.prefill if not p.draining]
    decodes = [d for d in snapshot.decode if not d.draining]
    if not decodes:
        return RoutingDecision.reject(request.request_id, NAME, REJECT_UNAVAILABLE, explain="no decode instance")
    locals_ = [evaluate_pair(request, snapshot, cost, config, None, d) for d in decodes]
    remotes = [[evaluate_pair(request, snapshot, cost, config, p, d) for p in prefills]
               if local.local_reason not in ("short", "cached") else [] for local, d in zip(locals_, decodes)]
    best_remote = min((est.ttft_s for options in remotes for est in options), default=math.inf)
    best: tuple[float, PairEstimate, InstanceState] | None = None
    for d, local, options in zip(decodes, locals_, remotes):
        if _local_allowed(local, local_prefill(d, request, snapshot, cost, config), best_remote, snapshot, config,
                          slo):
            options = [local, *options]
        for est in options:
            score = est.score(slo, config)
            if best is None or score < best[0]:
                best = (score, est, d)
    assert best is not None
    return _decide(request, best[1], best[2], cost, config)


@dataclass(frozen=True, slots=True)
class _Pools:
    """What transfer_aware needs of the pools that does not depend on the request (arrays over instances)."""

    prefills: tuple[InstanceState, ...]
    decodes: tuple[InstanceState, ...]
    prefill_ids: tuple[str, ...]
    decode_ids: tuple[str, ...]
    prefill_wait: np.ndarray  # queue wait before a new prompt starts
    n: np.ndarray  # requests there or on their way
    ctx: np.ndarray  # context tokens held or landing
    remaining: np.ndarray  # predicted output tokens still to generate
    calib: np.ndarray
    step_now: np.ndarray
    committed: np.ndarray  # used + in-flight + predicted growth blocks
    capacity: np.ndarray  # blocks available to predicted demand
    block_size: np.ndarray
    local_queue: np.ndarray  # prefill queue wait on the decode instance itself
    busy: np.ndarray  # decoding already: a local prefill shares its steps
    finish_rate: np.ndarray  # fraction of the batch finishing per second (0 without predictions)
    growth_rate: np.ndarray  # context tokens generated per second
    chunk_stall: np.ndarray  # what a queued local prefill chunk adds to each step until local_queue drains


_Row = tuple[float, ...]
_ROW_MEMO: dict[int, tuple[InstanceState, CostModel, RoutingConfig, _Row]] = {}
_MEMO_LIMIT = 4096


def _instance_row(d: InstanceState, cost: CostModel, config: RoutingConfig) -> _Row:
    """The request-independent numbers of one instance (a prefill instance uses only the last, its
    queue wait), memoised per (immutable) InstanceState.

    ClusterState reuses an instance's state object until a report or a decision changes it, so
    each instance is worked out once per change instead of once per request. The memo holds the
    objects it is keyed by (by id), so an id cannot be reused while its entry lives.
    """
    hit = _ROW_MEMO.get(id(d))
    if hit is not None and hit[0] is d and hit[1] is cost and hit[2] is config:
        return hit[3]
    n = d.num_requests
    ctx = d.num_used_blocks * d.block_size + d.num_inflight_tokens
    calib = calibration(d, cost, config)
    step_now = (cost.decode_base_s + cost.decode_per_request_s * n + cost.decode_per_context_token_s * ctx
                ) * calib if n > 0 else 0.0
    total = d.num_total_blocks or cost.kv_capacity_blocks(d.block_size)
    row = (n, ctx, d.num_predicted_remaining_tokens, calib, step_now,
           d.num_used_blocks + d.num_inflight_blocks + d.num_predicted_growth_blocks,
           int(total * (1.0 - config.kv_reserve_fraction)), d.block_size,
           cost.queue_time(d.num_queued_prefill_tokens, d.num_waiting, config.chunk_tokens),
           float(d.num_running + d.num_inflight_requests > 0 and step_now > 0),
           prefill_queue_s(d, cost, config),
           cost.prefill_marginal_time(min(d.num_queued_prefill_tokens, config.chunk_tokens)))
    if len(_ROW_MEMO) >= _MEMO_LIMIT:
        _ROW_MEMO.clear()
    _ROW_MEMO[id(d)] = (d, cost, config, row)
    return row


def _build_pools(prefill_pool: tuple[InstanceState, ...], decode_pool: tuple[InstanceState, ...], cost: CostModel,
                 config: RoutingConfig) -> _Pools:
    prefills = tuple(p for p in prefill_pool if not p.draining)
    decodes = tuple(d for d in decode_pool if not d.draining)
    rows = np.array([_instance_row(d, cost, config) for d in decodes], dtype=np.float64).reshape(len(decodes), 12)
    waits = np.array([_instance_row(p, cost, config)[10] for p in prefills], dtype=np.float64)
    n, remaining, step_now = rows[:, 0], rows[:, 2], rows[:, 4]
    live = (n > 0) & (remaining > 0) & (step_now > 0)
    safe_remaining, safe_step = np.where(live, remaining, 1.0), np.where(live, step_now, 1.0)
    finish_rate = np.where(live, n / (2.0 * safe_remaining * safe_step), 0.0)  # 1 / (2 * R/n * step)
    growth_rate = np.where(live, n / safe_step, 0.0)
    return _Pools(prefills, decodes, tuple(p.instance_id for p in prefills), tuple(d.instance_id for d in decodes),
                  waits, *rows.T[:9], rows[:, 9] > 0, finish_rate, growth_rate, rows[:, 11])


_POOL_MEMO: dict[tuple[int, int, int, int], tuple[object, ...]] = {}
_POOL_MEMO_LIMIT = 16


def _pools(snapshot: ClusterSnapshot, cost: CostModel, config: RoutingConfig) -> _Pools:
    """_build_pools, memoised on the identity of the (immutable) pool tuples, cost model and config."""
    key = (id(snapshot.prefill), id(snapshot.decode), id(cost), id(config))
    hit = _POOL_MEMO.get(key)
    if hit is not None and hit[0] is snapshot.prefill and hit[1] is snapshot.decode and hit[2] is cost \
            and hit[3] is config:
        return hit[4]  # type: ignore[return-value]
    pools = _build_pools(snapshot.prefill, snapshot.decode, cost, config)
    if len(_POOL_MEMO) >= _POOL_MEMO_LIMIT:
        _POOL_MEMO.clear()
    _POOL_MEMO[key] = (snapshot.prefill, snapshot.decode, cost, config, pools)
    return pools


def _tbt(a: _Pools, cost: CostModel, prompt: int, horizon: np.ndarray) -> np.ndarray:
    """decode_tbt for every decode instance (last axis) at every horizon; mirrors estimates.decode_tbt."""
    h = np.maximum(horizon, 0.0)
    finished = np.minimum(1.0, h * a.finish_rate)
    grown = np.minimum(a.remaining, h * a.growth_rate)
    batch = a.n * (1.0 - finished) + 1.0
    context = (a.ctx + grown) * (1.0 - finished) + prompt
    step = (cost.decode_base_s + cost.decode_per_request_s * batch + cost.decode_per_context_token_s * context)
    return step * a.calib + np.where(h < a.local_queue, a.chunk_stall, 0.0)


def _cached(snapshot: ClusterSnapshot, ids: tuple[str, ...], prompt: int) -> np.ndarray:
    get = snapshot.cached_tokens.get
    return np.minimum(np.array([get(i, 0) for i in ids], dtype=np.float64), prompt - 1)


def transfer_aware(request: RoutingRequest, snapshot: ClusterSnapshot, cost: CostModel,
                   config: RoutingConfig) -> RoutingDecision:
    slo = config.slo_for(request)
    a = _pools(snapshot, cost, config)
    if not a.decodes:
        return RoutingDecision.reject(request.request_id, NAME, REJECT_UNAVAILABLE, explain="no decode instance")
    prompt = request.num_prompt_tokens
    lifetime = np.ceil((prompt + request.predicted_output_tokens) / a.block_size)
    peak = a.committed + lifetime
    kv_ok = (a.capacity <= 0) | (peak <= a.capacity)
    kv_use = np.where(a.capacity > 0, peak / np.maximum(a.capacity, 1.0), 0.0)
    tbt_limit = slo.tbt_s * config.slo_margin
    ttft_limit = slo.ttft_s * config.slo_margin

    def score(ttft: np.ndarray, tbt: np.ndarray) -> np.ndarray:
        pressure = np.maximum(kv_use, tbt / slo.tbt_s)
        misses = (~kv_ok).astype(np.float64) + (tbt > tbt_limit) + (ttft > ttft_limit)
        return ttft / slo.ttft_s + config.decode_weight * pressure + INFEASIBLE * misses

    # local prefill on each decode instance (conditional disaggregation); mirrors estimates.local_prefill
    cached = _cached(snapshot, a.decode_ids, prompt)
    new = prompt - cached
    forced = (new <= config.local_prefill_max_tokens) | (cached >= config.local_prefill_min_cached_ratio * prompt)
    marginal = cost.prefill_per_token_s * new + cost.prefill_attn_s * new * (new + cached)
    full = np.maximum(cost.prefill_floor_s, cost.prefill_base_s + marginal)
    chunk = np.minimum(new, config.chunk_tokens)
    stall = np.where(a.busy, a.step_now + cost.prefill_per_token_s * chunk
                     + cost.prefill_attn_s * chunk * (chunk + cached), 0.0)
    ttft_local = a.local_queue + np.where(a.busy, np.ceil(new / config.chunk_tokens) * a.step_now + marginal, full)
    delay = np.where(a.busy, marginal, 0.0)

    best_remote, scores = math.inf, None
    if a.prefills:  # every (prefill, decode) pair
        cached_p = _cached(snapshot, a.prefill_ids, prompt)
        new_p = prompt - cached_p
        pre = np.maximum(cost.prefill_floor_s, cost.prefill_base_s + cost.prefill_per_token_s * new_p
                         + cost.prefill_attn_s * new_p * (new_p + cached_p))
        bw, lat = snapshot.links.matrices(a.prefill_ids, a.decode_ids)
        transfer = lat + (new * snapshot.kv_bytes_per_token)[None, :] / (bw * 1e9)
        visible = transfer - cost.transfer_overlap * np.minimum(pre[:, None], transfer)
        ttft = (a.prefill_wait + pre)[:, None] + visible
        if not forced.all():
            best_remote = float(ttft[:, ~forced].min())
        scores = np.where(forced[None, :], np.inf, score(ttft, _tbt(a, cost, prompt, ttft)))

    by_cost = (stall <= config.local_prefill_tbt_slack * slo.tbt_s) | (
        (best_remote - ttft_local) / slo.ttft_s > delay / slo.tbt_s)
    allowed = forced | (not a.prefills) | (config.local_prefill_by_cost & by_cost)
    local_scores = np.where(allowed, score(ttft_local, _tbt(a, cost, prompt, ttft_local)), np.inf)
    best_local = int(np.argmin(local_scores))
    best_score, best_p, best_d = float(local_scores[best_local]), None, best_local
    if scores is not None:
        flat = int(np.argmin(scores))
        if scores.flat[flat] < best_score:
            best_p, best_d = divmod(flat, len(a.decodes))
    decode = a.decodes[best_d]
    est = evaluate_pair(request, snapshot, cost, config, a.prefills[best_p] if best_p is not None else None, decode)
    return _decide(request, est, decode, cost, config)
