"""Load forecasts: the request rate, prompt and output lengths and prefix hit rate one horizon ahead.

A :class:`Forecaster` takes one observation per interval (``observe``) and predicts the
:data:`~autoscaler.signals.FORECAST_FIELDS` ``horizon_s`` seconds after the last one (``predict``).
Forecasters are plain objects with no I/O, so the simulator drives them with simulated signals.
NaN observations are skipped field by field (an outage must not poison the state); a field never
observed is predicted as NaN, and the policy then holds.

- :class:`LastValueForecaster`: the last observed value (a reactive autoscaler).
- :class:`HoltForecaster`: Holt's linear method (double exponential smoothing) with irregular
  time steps: ``level += alpha * (x - (level + trend * dt))``, ``trend`` smoothed by ``beta`` over
  the level's change per second; ``predict(h) = level + trend * h``. ``beta = 0`` is a plain EWMA.
  Predictions are clamped to their domain (>= 0; the hit rate to [0, 1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from autoscaler.signals import FORECAST_FIELDS, NAN, ScalingSignals
from common.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Forecast:
    """Predicted values ``horizon_s`` after the last observation (NaN: no prediction)."""

    horizon_s: float
    request_rate: float = NAN
    prompt_tokens_mean: float = NAN
    output_tokens_mean: float = NAN
    prefix_hit_rate: float = NAN


class Forecaster(Protocol):
    name: str

    def observe(self, signals: ScalingSignals) -> None:
        """Called by the loop once per interval with the signals just read (NaN fields are skipped)."""
        ...

    def predict(self, horizon_s: float) -> Forecast:
        """Called by the loop after ``observe``: the forecast fields ``horizon_s`` ahead."""
        ...


def _readings(signals: ScalingSignals) -> dict[str, float]:
    """The forecast fields ``signals`` has values for (none when the whole read failed)."""
    if signals.error:
        return {}
    return {name: value for name in FORECAST_FIELDS if math.isfinite(value := getattr(signals, name))}


def _clamp(name: str, value: float) -> float:
    if math.isnan(value):
        return value
    value = max(0.0, value)
    return min(1.0, value) if name == "prefix_hit_rate" else value


class LastValueForecaster:
    name = "last"

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def observe(self, signals: ScalingSignals) -> None:
        self._last.update(_readings(signals))

    def predict(self, horizon_s: float) -> Forecast:
        return Forecast(horizon_s, **{n: _clamp(n, self._last.get(n, NAN)) for n in FORECAST_FIELDS})


@dataclass(slots=True)
class _Holt:
    level: float
    trend: float = 0.0
    time: float = 0.0


class HoltForecaster:
    name = "holt"

    def __init__(self, alpha: float = 0.5, beta: float = 0.2) -> None:
        if not 0 < alpha <= 1:
            raise ConfigError(f"must be in (0, 1], got {alpha}", field="holt_alpha")
        if not 0 <= beta <= 1:
            raise ConfigError(f"must be in [0, 1], got {beta}", field="holt_beta")
        self.alpha = alpha
        self.beta = beta
        self._state: dict[str, _Holt] = {}

    def observe(self, signals: ScalingSignals) -> None:
        for name, x in _readings(signals).items():
            s = self._state.get(name)
            if s is None:
                self._state[name] = _Holt(level=x, time=signals.time)
                continue
            dt = signals.time - s.time
            if dt <= 0:  # the same reading twice, or a clock step back: take it as the level
                s.level += self.alpha * (x - s.level)
                continue
            previous = s.level
            s.level = self.alpha * x + (1 - self.alpha) * (s.level + s.trend * dt)
            s.trend = self.beta * (s.level - previous) / dt + (1 - self.beta) * s.trend
            s.time = signals.time

    def predict(self, horizon_s: float) -> Forecast:
        values = {}
        for name in FORECAST_FIELDS:
            s = self._state.get(name)
            values[name] = NAN if s is None else _clamp(name, s.level + s.trend * horizon_s)
        return Forecast(horizon_s, **values)


def make_forecaster(name: str, *, alpha: float = 0.5, beta: float = 0.2) -> Forecaster:
    if name == "holt":
        return HoltForecaster(alpha=alpha, beta=beta)
    if name == "last":
        return LastValueForecaster()
    raise ConfigError(f"unknown forecaster {name!r}; one of holt, last", field="forecaster")
