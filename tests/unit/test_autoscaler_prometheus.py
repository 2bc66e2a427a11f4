"""The autoscaler against a real Prometheus (``/usr/bin/prometheus``) scraping metrics the test controls.

:class:`FakeCluster` serves the router and worker metric names the autoscaler reads (through
prometheus_client, as the real components do), with counters that grow at rates the test sets, so
every value read through PromQL has a known answer. Then Prometheus is stopped mid-run: the loop
holds (no scale calls at all) until it is back on the same port and data directory, and then
scales again.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from autoscaler.config import AutoscalerConfig, SizingConfig
from autoscaler.forecast import LastValueForecaster
from autoscaler.policy import NO_SIGNAL
from autoscaler.service import Autoscaler
from autoscaler.signals import PrometheusSource
from router.cost_model import CostModel
from tests.prometheus_server import PrometheusServer, free_port, prometheus_factory_fixture  # noqa: F401

MODEL = "demo"
WINDOW_S = 4.0
# the fraction of observations at or below each bucket bound (TTFT p90 = 0.25 + 0.25 * 0.1/0.2 = 0.375 s;
# ITL p90 = 0.02 + 0.03 * 0.05/0.15 = 0.03 s)
TTFT_BUCKETS = ((0.1, 0.5), (0.25, 0.8), (0.5, 1.0))
ITL_BUCKETS = ((0.01, 0.6), (0.02, 0.85), (0.05, 1.0))


class FakeCluster:
    """Router and worker metrics whose counters grow at rates set by ``set_load`` (exact rate())."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.router = False  # no router series yet: its queries come back empty
        self.rates: dict[str, float] = {}
        self.totals: dict[str, float] = {}
        self.since = time.time()
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.port = free_port()
        self.server, _ = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def set_load(self, *, ok: float, rejected: float, prompt: float, output: float, hit: float) -> None:
        """Requests/s answered 200 and 429, tokens per request, prefill prefix hit rate."""
        with self.lock:
            self._advance()
            self.router = True
            self.rates = {"ok": ok, "rejected": rejected, "bad": 5.0, "models": 3.0, "prompt": ok * prompt,
                          "output": ok * output, "queries": 1000.0, "hits": 1000.0 * hit,
                          "decode_queries": 500.0, "decode_hits": 450.0, "ttft": ok, "itl": ok * output}

    def _advance(self) -> None:
        now = time.time()
        for name, rate in self.rates.items():
            self.totals[name] = self.totals.get(name, 0.0) + rate * (now - self.since)
        self.since = now

    def collect(self) -> Iterator[Any]:
        with self.lock:
            self._advance()
            t = dict(self.totals)
            router = self.router
        base = {"model": MODEL, "instance": "router-0"}
        if router:
            requests = CounterMetricFamily("pdserve_router_requests", "", labels=[*base, "endpoint", "status"])
            for endpoint, status, key in (("/v1/completions", "200", "ok"), ("/v1/chat/completions", "429", "rejected"),
                                          ("/v1/completions", "400", "bad"), ("/v1/models", "200", "models")):
                requests.add_metric([*base.values(), endpoint, status], t[key])
            yield requests
            for name, key in (("pdserve_router_prompt_tokens", "prompt"),
                              ("pdserve_router_generation_tokens", "output")):
                family = CounterMetricFamily(name, "", labels=list(base))
                family.add_metric(list(base.values()), t[key])
                yield family
            for name, key, buckets in (("pdserve_router_time_to_first_token_seconds", "ttft", TTFT_BUCKETS),
                                       ("pdserve_router_inter_token_latency_seconds", "itl", ITL_BUCKETS)):
                n = t[key]
                family = HistogramMetricFamily(name, "", labels=list(base))
                family.add_metric(list(base.values()), [(str(le), frac * n) for le, frac in buckets] + [("+Inf", n)],
                                  sum_value=0.1 * n)
                yield family
        workers = [("prefill", "p0", 3, 1, 0.2, 1000), ("prefill", "p1", 4, 0, 0.4, 500),
                   ("decode", "d0", 10, 5, 0.5, 0), ("decode", "d1", 20, 0, 0.7, 0)]
        labels = ["model", "role", "instance"]
        gauges = {name: GaugeMetricFamily(name, "", labels=labels) for name in (
            "pdserve_worker_num_requests_running", "pdserve_worker_num_requests_waiting",
            "pdserve_worker_kv_cache_usage_ratio", "pdserve_worker_queued_prefill_tokens")}
        for role, instance, running, waiting, kv, queued in workers:
            values = (running, waiting, kv, queued)
            for family, value in zip(gauges.values(), values):
                family.add_metric([MODEL, role, instance], value)
        yield from gauges.values()
        if router:
            for name, prefill_key, decode_key in (("pdserve_worker_prefix_cache_queries", "queries", "decode_queries"),
                                                  ("pdserve_worker_prefix_cache_hits", "hits", "decode_hits")):
                family = CounterMetricFamily(name, "", labels=labels)
                family.add_metric([MODEL, "prefill", "p0"], t[prefill_key])
                family.add_metric([MODEL, "decode", "d0"], t[decode_key])
                yield family


