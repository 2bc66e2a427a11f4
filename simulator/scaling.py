"""The autoscaling hook: what a scaler reads, what it answers, and a simple built-in one.

Every ``interval_s`` of simulated time the cluster builds :class:`ScalingSignals`, the numbers
the autoscaler reads from Prometheus in production (request rate, prompt/output lengths, prefix
hit rate, observed TTFT and inter-token latency, per-role utilisation and KV usage), and asks
its :class:`Scaler` for the desired number of instances per role. The cluster acts on the
answer the way the actuators do: a new instance serves after ``startup_delay_s`` (its GPUs count
from the start); a removed one drains (no new work, finishes what it holds) and then stops.
Scaling up first takes back draining instances, newest first.

A scaler is any object with ``decide(signals, pools, now) -> Replicas``, so the autoscaler's
pure sizing policy (``autoscaler/policy.py``) plugs in through a small adapter that maps these
signals onto its own types (``simulator.autoscaler_policy``). :class:`ReactiveScaler` is the
built-in baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from common.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ScalingSignals:
    """One interval's view of the cluster (what Prometheus would hold), at ``now_s``."""

    now_s: float
    interval_s: float
    request_rate_rps: float
    mean_prompt_tokens: float
    mean_output_tokens: float
    """Of the requests that finished in the interval."""
    prefix_hit_rate: float
    """Cached / queried prompt tokens at admission, all instances."""
    ttft_mean_s: float
    ttft_p90_s: float
    itl_mean_s: float
    itl_p90_s: float
    """Mean time per output token of the requests that finished in the interval."""
    prefill_utilization: float
    """Busy fraction of the serving prefill instances (0..1)."""
    decode_utilization: float
    decode_kv_usage: float
    """Mean KV blocks in use / total over serving decode instances (0..1)."""
    decode_batch_usage: float
    """Mean running requests / the engine's max_num_requests over serving decode instances (0..1)."""
    num_waiting: int
    """Requests queued on any serving instance."""
    num_running_decode: int
    """Requests in the decode instances' running batches (those awaiting their KV not counted)."""
    num_waiting_decode: int
    num_queued_prefill_tokens: int
    """Prompt tokens queued or still to compute on the serving prefill instances."""
    rejection_rate_rps: float


@dataclass(frozen=True, slots=True)
class RoleCount:
    serving: int
    starting: int
    draining: int

    @property
    def provisioned(self) -> int:
        return self.serving + self.starting + self.draining


@dataclass(frozen=True, slots=True)
class PoolSizes:
    prefill: RoleCount
    decode: RoleCount


@dataclass(frozen=True, slots=True)
class Replicas:
    prefill: int
    decode: int


class Scaler(Protocol):
    interval_s: float

    def decide(self, signals: ScalingSignals, pools: PoolSizes, now: float) -> Replicas:
        """Desired serving instances per role. Called by the cluster every ``interval_s``."""
        ...


@dataclass(frozen=True)
class ScalingConfig:
    startup_delay_s: float = 60.0
    """From the decision to scale up until the new instance serves (pull, load weights, warm up)."""

    def __post_init__(self) -> None:
        if not (self.startup_delay_s >= 0 and math.isfinite(self.startup_delay_s)):
            raise ConfigError(f"must be a number >= 0, got {self.startup_delay_s}", field="startup_delay_s")


class ReactiveScaler:
    """Utilisation-band scaling with SLO guards (the simple baseline).

    Prefill: ``ceil(serving * utilisation / target)``, plus one while TTFT p90 misses the SLO above
    target. Decode: ``ceil(serving * max(kv_usage / kv_target, batch_usage / kv_target,
    itl_p90 / (tbt_slo * itl_target)))`` (a full batch stalls reservations like full KV does).
    Instances still starting count towards the current size, not towards the demand.
    Scale-up is immediate (at most ``max_step`` per tick and role); scale-down waits until the
    desired count has stayed lower for ``down_cooldown_s``, then steps down by one.
    """

    def __init__(self, *, interval_s: float = 30.0, ttft_slo_s: float = 2.0, tbt_slo_s: float = 0.1,
                 prefill_target: float = 0.7, kv_target: float = 0.7, itl_target: float = 0.8,
                 min_prefill: int = 1, max_prefill: int = 64, min_decode: int = 1, max_decode: int = 64,
                 max_step: int = 4, down_cooldown_s: float = 120.0) -> None:
        if not interval_s > 0:
            raise ConfigError(f"must be positive, got {interval_s}", field="interval_s")
        if min_prefill < 0 or min_decode < 1 or max_prefill < min_prefill or max_decode < min_decode:
            raise ConfigError("bounds must satisfy 0 <= min_prefill <= max_prefill, 1 <= min_decode <= max_decode",
                              field="min_decode")
        self.interval_s = interval_s
        self.ttft_slo_s = ttft_slo_s
        self.tbt_slo_s = tbt_slo_s
        self.prefill_target = prefill_target
        self.kv_target = kv_target
        self.itl_target = itl_target
        self.bounds = {"prefill": (min_prefill, max_prefill), "decode": (min_decode, max_decode)}
        self.max_step = max_step
        self.down_cooldown_s = down_cooldown_s
        self._low_since: dict[str, float | None] = {"prefill": None, "decode": None}

    def _settle(self, role: str, current: int, wanted: int, now: float) -> int:
        lo, hi = self.bounds[role]
        wanted = min(hi, max(lo, wanted))
        if wanted > current:
            self._low_since[role] = None
            return min(wanted, current + self.max_step)
        if wanted < current:
            since = self._low_since[role]
            if since is None:
                self._low_since[role] = now
                return current
            if now - since >= self.down_cooldown_s:
                self._low_since[role] = now
                return current - 1
            return current
        self._low_since[role] = None
        return current

    def decide(self, signals: ScalingSignals, pools: PoolSizes, now: float) -> Replicas:
        # demand is measured on the serving instances; instances still starting count as capacity
        # on its way (sizing from them too would add instances every tick until they serve)
        p_now = pools.prefill.serving + pools.prefill.starting
        d_now = pools.decode.serving + pools.decode.starting
        p_want = math.ceil(pools.prefill.serving * signals.prefill_utilization / self.prefill_target)
        if signals.ttft_p90_s > self.ttft_slo_s and signals.prefill_utilization > self.prefill_target:
            p_want = max(p_want, pools.prefill.serving + 1)
        load = max(signals.decode_kv_usage / self.kv_target, signals.decode_batch_usage / self.kv_target,
                   signals.itl_p90_s / (self.tbt_slo_s * self.itl_target))
        d_want = math.ceil(pools.decode.serving * load) if load > 0 else self.bounds["decode"][0]
        return Replicas(self._settle("prefill", p_now, p_want, now), self._settle("decode", d_now, d_want, now))


class StaticScaler:
    """Keeps fixed pool sizes (a scaler for tests and for peak provisioning)."""

    def __init__(self, prefill: int, decode: int, *, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self.replicas = Replicas(prefill, decode)

    def decide(self, signals: ScalingSignals, pools: PoolSizes, now: float) -> Replicas:
        return self.replicas
