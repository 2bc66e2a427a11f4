"""The pool-sizing policy: ``decide(signals, state, config, capacity, now) -> ScalingDecision``.

A pure function over plain data (no I/O, no clock: ``now`` is an argument), so the autoscaler's
loop, the cluster simulator and the tests call the same code. The loop passes *predicted*
signals (the forecast fields one horizon ahead, the latencies and queues as observed now); the
simulator may pass whatever it simulates. :class:`PoolState` carries what a decision needs to
remember (replicas now, when each role last changed, the reactive corrections); the caller keeps
it and advances it with :meth:`PoolState.after` once the decision has been carried out.

Demand, in replicas (``lambda``, ``P``, ``O``, ``h``: predicted request rate, prompt and output
tokens, prefix hit rate; capacities from ``autoscaler.capacity``)::

    prefill = (lambda * P * (1 - h) * c_prefill + queued_prefill_tokens / backlog_drain_s)
              / capacity.prefill_tokens_per_s
    decode  = max(lambda * O * capacity.decode_step_s, running_decode + waiting_decode) * c_decode
              / capacity.decode_concurrency
    decode  = max(decode, replicas_decode * kv_usage_decode / target_utilization)     (KV pressure)

(optional signals that are NaN drop their term; a NaN hit rate counts as 0.) ``c_*`` is the
reactive correction, an integral controller on the SLO drift: once a role has been left alone for
``scale_up_cooldown_s`` (its last change has taken effect), an observed p90 (TTFT for prefill, ITL
for decode) above ``(1 + slo_tolerance) * SLO`` multiplies its ``c`` by ``p90 / SLO`` (at most 2x a
decision), one below ``(1 - slo_tolerance) * SLO`` by that ratio (at least 0.5x); ``c`` stays in
``[slo_correction_min, slo_correction_max]``. It persists, so a cost model that is 30% optimistic
ends up corrected by 1.3 instead of oscillating.

Demand becomes replicas in this order:

1. **hysteresis** per role: up to ``ceil(demand)`` when that exceeds the replicas now; down to
   ``ceil(demand * (1 + hysteresis))`` only when that is below them; otherwise hold. Then clamp to
   the role's ``[min, max]``.
2. **budget** (``gpu_budget > 0``): if the targets need more GPUs than the budget, pick the
   split (no role above its target or below its minimum) that maximises the worse role's share
   ``replicas / demand``, ties to the split closest to now; the current split stays unless the best
   improves that share by more than ``hysteresis``.
3. **cooldowns**: a role that changed less than ``scale_up_cooldown_s`` ago does not grow, less
   than ``scale_down_cooldown_s`` ago does not shrink (bounds and an over-budget pool override
   this); then **max step**: no role moves by more than ``max_step``; growth that would overrun the
   budget while a shrink waits is trimmed.
4. **flips**: when one role grows while the other shrinks and both use the same GPUs per worker,
   ``min(growth, shrink)`` workers flip role (drain, switch, no restart) instead of being stopped
   and started; the rest is scaled.

Fail-static: when the signals are not usable (Prometheus unreachable, an essential value empty or
NaN) the decision holds the current sizes, only lifting a role that is below its minimum; it
never scales anything to zero.

Driving it (the simulator does exactly this with simulated signals)::

    state = PoolState(prefill=2, decode=4)
    s = ScalingSignals(time=now, request_rate=30.0, prompt_tokens_mean=1800.0, output_tokens_mean=250.0,
                       prefix_hit_rate=0.3, ttft_p90_s=0.9, itl_p90_s=0.04)
    capacity = capacity_from_cost_model(cost, sizing, s.prompt_tokens_mean, s.output_tokens_mean,
                                        s.prefix_hit_rate)
    d = decide(s, state, sizing, capacity, now)      # d.prefill, d.decode, d.num_flips, d.reason
    state = state.after(d, now)                      # once carried out (reached=... if only in part)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from autoscaler.actuators.base import DECODE, PREFILL, ROLES
from autoscaler.capacity import RoleCapacity
from autoscaler.config import SizingConfig
from autoscaler.signals import ScalingSignals

HOLD, SCALE, FLIP = "hold", "scale", "flip"
ACTIONS = (HOLD, SCALE, FLIP)
# decision causes (the metric label; the human-readable reason is ScalingDecision.reason)
NO_SIGNAL, STEADY, COOLDOWN, DEMAND, SLO_DRIFT, BUDGET, BOUNDS = (
    "no_signal", "steady", "cooldown", "demand", "slo_drift", "budget", "bounds")
CAUSES = (NO_SIGNAL, STEADY, COOLDOWN, DEMAND, SLO_DRIFT, BUDGET, BOUNDS)
_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class PoolState:
    """What the policy remembers between decisions; the caller owns it."""

    prefill: int
    """Replicas now (the actuator's current())."""
    decode: int
    prefill_changed_at: float = -math.inf
    """When the prefill pool last changed size or lost/gained a flipped worker."""
    decode_changed_at: float = -math.inf
    prefill_correction: float = 1.0
    """Reactive SLO correction of prefill demand (1 = trust the cost model)."""
    decode_correction: float = 1.0

    def replicas(self, role: str) -> int:
        return self.prefill if role == PREFILL else self.decode

    def changed_at(self, role: str) -> float:
        return self.prefill_changed_at if role == PREFILL else self.decode_changed_at

    def with_current(self, current: Mapping[str, int]) -> PoolState:
        """This state with the replicas an actuator reports now."""
        return dataclasses.replace(self, prefill=int(current[PREFILL]), decode=int(current[DECODE]))

    def after(self, decision: ScalingDecision, now: float, reached: Mapping[str, int] | None = None) -> PoolState:
        """The state once ``decision`` was carried out; ``reached``: the replicas actually reached
        (default: the decision's). A role whose size changed gets ``changed_at = now``; a flip
        changes both. The decision's corrections are kept (advisory mode included)."""
        reached = reached or {PREFILL: decision.prefill, DECODE: decision.decode}
        changed = {role: reached[role] != self.replicas(role) for role in ROLES}
        return PoolState(
            prefill=reached[PREFILL], decode=reached[DECODE],
            prefill_changed_at=now if changed[PREFILL] else self.prefill_changed_at,
            decode_changed_at=now if changed[DECODE] else self.decode_changed_at,
            prefill_correction=decision.prefill_correction, decode_correction=decision.decode_correction)


@dataclass(frozen=True, slots=True)
class ScalingDecision:
    prefill: int
    """Desired prefill replicas."""
    decode: int
    action: str
    """hold (nothing changes), scale, or flip (some workers flip role; any rest is scaled)."""
    cause: str
    """What drove it, one of CAUSES (a metric label)."""
    reason: str
    """Human-readable: the numbers behind each role's size."""
    flip_to: str | None = None
    """The role that gains flipped workers."""
    num_flips: int = 0
    prefill_demand: float = math.nan
    """Replicas the demand needs before hysteresis, bounds and budget (NaN when holding for no signal)."""
    decode_demand: float = math.nan
    prefill_correction: float = 1.0
    decode_correction: float = 1.0

    def replicas(self, role: str) -> int:
        return self.prefill if role == PREFILL else self.decode


def _finite(x: float) -> bool:
    return math.isfinite(x)


def _ceil(x: float) -> int:
    return math.ceil(x - _EPS) if x > 0 else 0


def _clamp(n: int, role: str, config: SizingConfig) -> int:
    lo, hi = config.bounds(role)
    return max(lo, min(hi, n))


def _gpus(replicas: Mapping[str, int], config: SizingConfig) -> int:
    return sum(replicas[r] * config.gpus_per(r) for r in ROLES)


def _share(replicas: Mapping[str, int], demand: Mapping[str, float]) -> float:
    """The worse role's replicas / demand (inf when neither role needs anything)."""
    return min(replicas[r] / demand[r] if demand[r] > _EPS else math.inf for r in ROLES)


def _correction(previous: float, observed: float, slo: float, settled: bool, config: SizingConfig) -> float:
    if not settled or not _finite(observed):
        return previous
    ratio = observed / slo
    if ratio > 1 + config.slo_tolerance:
        return min(config.slo_correction_max, previous * min(ratio, 2.0))
    if ratio < 1 - config.slo_tolerance:
        return max(config.slo_correction_min, previous * max(ratio, 0.5))
    return previous


def demand(signals: ScalingSignals, state: PoolState, config: SizingConfig, capacity: RoleCapacity,
           corrections: Mapping[str, float]) -> tuple[dict[str, float], list[str]]:
    """Replicas each role needs (fractional), with the terms behind them for the reason."""
    rate = signals.request_rate
    if rate > 0:
        prompt, output = signals.prompt_tokens_mean, signals.output_tokens_mean
    else:
        prompt = output = 0.0
    hit = min(1.0, max(0.0, signals.prefix_hit_rate)) if _finite(signals.prefix_hit_rate) else 0.0
    notes = []
    tokens_per_s = rate * prompt * (1 - hit) * corrections[PREFILL]
    if _finite(signals.num_queued_prefill_tokens) and signals.num_queued_prefill_tokens > 0:
        tokens_per_s += signals.num_queued_prefill_tokens / config.backlog_drain_s
        notes.append(f"backlog {signals.num_queued_prefill_tokens:.0f} prompt tokens")
    prefill = tokens_per_s / capacity.prefill_tokens_per_s
    notes.append(f"prefill {prefill:.2f} = {tokens_per_s:.0f} uncached tok/s / "
                 f"{capacity.prefill_tokens_per_s:.0f} per replica at TTFT {config.ttft_slo_s:g}s")

    concurrency = rate * output * capacity.decode_step_s
    observed = sum(x for x in (signals.num_running_decode, signals.num_waiting_decode) if _finite(x))
    if observed > concurrency:
        notes.append(f"observed {observed:.0f} decoding > predicted {concurrency:.1f}")
        concurrency = observed
    concurrency *= corrections[DECODE]
    decode = concurrency / capacity.decode_concurrency
    notes.append(f"decode {decode:.2f} = {concurrency:.1f} concurrent / {capacity.decode_concurrency:.1f} "
                 f"per replica at ITL {config.itl_slo_s:g}s")
    if _finite(signals.kv_usage_decode):
        kv_floor = state.decode * signals.kv_usage_decode / config.target_utilization
        if kv_floor > decode:
            notes.append(f"KV {signals.kv_usage_decode:.0%} full: decode {kv_floor:.2f}")
            decode = kv_floor
    if capacity.note:
        notes.append(capacity.note)
    return {PREFILL: prefill, DECODE: decode}, notes


def _hysteresis(need: float, current: int, config: SizingConfig) -> int:
    up = _ceil(need)
    if up > current:
        return up
    down = _ceil(need * (1 + config.hysteresis))
    return down if down < current else current


def _fit_budget(target: dict[str, int], need: Mapping[str, float], current: Mapping[str, int],
                config: SizingConfig) -> dict[str, int]:
    """The split of the GPU budget that serves the worse role best (see step 2 of the docstring)."""
    budget = config.gpu_budget
    if budget == 0 or _gpus(target, config) <= budget:
        return target
    g_p, g_d = config.gpus_per_prefill, config.gpus_per_decode
    best: dict[str, int] | None = None
    best_key: tuple[float, int, int] | None = None
    for p in range(config.min_prefill, target[PREFILL] + 1):
        d = min(target[DECODE], (budget - p * g_p) // g_d)
        if d < config.min_decode:
            break
        split = {PREFILL: p, DECODE: d}
        key = (_share(split, need), -sum(abs(split[r] - current[r]) for r in ROLES), p + d)
        if best_key is None or key > best_key:
            best, best_key = split, key
    assert best is not None, "the config guarantees the minimums fit the budget"
    now_ok = (_gpus(current, config) <= budget
              and all(config.bounds(r)[0] <= current[r] <= min(config.bounds(r)[1], target[r]) for r in ROLES))
    if now_ok and _share(best, need) <= _share(current, need) * (1 + config.hysteresis):
        return dict(current)
    return best


def _hold(state: PoolState, config: SizingConfig, why: str) -> ScalingDecision:
    prefill = max(state.prefill, config.min_prefill)
    decode = max(state.decode, config.min_decode)
    lifted = (prefill, decode) != (state.prefill, state.decode)
    reason = f"hold prefill={state.prefill} decode={state.decode}: {why}"
    if lifted:
        reason += f"; lifted to the minimums prefill={prefill} decode={decode}"
    return ScalingDecision(prefill=prefill, decode=decode, action=SCALE if lifted else HOLD, cause=NO_SIGNAL,
                           reason=reason, prefill_correction=state.prefill_correction,
                           decode_correction=state.decode_correction)


def decide(signals: ScalingSignals, state: PoolState, config: SizingConfig, capacity: RoleCapacity,
           now: float) -> ScalingDecision:
    """Desired prefill and decode replicas (and flips) for ``signals``; see the module docstring."""
    missing = signals.missing()
    if missing:
        why = signals.error or f"{', '.join(missing)} empty or NaN"
        return _hold(state, config, f"no signal ({why})")
    current = {r: state.replicas(r) for r in ROLES}
    settled = {r: now - state.changed_at(r) >= config.scale_up_cooldown_s for r in ROLES}
    corrections = {
        PREFILL: _correction(state.prefill_correction, signals.ttft_p90_s, config.ttft_slo_s, settled[PREFILL], config),
        DECODE: _correction(state.decode_correction, signals.itl_p90_s, config.itl_slo_s, settled[DECODE], config),
    }
    need, notes = demand(signals, state, config, capacity, corrections)
    for role, label, observed, slo in ((PREFILL, "TTFT", signals.ttft_p90_s, config.ttft_slo_s),
                                       (DECODE, "ITL", signals.itl_p90_s, config.itl_slo_s)):
        if corrections[role] != 1.0:
            notes.append(f"{role} x{corrections[role]:.2f} for {label} p90 {observed:.3g}s vs SLO {slo:g}s")

    wanted = {r: _clamp(_hysteresis(need[r], current[r], config), r, config) for r in ROLES}
    bounded = {r: _clamp(current[r], r, config) for r in ROLES}
    target = _fit_budget(wanted, need, current, config)
    budget_bound = target != wanted
    if budget_bound:
        notes.append(f"budget {config.gpu_budget} GPUs: {wanted[PREFILL]}+{wanted[DECODE]} wanted")
    over_budget = config.gpu_budget > 0 and _gpus(current, config) > config.gpu_budget

    final: dict[str, int] = {}
    blocked: list[str] = []
    for role in ROLES:
        cur, goal = current[role], target[role]
        since = now - state.changed_at(role)
        if goal > bounded[role] and since < config.scale_up_cooldown_s:
            blocked.append(f"{role} up {cur}->{goal} in cooldown ({since:.0f}s < {config.scale_up_cooldown_s:g}s)")
            goal = bounded[role]
        elif goal < bounded[role] and since < config.scale_down_cooldown_s and not over_budget:
            blocked.append(f"{role} down {cur}->{goal} in cooldown ({since:.0f}s < {config.scale_down_cooldown_s:g}s)")
            goal = bounded[role]
        final[role] = max(cur - config.max_step, min(cur + config.max_step, goal))
    if config.gpu_budget:  # a shrink held back by a cooldown must not let the other role overrun
        for role in ROLES:
            while _gpus(final, config) > config.gpu_budget and final[role] > current[role]:
                final[role] -= 1
    notes.extend(blocked)

    delta = {r: final[r] - current[r] for r in ROLES}
    num_flips, flip_to = 0, None
    if config.prefer_flips and config.gpus_per_prefill == config.gpus_per_decode and delta[PREFILL] * delta[DECODE] < 0:
        flip_to = PREFILL if delta[PREFILL] > 0 else DECODE
        num_flips = min(abs(delta[PREFILL]), abs(delta[DECODE]))

    if final == current:
        action, cause = HOLD, COOLDOWN if blocked else STEADY
    else:
        action = FLIP if num_flips else SCALE
        if final == bounded and bounded != current:
            cause = BOUNDS
        elif budget_bound or over_budget:
            cause = BUDGET
        elif any(corrections[r] != 1.0 and delta[r] > 0 for r in ROLES):
            cause = SLO_DRIFT
        else:
            cause = DEMAND
    moves = [f"{r} {current[r]}->{final[r]}" if final[r] != current[r] else f"{r} {current[r]}" for r in ROLES]
    head = f"{action} {', '.join(moves)}"
    if num_flips:
        head += f" ({num_flips} flip{'s' if num_flips > 1 else ''} to {flip_to})"
    return ScalingDecision(
        prefill=final[PREFILL], decode=final[DECODE], action=action, cause=cause,
        reason=f"{head}: {'; '.join(notes)} [{signals.summary()}]", flip_to=flip_to, num_flips=num_flips,
        prefill_demand=need[PREFILL], decode_demand=need[DECODE],
        prefill_correction=corrections[PREFILL], decode_correction=corrections[DECODE])
