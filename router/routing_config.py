"""RoutingConfig: which policy routes, the default SLOs, and the knobs the policies read.

Frozen and validated on construction (a wrong value raises ``ConfigError`` naming the field), in
the same shape as ``common.config``'s dataclasses, so ``common.config.build_config(RoutingConfig)``
maps it onto ``--flags`` and ``PDSERVE_ROUTING_*`` environment variables unchanged. It lives here
until the router server joins the configuration tree in ``common/config.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.errors import ConfigError
from router.snapshot import SLO, RoutingRequest

POLICY_NAMES = ("transfer_aware", "round_robin", "least_loaded", "dynamo", "random", "load_balanced",
                "local_cache_aware", "global_cache_aware")


def _check(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(message, field=field)


@dataclass(frozen=True)
class RoutingConfig:
    policy: str = "transfer_aware"
    """Routing policy: transfer_aware, round_robin, least_loaded, dynamo, random, load_balanced,
    local_cache_aware or global_cache_aware."""
    ttft_slo_s: float = 2.0
    """TTFT SLO of requests that carry none."""
    tbt_slo_s: float = 0.1
    """TBT (inter-token latency) SLO of requests that carry none."""
    reject: bool = True
    """Early rejection (transfer_aware): refuse requests predicted to miss an SLO, with Retry-After."""
    slo_margin: float = 1.0
    """Reject only when a prediction exceeds margin x SLO (above 1 tolerates cost-model error)."""
    kv_reserve_fraction: float = 0.05
    """Fraction of a decode instance's KV blocks kept out of predicted demand (preemption headroom)."""
    decode_weight: float = 0.25
    """transfer_aware: weight of decode pressure (peak KV use, TBT / SLO) against TTFT / SLO."""
    calibrate_step_time: bool = True
    """Scale predicted decode steps by the instance's observed / modelled step time (clipped to [0.5, 2])."""
    chunk_tokens: int = 2048
    """Engine token budget per step (EngineConfig.max_num_batched_tokens): local prefill runs in chunks."""
    local_prefill_max_tokens: int = 32
    """Mirror of WorkerConfig: the decode worker prefills itself when at most this many tokens are uncached."""
    local_prefill_min_cached_ratio: float = 0.9
    """Mirror of WorkerConfig: the decode worker prefills itself when this fraction is cached there."""
    local_prefill_by_cost: bool = True
    """transfer_aware: also prefill on the decode instance whenever that is predicted better."""
    local_prefill_tbt_slack: float = 1.0
    """Local prefill by cost if a decode step carrying one chunk stays under slack x TBT SLO, or else if the
    TTFT it saves, in TTFT SLOs, exceeds the delay its chunks add to each decoding request, in TBT SLOs."""
    min_retry_after_s: float = 1.0
    max_retry_after_s: float = 60.0
    dynamo_overlap_weight: float = 1.0
    """dynamo: weight of the prefill blocks to compute against active blocks (0 = pure load balance)."""
    dynamo_temperature: float = 0.0
    """dynamo: 0 picks the cheapest worker; above 0 samples by softmax of the range-normalised cost."""
    kvcache_balancing_threshold: float = 1.25
    """global_cache_aware: fetch a remote prefix when it is this many times longer than the local one."""

    def __post_init__(self) -> None:
        _check(self.policy in POLICY_NAMES, "policy", f"must be one of {POLICY_NAMES}, got {self.policy!r}")
        for name in ("ttft_slo_s", "tbt_slo_s", "slo_margin", "local_prefill_tbt_slack", "max_retry_after_s"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and value > 0 and math.isfinite(value), name,
                   f"must be a positive number, got {value!r}")
        _check(0 <= self.kv_reserve_fraction < 1, "kv_reserve_fraction",
               f"must be in [0, 1), got {self.kv_reserve_fraction}")
        _check(self.decode_weight >= 0, "decode_weight", f"must be >= 0, got {self.decode_weight}")
        _check(self.chunk_tokens > 0, "chunk_tokens", f"must be positive, got {self.chunk_tokens}")
        _check(self.local_prefill_max_tokens >= 0, "local_prefill_max_tokens",
               f"must be >= 0, got {self.local_prefill_max_tokens}")
        _check(0 < self.local_prefill_min_cached_ratio <= 1, "local_prefill_min_cached_ratio",
               f"must be in (0, 1], got {self.local_prefill_min_cached_ratio}")
        _check(0 <= self.min_retry_after_s <= self.max_retry_after_s, "min_retry_after_s",
               f"must be in [0, max_retry_after_s], got {self.min_retry_after_s}")
        _check(self.dynamo_overlap_weight >= 0, "dynamo_overlap_weight",
               f"must be >= 0, got {self.dynamo_overlap_weight}")
        _check(self.dynamo_temperature >= 0, "dynamo_temperature", f"must be >= 0, got {self.dynamo_temperature}")
        _check(self.kvcache_balancing_threshold >= 1, "kvcache_balancing_threshold",
               f"must be >= 1, got {self.kvcache_balancing_threshold}")

    def slo_for(self, request: RoutingRequest) -> SLO:
        return request.slo if request.slo is not None else SLO(self.ttft_slo_s, self.tbt_slo_s)

    def clamp_retry(self, seconds: float) -> float:
        if not math.isfinite(seconds):
            return self.max_retry_after_s
        return min(self.max_retry_after_s, max(self.min_retry_after_s, seconds))
