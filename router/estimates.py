"""Predictions every policy shares: queue wait, prefill, transfer, decode load, local prefill.

Pure functions of (request, snapshot, cost model, config); no state, no I/O. ``transfer_aware``
evaluates many (prefill, decode) pairs at once with numpy; :func:`evaluate_pair` is the scalar
reference it is tested against, and what every policy uses to fill a decision's predictions and
``explain`` line.

Decode load "when the request arrives" (``horizon_s`` from now, its predicted TTFT) is
extrapolated from aggregates: the ``n`` requests on the instance have ``R`` predicted tokens left
in total; with remaining lengths spread uniformly, a fraction ``min(1, horizon / (2 * R/n * step))``
of them has finished by then, the rest have grown by up to ``horizon / step`` tokens each. Prompts
queued on the decode instance itself (local prefills) lengthen its steps by a chunk each until
they have drained. KV
headroom is judged conservatively at the peak: the request's whole predicted lifetime
(``prompt + predicted output``) must fit next to what is used, in flight, and the predicted growth
of every request already there, within ``(1 - kv_reserve_fraction)`` of the instance's blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from router.cost_model import CostModel
from router.routing_config import RoutingConfig
from router.snapshot import SLO, ClusterSnapshot, InstanceState, RoutingRequest

INFEASIBLE = 1e6  # added to a score per violated constraint: any feasible option beats any infeasible one


@dataclass(frozen=True, slots=True)
class DecodeEstimate:
    tbt_s: float
    peak_blocks: int
    capacity_blocks: int
    """0 when unknown (no report, no cost-model capacity): KV is then not a constraint."""
    kv_ok: bool
    tbt_ok: bool
    pressure: float
    """max(peak KV use, TBT / SLO): 1.0 is the edge of feasibility."""


@dataclass(frozen=True, slots=True)
class PairEstimate:
    prefill_id: str | None
    """None: prefill on the decode instance."""
    decode_id: str
    queue_s: float
    prefill_s: float
    transfer_s: float
    """Full transfer time (latency + bytes / bandwidth); 0 for local prefill."""
    visible_transfer_s: float
    """The part of the transfer that adds to TTFT."""
    ttft_s: float
    num_cached_tokens: int
    decode: DecodeEstimate
    local_reason: str = ""
    """Local prefill: "short" / "cached" (the worker's own rule), "cost", or "no_prefill"."""

    def violations(self, slo: SLO, config: RoutingConfig) -> int:
        """How many of KV headroom, TBT SLO and TTFT SLO this option misses."""
        return ((not self.decode.kv_ok) + (not self.decode.tbt_ok)
                + (self.ttft_s > slo.ttft_s * config.slo_margin))

    def score(self, slo: SLO, config: RoutingConfig) -> float:
        """transfer_aware's objective (lower is better): options meeting every SLO come first."""
        s = self.ttft_s / slo.ttft_s + config.decode_weight * self.decode.pressure
        return s + INFEASIBLE * self.violations(slo, config)

    def explain(self, policy: str) -> str:
        where = self.prefill_id if self.prefill_id is not None else f"local({self.local_reason})"
        d = self.decode
        kv = f"{d.peak_blocks}/{d.capacity_blocks}" if d.capacity_blocks else "n/a"
        return (f"{policy}: P={where} D={self.decode_id} ttft={self.ttft_s:.3f}s (queue {self.queue_s:.3f}"
                f" + prefill {self.prefill_s:.3f} + transfer {self.visible_transfer_s:.3f}) cached="
                f"{self.num_cached_tokens} tbt={d.tbt_s * 1e3:.1f}ms kv={kv}")


def effective_cached(snapshot: ClusterSnapshot, instance_id: str, num_prompt_tokens: int) -> int:
    """Cached prompt tokens usable there: the last prompt token is always computed."""
    return min(snapshot.cached(instance_id), num_prompt_tokens - 1)


def prefill_queue_s(inst: InstanceState, cost: CostModel, config: RoutingConfig) -> float:
    """Wait before a new prompt starts on ``inst``: its reported queue plus what the router has in flight."""
    return cost.queue_time(inst.num_outstanding_prefill_tokens,
                           inst.num_waiting + inst.num_running + inst.num_inflight_requests, config.chunk_tokens)


def _step(cost: CostModel, batch: float, context: float) -> float:  # decode_step_time without the batch guard
    return cost.decode_base_s + cost.decode_per_request_s * batch + cost.decode_per_context_token_s * context


def calibration(inst: InstanceState, cost: CostModel, config: RoutingConfig) -> float:
    """Observed / modelled step time for the instance's current batch, clipped to [0.5, 2]."""
    if not config.calibrate_step_time or inst.step_time_s <= 0 or inst.num_running <= 0:
        return 1.0
    modelled = cost.decode_step_time(inst.num_running, inst.num_used_blocks * inst.block_size)
    if modelled <= 0:
        return 1.0
    return min(2.0, max(0.5, inst.step_time_s / modelled))


def decode_step_now(inst: InstanceState, cost: CostModel, config: RoutingConfig) -> float:
    n = inst.num_requests
    if n <= 0:
        return 0.0
    ctx = inst.num_used_blocks * inst.block_size + inst.num_inflight_tokens
    return float(_step(cost, n, ctx)) * calibration(inst, cost, config)


def decode_tbt(inst: InstanceState, request: RoutingRequest, cost: CostModel, config: RoutingConfig,
               horizon_s: float) -> float:
    """Predicted decode step time on ``inst`` once the request has joined, ``horizon_s`` from now."""
    calib = calibration(inst, cost, config)
    n = inst.num_requests
    ctx = inst.num_used_blocks * inst.block_size + inst.num_inflight_tokens
    step_now = float(_step(cost, n, ctx)) * calib if n > 0 else 0.0
    remaining = inst.num_predicted_remaining_tokens
    horizon = max(0.0, horizon_s)
    finished = grown = 0.0
    if n > 0 and remaining > 0 and step_now > 0:
        finished = min(1.0, horizon / (2.0 * (remaining / n) * step_now))
        grown = min(remaining, n * horizon / step_now)
    batch = n * (1.0 - finished) + 1.0
    context = (ctx + grown) * (1.0 - finished) + request.num_prompt_tokens
    return float(_step(cost, batch, context)) * calib + prefill_stall(inst, cost, config, horizon)


def prefill_stall(inst: InstanceState, cost: CostModel, config: RoutingConfig, horizon_s: float) -> float:
    """What prompts queued on a decode instance (local prefills, recomputes) add to its steps
    ``horizon_s`` from now: a chunk per step until the queue has drained."""
    queued = inst.num_queued_prefill_tokens
    if queued <= 0 or horizon_s >= cost.queue_time(queued, inst.num_waiting, config.chunk_tokens):
        return 0.0
    return cost.prefill_marginal_time(min(queued, config.chunk_tokens))


def decode_kv(inst: InstanceState, request: RoutingRequest, cost: CostModel,
              config: RoutingConfig) -> tuple[int, int]:
    """(peak blocks in use over the request's lifetime, blocks available to predicted demand)."""
    bs = inst.block_size
    lifetime = -(-(request.num_prompt_tokens + request.predicted_output_tokens) // bs)
    peak = inst.num_used_blocks + inst.num_inflight_blocks + inst.num_predicted_growth_blocks + lifetime
    total = inst.num_total_blocks or cost.kv_capacity_blocks(bs)
    return peak, int(total * (1.0 - config.kv_reserve_fraction))


def decode_estimate(inst: InstanceState, request: RoutingRequest, cost: CostModel, config: RoutingConfig,
                    horizon_s: float) -> DecodeEstimate:
    slo = config.slo_for(request)
    tbt = decode_tbt(inst, request, cost, config, horizon_s)
    peak, capacity = decode_kv(inst, request, cost, config)
    kv_use = peak / capacity if capacity > 0 else 0.0
    return DecodeEstimate(tbt_s=tbt, peak_blocks=peak, capacity_blocks=capacity,
                          kv_ok=capacity <= 0 or peak <= capacity,
                          tbt_ok=tbt <= slo.tbt_s * config.slo_margin,
                          pressure=max(kv_use, tbt / slo.tbt_s))


def local_rule(request: RoutingRequest, cached: int, config: RoutingConfig) -> str:
    """The decode worker's own local-prefill rule (WorkerConfig): "short", "cached" or ""."""
    if request.num_prompt_tokens - cached <= config.local_prefill_max_tokens:
        return "short"
    if cached >= config.local_prefill_min_cached_ratio * request.num_prompt_tokens:
        return "cached"
    return ""


@dataclass(frozen=True, slots=True)
class LocalPrefill:
    """Prefilling on the decode instance itself (see :func:`local_prefill`)."""

    queue_s: float
    prefill_s: float
    stall_s: float
    """A decode step carrying one chunk of the prompt (0 when the instance is not decoding)."""
    delay_s: float
    """What the prompt's chunks add, in all, to the steps of every request decoding there."""
    num_cached_tokens: int


def local_prefill(decode: InstanceState, request: RoutingRequest, snapshot: ClusterSnapshot, cost: CostModel,
                  config: RoutingConfig) -> LocalPrefill:
    """Queue, prefill time, stall and delay of prefilling on the decode instance itself.

    The prompt runs in chunks of ``chunk_tokens`` inside the instance's decode steps: the decode
    batch is delayed by each chunk (the stall TBT; the delay is their sum) and the prefill by each
    decode step.
    """
    cached = effective_cached(snapshot, decode.instance_id, request.num_prompt_tokens)
    new = request.num_prompt_tokens - cached
    queue = cost.queue_time(decode.num_queued_prefill_tokens, decode.num_waiting, config.chunk_tokens)
    step = decode_step_now(decode, cost, config)
    if decode.num_running + decode.num_inflight_requests <= 0 or step <= 0:
        return LocalPrefill(queue, cost.prefill_time(new, cached), 0.0, 0.0, cached)
    chunks = math.ceil(new / config.chunk_tokens)
    delay = cost.prefill_marginal_time(new, cached)
    stall = step + cost.prefill_marginal_time(min(new, config.chunk_tokens), cached)
    return LocalPrefill(queue, chunks * step + delay, stall, delay, cached)


def transfer_bytes(request: RoutingRequest, snapshot: ClusterSnapshot, decode_id: str) -> int:
    """KV bytes sent to the decode instance: from the prefix it already holds on."""
    cached = effective_cached(snapshot, decode_id, request.num_prompt_tokens)
    return (request.num_prompt_tokens - cached) * snapshot.kv_bytes_per_token


def evaluate_pair(request: RoutingRequest, snapshot: ClusterSnapshot, cost: CostModel, config: RoutingConfig,
                  prefill: InstanceState | None, decode: InstanceState) -> PairEstimate:
    """Every prediction for one option (``prefill`` None: prefill on ``decode``). The scalar reference."""
    if prefill is None:
        local = local_prefill(decode, request, snapshot, cost, config)
        queue, prefill_s, cached = local.queue_s, local.prefill_s, local.num_cached_tokens
        ttft = queue + prefill_s
        reason = local_rule(request, effective_cached(snapshot, decode.instance_id, request.num_prompt_tokens),
                            config) or ("cost" if any(not p.draining for p in snapshot.prefill) else "no_prefill")
        return PairEstimate(None, decode.instance_id, queue, prefill_s, 0.0, 0.0, ttft, cached,
                            decode_estimate(decode, request, cost, config, ttft), reason)
    cached = effective_cached(snapshot, prefill.instance_id, request.num_prompt_tokens)
    queue = prefill_queue_s(prefill, cost, config)
    prefill_s = cost.prefill_time(request.num_prompt_tokens - cached, cached)
    link = snapshot.links.get(prefill.instance_id, decode.instance_id)
    transfer = link.transfer_time(transfer_bytes(request, snapshot, decode.instance_id))
    visible = cost.visible_transfer_time(prefill_s, transfer)
    ttft = queue + prefill_s + visible
    return PairEstimate(prefill.instance_id, decode.instance_id, queue, prefill_s, transfer, visible, ttft, cached,
                        decode_estimate(decode, request, cost, config, ttft))


def drain_time(inst: InstanceState, fraction: float, cost: CostModel, config: RoutingConfig) -> float:
    """Seconds until ``fraction`` of the instance's decode load has finished (uniform remaining lengths)."""
    n = inst.num_requests
    step = decode_step_now(inst, cost, config)
    if n <= 0 or step <= 0 or inst.num_predicted_remaining_tokens <= 0:
        return math.inf
    return max(0.0, min(1.0, fraction)) * 2.0 * (inst.num_predicted_remaining_tokens / n) * step
