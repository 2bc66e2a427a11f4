"""What the autoscaler sizes from: :class:`ScalingSignals`, read from Prometheus by :class:`PrometheusSource`.

Signals are plain data, so the simulator builds them directly. A value that could not be read
is NaN, never a guess; ``error`` says why the whole read failed. The policy needs three of them
(:data:`ESSENTIAL`): without a request rate, or without the mean prompt and output lengths while
requests arrive, it holds the current sizes (fail-static). A request rate of exactly 0 is a real
signal (an idle model), and NaN means of an idle model are then irrelevant.

The PromQL (over ``rate_window_s``; ``model`` matches ``served_model_name`` when set), vLLM
semantics throughout::

    request_rate        offered load: sum(rate(pdserve_router_requests_total{endpoint=~completions,
                        status=~"2..|429|5.."}[w])) -- rejected (429) and failed requests are demand too
    prompt_tokens_mean  sum(rate(pdserve_router_prompt_tokens_total[w])) / admitted (2xx) request rate
    output_tokens_mean  sum(rate(pdserve_router_generation_tokens_total[w])) / admitted request rate
    prefix_hit_rate     hits / queries of pdserve_worker_prefix_cache_{hits,queries}_total, prefill role
    ttft_p90_s, itl_p90_s   histogram_quantile(0.9, sum by (le) (rate(<histogram>_bucket[w])))
    num_running_* / num_waiting_*   sum of the worker gauges per role
    kv_usage_*          avg of pdserve_worker_kv_cache_usage_ratio per role
    num_queued_prefill_tokens       sum of pdserve_worker_queued_prefill_tokens, prefill role

An empty result (no such series: the router never served a request, or every target is down
long enough for its series to go stale), a NaN or an infinite value is NaN here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import httpx

if TYPE_CHECKING:
    from autoscaler.forecast import Forecast

logger = logging.getLogger(__name__)

NAN = float("nan")
ESSENTIAL = ("request_rate", "prompt_tokens_mean", "output_tokens_mean")
GENERATION_ENDPOINTS = "/v1/completions|/v1/chat/completions"
OFFERED_STATUS = "2..|429|5.."


@dataclass(frozen=True, slots=True)
class ScalingSignals:
    """One reading of the cluster's load, at ``time`` (seconds since the epoch)."""

    time: float
    request_rate: float = NAN
    """Requests per second offered to the router (admitted + rejected + failed)."""
    prompt_tokens_mean: float = NAN
    """Mean prompt tokens per admitted request."""
    output_tokens_mean: float = NAN
    """Mean generated tokens per admitted request (all its choices)."""
    prefix_hit_rate: float = NAN
    """Fraction of prompt tokens found in the prefill workers' prefix caches."""
    ttft_p90_s: float = NAN
    itl_p90_s: float = NAN
    num_running_prefill: float = NAN
    num_waiting_prefill: float = NAN
    num_running_decode: float = NAN
    num_waiting_decode: float = NAN
    kv_usage_prefill: float = NAN
    kv_usage_decode: float = NAN
    num_queued_prefill_tokens: float = NAN
    error: str = ""
    """Why nothing could be read (Prometheus unreachable, a bad answer); empty otherwise."""

    def missing(self) -> tuple[str, ...]:
        """The essential signals that are NaN (the policy holds while any is); () when usable."""
        if self.error:
            return ("all",)
        if not math.isfinite(self.request_rate):
            return ("request_rate",)
        if self.request_rate == 0:
            return ()
        return tuple(name for name in ESSENTIAL[1:] if not math.isfinite(getattr(self, name)))

    @property
    def usable(self) -> bool:
        return not self.missing()

    def with_forecast(self, forecast: Forecast) -> ScalingSignals:
        """These signals with the forecast fields replaced by ``forecast``'s (when not NaN).

        Signals that are not usable are returned unchanged: a forecast must not paper over an
        outage (fail-static).
        """
        if not self.usable:
            return self
        values = {name: getattr(forecast, name) for name in FORECAST_FIELDS
                  if math.isfinite(getattr(forecast, name))}
        return dataclasses.replace(self, **values)

    def summary(self) -> str:
        """A short human-readable line for decision logs (values that are NaN left out)."""
        if self.error:
            return f"no signal: {self.error}"
        parts = [f"{label}={getattr(self, name):{fmt}}{unit}" for name, label, fmt, unit in _SUMMARY
                 if math.isfinite(getattr(self, name))]
        return " ".join(parts) or "no values"


