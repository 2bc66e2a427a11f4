"""What one replica of each role can carry at the SLOs, from the cost model ``pdserve profile`` fits.

:class:`RoleCapacity` is the policy's unit of supply; :func:`capacity_from_cost_model` derives it
for the predicted prompt length ``P``, output length ``O`` and prefix hit rate ``h`` (pure: the
simulator calls it with the same CostModel it uses as its clock).

**Prefill** (TTFT SLO ``S``). A prompt has ``n = P(1-h)`` new tokens on top of ``c = Ph`` cached
ones. A pass of the engine holds ``k = max(1, floor(chunk / n))`` prompts when they are shorter
than the token budget ``chunk`` (they share the pass), else one prompt in ``ceil(n / chunk)`` chunks::

    pass_s = max(floor, base + per_token * k * n + attn * k * n * (n + c))                  n < chunk
           = max(steps * floor, steps * base + per_token * n + attn * n * (n + c))           otherwise
    mu     = k * n / pass_s                          uncached tokens/s of a saturated replica

Queueing in front of the replica (M/D/1: mean wait ``rho * pass_s / (2 (1 - rho))``) keeps the
mean TTFT ``wait + pass_s`` within ``S`` while the utilization ``rho <= 2 (S - pass_s) / (2S - pass_s)``;
the replica is planned at ``min(target_utilization, that bound)``::

    prefill_tokens_per_s = min(target_utilization, 2 (S - pass_s) / (2S - pass_s)) * mu

**Decode** (ITL SLO ``I``). A request's mean context while it decodes is ``ctx = P + O/2``; a step
over ``B`` requests takes ``t(B) = base + per_request * B + per_context_token * B * ctx``. The largest
batch that keeps steps within ``I``, fits the KV cache (when the model knows its size) and the
engine's batch limit::

    B = floor(min((I - base) / (per_request + per_context_token * ctx), kv_capacity_tokens / ctx,
                  decode_max_batch_size))
    decode_concurrency = target_utilization * B         requests one replica carries
    decode_step_s      = t(B)                           seconds per output token at that load

When even one prompt or one request misses its SLO, the capacity is what a replica does at full
speed (``note`` says the SLO is unattainable): more replicas still add throughput.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from autoscaler.config import SizingConfig
from common.errors import ConfigError
from router.cost_model import CostModel


@dataclass(frozen=True, slots=True)
class RoleCapacity:
    """One replica's capacity at the SLOs, headroom (target_utilization) included."""

    prefill_tokens_per_s: float
    """Uncached prompt tokens per second one prefill replica computes within the TTFT SLO."""
    decode_concurrency: float
    """Requests one decode replica keeps in its batch within the ITL SLO."""
    decode_step_s: float
    """Decode step time at that batch: seconds per generated token of a request (Little's law)."""
    note: str = ""
    """Why a capacity is not what the SLO asked for (unattainable SLO), for decision logs."""

    def __post_init__(self) -> None:
        for name in ("prefill_tokens_per_s", "decode_concurrency", "decode_step_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"must be a positive finite number, got {value}", field=name)


def prefill_pass(cost: CostModel, new_tokens: float, cached_tokens: float, chunk_tokens: int) -> tuple[float, int]:
    """(seconds of one engine pass, prompts in it) for prompts of ``new_tokens`` uncached tokens."""
    n, c = max(1.0, new_tokens), max(0.0, cached_tokens)
    if n < chunk_tokens:
        k = max(1, int(chunk_tokens // n))
        seconds = max(cost.prefill_floor_s,
                      cost.prefill_base_s + cost.prefill_per_token_s * k * n + cost.prefill_attn_s * k * n * (n + c))
        return seconds, k
    steps = math.ceil(n / chunk_tokens)
    seconds = max(steps * cost.prefill_floor_s,
                  steps * cost.prefill_base_s + cost.prefill_per_token_s * n + cost.prefill_attn_s * n * (n + c))
    return seconds, 1


def mdl_utilization_bound(service_s: float, slo_s: float) -> float:
    """Largest utilization of an M/D/1 queue whose mean wait + service stays within ``slo_s``."""
    if service_s >= slo_s:
        return 0.0
    return 2 * (slo_s - service_s) / (2 * slo_s - service_s)


def capacity_from_cost_model(cost: CostModel, config: SizingConfig, prompt_tokens: float, output_tokens: float,
                             prefix_hit_rate: float = 0.0) -> RoleCapacity:
    """RoleCapacity for requests of ``prompt_tokens`` / ``output_tokens`` (NaN: 1) at this hit rate (NaN: 0)."""
    p = prompt_tokens if math.isfinite(prompt_tokens) and prompt_tokens > 0 else 1.0
    o = output_tokens if math.isfinite(output_tokens) and output_tokens > 0 else 1.0
    h = min(1.0, max(0.0, prefix_hit_rate)) if math.isfinite(prefix_hit_rate) else 0.0
    notes = []

    new, cached = p * (1 - h), p * h
    pass_s, k = prefill_pass(cost, new, cached, config.prefill_chunk_tokens)
    if pass_s <= 0:
        raise ConfigError("the cost model predicts no prefill time; profile the workers (`pdserve profile`)",
                          field="cost_model")
    mu = k * max(1.0, new) / pass_s
    rho = min(config.target_utilization, mdl_utilization_bound(pass_s, config.ttft_slo_s))
    if rho <= 0:
        rho = config.target_utilization
        notes.append(f"TTFT SLO {config.ttft_slo_s:g}s unattainable: one prefill pass takes {pass_s:.3g}s")

    ctx = p + o / 2
    per_request = cost.decode_per_request_s + cost.decode_per_context_token_s * ctx
    limits = [float(config.decode_max_batch_size)]
    if per_request > 0:
        limits.append((config.itl_slo_s - cost.decode_base_s) / per_request)
    if cost.kv_capacity_tokens > 0:
        limits.append(cost.kv_capacity_tokens / ctx)
    batch = math.floor(min(limits))
    if batch < 1:
        batch = 1
        notes.append(f"ITL SLO {config.itl_slo_s:g}s unattainable: a step of one request takes "
                     f"{cost.decode_step_time(1, ctx):.3g}s")
    step_s = cost.decode_step_time(batch, batch * ctx)
    if step_s <= 0:
        raise ConfigError("the cost model predicts no decode time; profile the workers (`pdserve profile`)",
                          field="cost_model")
    return RoleCapacity(prefill_tokens_per_s=rho * mu, decode_concurrency=config.target_utilization * batch,
                        decode_step_s=step_s, note="; ".join(notes))
