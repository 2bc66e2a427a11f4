"""The autoscaler's loop: every ``interval_s`` read signals, forecast, decide, then act or only report.

:class:`Autoscaler` owns the loop and the :class:`~autoscaler.policy.PoolState` between decisions;
the source, forecaster and actuator are handed in (``autoscaler/cli.py`` builds them from the
config; ``pdserve up --autoscale`` hands in a ``LocalActuator``; tests hand in doubles). One step:

1. ``source.read()``: signals now (an unreachable Prometheus gives signals with ``error`` set);
   after every gap, and at start, they count as no signal for one ``rate_window_s`` (warm-up:
   rate() over a window samples cover only in part reads low);
2. ``forecaster.observe`` then ``predict(horizon_s)``: the load one horizon ahead;
3. ``actuator.current()``: the replicas now; if that fails the step ends, nothing changes;
4. ``decide(...)``: a pure function; it holds on signals that are not usable (fail-static);
5. unless advisory or holding: flips first (``actuator.flip``; ``None`` = cannot flip, so the
   rest is scaled), then ``actuator.scale`` shrinking before growing, so a GPU budget is never
   overrun in between; the first error stops the step (the next one starts from ``current()``).

Every decision is logged with its reason and exported (``autoscaler/metrics.py``). A step never
raises: any failure is logged and the sizes stay as they are until the next interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable

from prometheus_client import Gauge

from autoscaler.actuators.base import ROLES, Actuator, other_role
from autoscaler.capacity import RoleCapacity, capacity_from_cost_model
from autoscaler.config import AutoscalerConfig, SizingConfig
from autoscaler.forecast import Forecaster
from autoscaler.policy import HOLD, PoolState, ScalingDecision, decide
from autoscaler.signals import SIGNAL_FIELDS, ScalingSignals, SignalSource
from common import metrics
from router.cost_model import CostModel

logger = logging.getLogger(__name__)


class Planner:
    """One sizing step without I/O: warm-up hold, forecast, capacity, decision, and the PoolState kept
    between steps. The loop below runs it on Prometheus and an actuator; the simulator
    (``simulator/autoscaler_policy.py``) runs the same object on simulated signals and pools."""

    def __init__(self, config: AutoscalerConfig, sizing: SizingConfig, *, forecaster: Forecaster,
                 cost: CostModel) -> None:
        self.config = config
        self.sizing = sizing
        self.forecaster = forecaster
        self.cost = cost
        self.state: PoolState | None = None
        self.last_decision: ScalingDecision | None = None
        self._usable_since: float | None = None
        capacity_from_cost_model(cost, sizing, 1000.0, 100.0)  # a cost model that predicts nothing fails now

    def observe(self, signals: ScalingSignals, now: float) -> ScalingSignals:
        """Signals read at ``now`` -> the signals one horizon ahead (NaN where there is nothing to use)."""
        signals = self._warm_up(signals, now)
        self.forecaster.observe(signals)
        return signals.with_forecast(self.forecaster.predict(self.config.horizon_s))

    def decide(self, predicted: ScalingSignals, current: dict[str, int], now: float
               ) -> tuple[ScalingDecision, PoolState, RoleCapacity]:
        state = (self.state or self._first_state(current, now)).with_current(current)
        capacity = capacity_from_cost_model(self.cost, self.sizing, predicted.prompt_tokens_mean,
                                            predicted.output_tokens_mean, predicted.prefix_hit_rate)
        decision = decide(predicted, state, self.sizing, capacity, now)
        self.last_decision = decision
        return decision, state, capacity

    def settle(self, state: PoolState, decision: ScalingDecision, now: float,
               reached: dict[str, int] | None = None) -> None:
        """Record what the step did (``reached``: the replicas the actuator got to; default: all of it)."""
        self.state = state.after(decision, now, reached)

    def _first_state(self, current: dict[str, int], now: float) -> PoolState:
        """The pools as found at the first step, taken as last changed one scale-up cooldown before it.

        When they last changed is unknown, and with ``-inf`` the first usable reading could shrink
        a pool the operator sized on one rate window (during a ramp, on the low end of it). This way
        growth is held by nothing but the warm-up, while a shrink waits the extra time the scale-down
        cooldown asks for over the scale-up one: the evidence it wants for any other shrink.
        """
        since = now - self.sizing.scale_up_cooldown_s
        return PoolState(current["prefill"], current["decode"], prefill_changed_at=since, decode_changed_at=since)

    def warming_up(self) -> bool:
        """Signals are usable again but have not been for a whole rate window yet."""
        return self._usable_since is not None

    def _warm_up(self, signals: ScalingSignals, now: float) -> ScalingSignals:
        """Signals that have been usable for less than one rate window are held back as no signal.

        rate() over a window that samples cover only in part (series that just appeared, or a
        Prometheus back from an outage longer than the window) extrapolates to well below the true
        rate, which would read as a load drop; so after every gap, and at start, the loop holds for
        one ``rate_window_s`` before it trusts the numbers again.
        """
        if not signals.usable:
            self._usable_since = None
            return signals
        if self._usable_since is None:
            self._usable_since = now
        usable_for = now - self._usable_since
        if usable_for >= self.config.rate_window_s:
            return signals
        return dataclasses.replace(signals, error=f"warming up: signals usable for {usable_for:.0f}s of the "
                                                  f"{self.config.rate_window_s:g}s rate window")


class Autoscaler:
    def __init__(self, config: AutoscalerConfig, sizing: SizingConfig, *, source: SignalSource,
                 forecaster: Forecaster, actuator: Actuator, cost: CostModel,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.sizing = sizing
        self.source = source
        self.actuator = actuator
        self.clock = clock
        self.planner = Planner(config, sizing, forecaster=forecaster, cost=cost)
        metrics.AUTOSCALER_ADVISORY.labels(actuator.name).set(1 if config.advisory else 0)

    async def run(self, stop: asyncio.Event) -> None:
        """Step every ``interval_s`` until ``stop`` is set."""
        logger.info("autoscaler started: %s actuator%s, %s forecaster, every %gs, Prometheus %s",
                    self.actuator.name, " (advisory: reporting only)" if self.config.advisory else "",
                    self.forecaster.name, self.config.interval_s, self.config.prometheus_url)
        while not stop.is_set():
            started = time.monotonic()
            await self.step()
            wait = max(0.0, self.config.interval_s - (time.monotonic() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    async def export_current(self) -> None:
        """Publish the actuator's current sizes (best effort: the first step retries)."""
        try:
            current = await self.actuator.current()
        except Exception as e:  # noqa: BLE001 (any backend failure: the loop reads again)
            logger.warning("cannot read the current sizes from %s yet: %s", self.actuator.name, e)
            return
        for role in ROLES:
            metrics.AUTOSCALER_ACTUAL_REPLICAS.labels(role=role).set(current[role])

    async def step(self) -> ScalingDecision | None:
        """One read-forecast-decide-act round; None when the actuator could not be read."""
        try:
            return await self._step()
        except Exception:
            logger.exception("autoscaler step failed; sizes unchanged")
            return None

    @property
    def forecaster(self) -> Forecaster:
        return self.planner.forecaster

    @property
    def state(self) -> PoolState | None:
        return self.planner.state

    @property
    def last_decision(self) -> ScalingDecision | None:
        return self.planner.last_decision

    async def _step(self) -> ScalingDecision | None:
        now = self.clock()
        raw = await self.source.read()
        _export_signals(metrics.AUTOSCALER_OBSERVED, raw)
        predicted = self.planner.observe(raw, now)
        _export_signals(metrics.AUTOSCALER_PREDICTED, predicted)
        missing = predicted.missing()
        if missing:
            reason = f"missing_{missing[0]}"
            if predicted.error:
                reason = "warming_up" if self.planner.warming_up() else "unreachable"
            metrics.AUTOSCALER_SIGNAL_ERRORS.labels(reason=reason).inc()
        try:
            current = await self.actuator.current()
        except Exception as e:  # noqa: BLE001 (any backend failure: hold and retry next interval)
            logger.error("cannot read the current sizes from %s: %s; holding", self.actuator.name, e)
            return None
        for role in ROLES:
            metrics.AUTOSCALER_ACTUAL_REPLICAS.labels(role=role).set(current[role])
        decision, state, capacity = self.planner.decide(predicted, current, now)
        self._export_decision(decision, capacity)
        mode = "advisory " if self.config.advisory else ""
        logger.info("%sdecision %s (%s): %s", mode, decision.action, decision.cause, decision.reason)
        if self.config.advisory or decision.action == HOLD:
            reached = current
            done_at = now
        else:
            reached = await self.apply(decision, current)
            done_at = self.clock()  # cooldowns run from when the change took effect: a flip drains first
        self.planner.settle(state, decision, done_at, reached)
        return decision

    async def apply(self, decision: ScalingDecision, current: dict[str, int]) -> dict[str, int]:
        """Carry ``decision`` out from ``current``; returns the replicas reached."""
        reached = dict(current)
        if decision.num_flips and decision.flip_to is not None:
            to_role = decision.flip_to
            from_role = other_role(to_role)
            for _ in range(decision.num_flips):
                try:
                    worker = await self.actuator.flip(to_role)
                except Exception as e:  # noqa: BLE001 (stop here; the next step starts from current())
                    metrics.AUTOSCALER_ACTUATIONS.labels(role=to_role, kind="flip", outcome="error").inc()
                    logger.error("flip to %s failed: %s", to_role, e)
                    return reached
                if worker is None:
                    metrics.AUTOSCALER_ACTUATIONS.labels(role=to_role, kind="flip", outcome="fallback").inc()
                    logger.info("%s cannot flip in place; scaling %s down and %s up instead",
                                self.actuator.name, from_role, to_role)
                    break
                reached[to_role] += 1
                reached[from_role] -= 1
                metrics.AUTOSCALER_ACTUATIONS.labels(role=to_role, kind="flip", outcome="ok").inc()
                logger.info("flipped worker %s from %s to %s", worker, from_role, to_role)
        for role in sorted(ROLES, key=lambda r: decision.replicas(r) - reached[r]):  # shrink first
            want = decision.replicas(role)
            if want == reached[role]:
                continue
            kind = "scale_up" if want > reached[role] else "scale_down"
            try:
                await self.actuator.scale(role, want)
            except Exception as e:  # noqa: BLE001 (never grow after a failed shrink: the budget)
                metrics.AUTOSCALER_ACTUATIONS.labels(role=role, kind=kind, outcome="error").inc()
                logger.error("scaling %s %d->%d failed: %s", role, reached[role], want, e)
                return reached
            metrics.AUTOSCALER_ACTUATIONS.labels(role=role, kind=kind, outcome="ok").inc()
            logger.info("scaled %s %d->%d", role, reached[role], want)
            reached[role] = want
        return reached

    def _export_decision(self, decision: ScalingDecision, capacity: RoleCapacity) -> None:
        metrics.AUTOSCALER_DECISIONS.labels(action=decision.action, cause=decision.cause).inc()
        metrics.AUTOSCALER_LAST_DECISION.labels(self.actuator.name).set(time.time())
        capacities = {"prefill": capacity.prefill_tokens_per_s, "decode": capacity.decode_concurrency}
        for role in ROLES:
            metrics.AUTOSCALER_DESIRED_REPLICAS.labels(role=role).set(decision.replicas(role))
            metrics.AUTOSCALER_DEMAND_REPLICAS.labels(role=role).set(
                decision.prefill_demand if role == "prefill" else decision.decode_demand)
            metrics.AUTOSCALER_SLO_CORRECTION.labels(role=role).set(
                decision.prefill_correction if role == "prefill" else decision.decode_correction)
            metrics.AUTOSCALER_REPLICA_CAPACITY.labels(role=role).set(capacities[role])


def _export_signals(gauge: Gauge, signals: ScalingSignals) -> None:
    for name in SIGNAL_FIELDS:
        value = getattr(signals, name)
        gauge.labels(signal=name).set(value if math.isfinite(value) else math.nan)