_SUMMARY = (("request_rate", "rate", ".3g", "/s"), ("prompt_tokens_mean", "prompt", ".0f", ""),
            ("output_tokens_mean", "output", ".0f", ""), ("prefix_hit_rate", "hit", ".2f", ""),
            ("ttft_p90_s", "ttft_p90", ".3g", "s"), ("itl_p90_s", "itl_p90", ".3g", "s"),
            ("num_running_decode", "decoding", ".0f", ""), ("kv_usage_decode", "kv_decode", ".2f", ""),
            ("num_queued_prefill_tokens", "queued", ".0f", ""))
FORECAST_FIELDS = ("request_rate", "prompt_tokens_mean", "output_tokens_mean", "prefix_hit_rate")
SIGNAL_FIELDS = tuple(f.name for f in dataclasses.fields(ScalingSignals) if f.name not in ("time", "error"))
"""Every value field (what ``PrometheusSource`` queries and the loop exports)."""


class SignalSource(Protocol):
    async def read(self) -> ScalingSignals:
        """Called by the loop once per interval. Never raises for an unreachable backend: returns
        signals with ``error`` set (and every value NaN) instead."""
        ...


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_queries(window_s: float, served_model_name: str = "") -> dict[str, str]:
    """PromQL per ScalingSignals field (see the module docstring)."""
    w = f"{max(1, round(window_s))}s"
    model = f",model={_quote(served_model_name)}" if served_model_name else ""

    def sel(**labels: str) -> str:
        inner = ",".join(f"{k}{v}" for k, v in labels.items())
        return "{" + (inner + model).lstrip(",") + "}"

    endpoint = f"=~{_quote(GENERATION_ENDPOINTS)}"
    offered = f"sum(rate(pdserve_router_requests_total{sel(endpoint=endpoint, status='=~' + _quote(OFFERED_STATUS))}[{w}]))"
    admitted = f"sum(rate(pdserve_router_requests_total{sel(endpoint=endpoint, status='=~' + _quote('2..'))}[{w}]))"
    prefill, decode = "=" + _quote("prefill"), "=" + _quote("decode")

    def quantile(hist: str) -> str:
        return f"histogram_quantile(0.9, sum by (le) (rate({hist}_bucket{sel()}[{w}])))"

    def per_role(agg: str, metric: str, role: str) -> str:
        return f"{agg}({metric}{sel(role=role)})"

    return {
        "request_rate": offered,
        "prompt_tokens_mean": f"sum(rate(pdserve_router_prompt_tokens_total{sel()}[{w}])) / {admitted}",
        "output_tokens_mean": f"sum(rate(pdserve_router_generation_tokens_total{sel()}[{w}])) / {admitted}",
        "prefix_hit_rate": (f"sum(rate(pdserve_worker_prefix_cache_hits_total{sel(role=prefill)}[{w}])) / "
                            f"sum(rate(pdserve_worker_prefix_cache_queries_total{sel(role=prefill)}[{w}]))"),
        "ttft_p90_s": quantile("pdserve_router_time_to_first_token_seconds"),
        "itl_p90_s": quantile("pdserve_router_inter_token_latency_seconds"),
        "num_running_prefill": per_role("sum", "pdserve_worker_num_requests_running", prefill),
        "num_waiting_prefill": per_role("sum", "pdserve_worker_num_requests_waiting", prefill),
        "num_running_decode": per_role("sum", "pdserve_worker_num_requests_running", decode),
        "num_waiting_decode": per_role("sum", "pdserve_worker_num_requests_waiting", decode),
        "kv_usage_prefill": per_role("avg", "pdserve_worker_kv_cache_usage_ratio", prefill),
        "kv_usage_decode": per_role("avg", "pdserve_worker_kv_cache_usage_ratio", decode),
        "num_queued_prefill_tokens": per_role("sum", "pdserve_worker_queued_prefill_tokens", prefill),
    }