@pytest.fixture
def cluster() -> Iterator[FakeCluster]:
    c = FakeCluster()
    yield c
    c.close()


async def until_usable(source: PrometheusSource, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        s = await source.read()
        if s.usable and math.isfinite(s.prefix_hit_rate) and math.isfinite(s.ttft_p90_s):
            return s
        assert time.monotonic() < deadline, f"signals still not usable: {s}"
        await asyncio.sleep(0.25)


def test_signals_through_promql(cluster: FakeCluster, prometheus_factory) -> None:
    prom: PrometheusServer = prometheus_factory({"pdserve": [f"127.0.0.1:{cluster.port}"]})
    prom.wait_for('sum(pdserve_worker_num_requests_running{role="decode"})')

    async def body() -> None:
        source = PrometheusSource(prom.url, timeout_s=2.0, window_s=WINDOW_S, served_model_name=MODEL)
        # the router has served nothing yet: its series do not exist, so there is no signal
        empty = await source.read()
        assert math.isnan(empty.request_rate) and not empty.usable and empty.missing() == ("request_rate",)
        assert empty.num_running_decode == 30 and empty.error == ""

        cluster.set_load(ok=8.0, rejected=2.0, prompt=2000.0, output=40.0, hit=0.25)
        await until_usable(source)
        await asyncio.sleep(WINDOW_S + 1)  # until samples cover the whole rate window (else rate() reads low)
        s = await source.read()
        assert s.request_rate == pytest.approx(10.0, rel=0.03)  # 200s and 429s; not the 400s or /v1/models
        assert s.prompt_tokens_mean == pytest.approx(2000.0, rel=0.03)  # per admitted request
        assert s.output_tokens_mean == pytest.approx(40.0, rel=0.03)
        assert s.prefix_hit_rate == pytest.approx(0.25, rel=0.03)  # the prefill role's (decode's is 0.9)
        assert s.ttft_p90_s == pytest.approx(0.375, rel=0.01)
        assert s.itl_p90_s == pytest.approx(0.03, rel=0.01)
        assert (s.num_running_prefill, s.num_waiting_prefill) == (7, 1)
        assert (s.num_running_decode, s.num_waiting_decode) == (30, 5)
        assert s.kv_usage_prefill == pytest.approx(0.3) and s.kv_usage_decode == pytest.approx(0.6)
        assert s.num_queued_prefill_tokens == 1500
        # another model's name matches no series: no signal, not zero
        other = PrometheusSource(prom.url, timeout_s=2.0, window_s=WINDOW_S, served_model_name="other")
        assert math.isnan((await other.read()).request_rate)
        await other.aclose()
        await source.aclose()

    asyncio.run(body())


class RecordingActuator:
    """Pools that change exactly as asked; every call recorded with the time it was made."""

    name = "recording"

    def __init__(self, prefill: int, decode: int) -> None:
        self.replicas = {"prefill": prefill, "decode": decode}
        self.calls: list[tuple[float, str, str, int]] = []

    async def current(self) -> dict[str, int]:
        return dict(self.replicas)

    async def scale(self, role: str, replicas: int) -> None:
        self.calls.append((time.monotonic(), "scale", role, replicas))
        self.replicas[role] = replicas

    async def flip(self, to_role: str) -> str | None:
        self.calls.append((time.monotonic(), "flip", to_role, 0))
        return None


def test_prometheus_stopped_mid_run_holds_then_resumes(cluster: FakeCluster, prometheus_factory) -> None:
    prom: PrometheusServer = prometheus_factory({"pdserve": [f"127.0.0.1:{cluster.port}"]})
    # prefill: 10/s x 2000 tokens x 75% uncached = 15,000 tokens/s (+ 1,500 queued / 60 s) over 8,000 per
    # replica -> 2 replicas; at 20/s -> 30,025 / 8,000 -> 4 replicas. Decode stays at 1 (35 / 160).
    cost = CostModel(prefill_per_token_s=1e-4, decode_base_s=0.01, decode_per_request_s=2e-4)
    sizing = SizingConfig(ttft_slo_s=1.0, itl_slo_s=0.05, decode_max_batch_size=256, scale_up_cooldown_s=0,
                          scale_down_cooldown_s=0, max_step=8)
    config = AutoscalerConfig(prometheus_url=prom.url, prometheus_timeout_s=1.0, rate_window_s=WINDOW_S,
                              interval_s=0.3, served_model_name=MODEL, metrics_port=None)
    actuator = RecordingActuator(1, 1)
    source = PrometheusSource(prom.url, timeout_s=1.0, window_s=WINDOW_S, served_model_name=MODEL)
    autoscaler = Autoscaler(config, sizing, source=source, forecaster=LastValueForecaster(), actuator=actuator,
                            cost=cost)

    def unreachable() -> float:
        return REGISTRY.get_sample_value("pdserve_autoscaler_signal_errors_total", {"reason": "unreachable"}) or 0.0

    async def wait_for(cond, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            assert time.monotonic() < deadline, f"{what}: calls {actuator.calls}, last {autoscaler.last_decision}"
            await asyncio.sleep(0.1)

    async def body() -> None:
        stop = asyncio.Event()
        loop = asyncio.create_task(autoscaler.run(stop))
        try:
            cluster.set_load(ok=8.0, rejected=2.0, prompt=2000.0, output=40.0, hit=0.25)
            await wait_for(lambda: actuator.replicas["prefill"] == 2, 30, "scaling to 2 prefill")
            assert [c[1:] for c in actuator.calls] == [("scale", "prefill", 2)]

            # Prometheus goes away mid-run, and meanwhile the load doubles
            await asyncio.to_thread(prom.stop)
            errors_before = unreachable()
            cluster.set_load(ok=16.0, rejected=4.0, prompt=2000.0, output=40.0, hit=0.25)
            await asyncio.sleep(WINDOW_S + 2)
            assert [c[1:] for c in actuator.calls] == [("scale", "prefill", 2)], "scaled without a signal"
            assert actuator.replicas == {"prefill": 2, "decode": 1}
            held = autoscaler.last_decision
            assert held is not None and held.cause == NO_SIGNAL and (held.prefill, held.decode) == (2, 1)
            assert "Prometheus unreachable" in held.reason
            assert unreachable() - errors_before >= 10  # one per interval

            # back on the same port and data directory: the loop picks up where it left off
            await asyncio.to_thread(prom.restart)
            restarted_at = time.monotonic()
            await wait_for(lambda: actuator.replicas["prefill"] == 4, 30, "scaling to 4 prefill after the restart")
            # straight to 4: the warm-up hides the first seconds, when rate() covers part of the window and reads low
            assert [c[1:] for c in actuator.calls] == [("scale", "prefill", 2), ("scale", "prefill", 4)]
            assert actuator.calls[1][0] > restarted_at + WINDOW_S
            assert actuator.replicas["decode"] == 1
        finally:
            stop.set()
            await loop
            await source.aclose()

    asyncio.run(body())