class PrometheusUnavailable(Exception):
    """The query could not be answered (connection refused, timeout, HTTP error, status != success)."""


def parse_single_value(body: Any) -> float:
    """The one value of an instant query's answer; NaN when empty, NaN or infinite.

    Raises PrometheusUnavailable for an answer that is not a successful query result.
    """
    if not isinstance(body, dict) or body.get("status") != "success":
        error = body.get("error") if isinstance(body, dict) else None
        raise PrometheusUnavailable(f"query failed: {error or body!r}")
    data = body.get("data") or {}
    kind, result = data.get("resultType"), data.get("result")
    try:
        if kind == "scalar":
            value = float(result[1])
        elif kind == "vector":
            if not result:
                return NAN
            if len(result) > 1:  # every query aggregates to one series; more is a surprise, not a sum
                logger.warning("query returned %d series; using none", len(result))
                return NAN
            value = float(result[0]["value"][1])
        else:
            raise PrometheusUnavailable(f"unexpected result type {kind!r}")
    except (TypeError, ValueError, IndexError, KeyError) as e:
        raise PrometheusUnavailable(f"malformed answer: {e!r}") from e
    return value if math.isfinite(value) else NAN


class PrometheusSource:
    """Reads ScalingSignals through Prometheus's ``/api/v1/query``, all queries concurrently."""

    def __init__(self, url: str, *, timeout_s: float = 5.0, window_s: float = 60.0, served_model_name: str = "",
                 client: httpx.AsyncClient | None = None) -> None:
        self.url = url.rstrip("/")
        self.queries = build_queries(window_s, served_model_name)
        self._timeout_s = timeout_s
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(timeout_s))
        self._own_client = client is None
        self._failing = False

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    async def query(self, promql: str) -> float:
        """One instant query's single value (NaN if none); PrometheusUnavailable if it cannot be answered."""
        try:
            response = await self._client.get(f"{self.url}/api/v1/query", params={"query": promql},
                                              timeout=self._timeout_s)
        except httpx.HTTPError as e:
            raise PrometheusUnavailable(f"{type(e).__name__}: {e}") from e
        try:
            body = response.json()
        except ValueError as e:
            raise PrometheusUnavailable(f"HTTP {response.status_code}, not JSON") from e
        if response.status_code != 200 and isinstance(body, dict) and body.get("status") == "success":
            raise PrometheusUnavailable(f"HTTP {response.status_code}")
        return parse_single_value(body)

    async def read(self) -> ScalingSignals:
        now = time.time()
        names = list(self.queries)
        results = await asyncio.gather(*(self.query(self.queries[n]) for n in names), return_exceptions=True)
        values: dict[str, float] = {}
        errors: list[str] = []
        for name, result in zip(names, results):
            if isinstance(result, PrometheusUnavailable):
                errors.append(f"{name}: {result}")
                values[name] = NAN
            elif isinstance(result, BaseException):
                raise result
            else:
                values[name] = result
        if errors and all(math.isnan(v) for v in values.values()):
            if not self._failing:
                logger.warning("Prometheus at %s unreachable: %s", self.url, errors[0])
            self._failing = True
            return ScalingSignals(time=now, error=f"Prometheus unreachable ({errors[0]})")
        if self._failing:
            logger.info("Prometheus at %s answers again", self.url)
        self._failing = False
        for e in errors:
            logger.warning("signal %s", e)
        return ScalingSignals(time=now, **values)
