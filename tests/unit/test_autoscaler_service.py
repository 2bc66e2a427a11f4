"""The autoscaler's loop with doubles (signals, actuator) and its forecasters; no processes, no network."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from autoscaler.actuators.base import ActuatorError, make_actuator
from autoscaler.config import AutoscalerConfig, SizingConfig
from autoscaler.forecast import HoltForecaster, LastValueForecaster, make_forecaster
from autoscaler.policy import FLIP
from autoscaler.service import Autoscaler
from autoscaler.signals import ScalingSignals, build_queries, parse_single_value
from common.errors import ConfigError
from router.cost_model import CostModel

COST = CostModel(prefill_per_token_s=1e-4, decode_base_s=0.01, decode_per_request_s=2e-4)
SIZING = SizingConfig(ttft_slo_s=1.0, itl_slo_s=0.05, decode_max_batch_size=256, gpu_budget=8, scale_up_cooldown_s=0,
                      scale_down_cooldown_s=0, max_step=8)
# 56/s x 1000 tokens = 7 prefill replicas; 56 x 50 x 0.05 = 140 concurrent -> 1 decode (budget 8)
PROMPT_HEAVY = ScalingSignals(time=0.0, request_rate=56.0, prompt_tokens_mean=1000.0, output_tokens_mean=50.0)


class Source:
    def __init__(self, *signals: ScalingSignals) -> None:
        self.queue = list(signals)

    async def read(self) -> ScalingSignals:
        return self.queue.pop(0) if len(self.queue) > 1 else self.queue[0]


class Actuator:
    def __init__(self, prefill: int, decode: int, *, can_flip: bool = True, fail: str | None = None) -> None:
        self.name = "double"
        self.replicas = {"prefill": prefill, "decode": decode}
        self.can_flip = can_flip
        self.fail = fail
        self.calls: list[tuple] = []

    async def current(self) -> dict[str, int]:
        if self.fail == "current":
            raise ActuatorError("backend down")
        return dict(self.replicas)

    async def scale(self, role: str, replicas: int) -> None:
        self.calls.append(("scale", role, replicas))
        if self.fail == role:
            raise ActuatorError(f"cannot scale {role}")
        self.replicas[role] = replicas

    async def flip(self, to_role: str) -> str | None:
        self.calls.append(("flip", to_role))
        if not self.can_flip:
            return None
        self.replicas[to_role] += 1
        self.replicas["decode" if to_role == "prefill" else "prefill"] -= 1
        return f"worker-{len(self.calls)}"


def loop(actuator: Actuator, *signals: ScalingSignals, advisory: bool = False) -> Autoscaler:
    ticks = iter(range(0, 10_000, 10))
    config = AutoscalerConfig(rate_window_s=5.0, metrics_port=None, advisory=advisory, forecaster="last")
    return Autoscaler(config, SIZING, source=Source(*signals), forecaster=LastValueForecaster(), actuator=actuator,
                      cost=COST, clock=lambda: float(next(ticks)))


def steps(autoscaler: Autoscaler, n: int):
    async def body():
        return [await autoscaler.step() for _ in range(n)]

    return asyncio.run(body())


def test_flips_first_when_the_total_is_fixed():
    a = Actuator(4, 4)
    first, second = steps(loop(a, PROMPT_HEAVY), 2)  # the first reading only warms up
    assert first.cause == "no_signal" and "warming up" in first.reason
    assert (second.action, second.num_flips, second.prefill, second.decode) == (FLIP, 3, 7, 1)
    assert a.calls == [("flip", "prefill")] * 3 and a.replicas == {"prefill": 7, "decode": 1}


def test_cooldowns_run_from_when_a_slow_flip_finished():
    """A flip drains its worker first (here 30 s); the next decision must not undo it 5 s after it landed."""
    now = [0.0]

    class SlowFlips(Actuator):
        async def flip(self, to_role: str) -> str | None:
            now[0] += 30.0
            return await super().flip(to_role)

    decode_heavy = ScalingSignals(time=0.0, request_rate=56.0, prompt_tokens_mean=10.0, output_tokens_mean=2000.0)
    sizing = dataclasses.replace(SIZING, scale_up_cooldown_s=20.0, scale_down_cooldown_s=20.0, max_step=1)
    config = AutoscalerConfig(rate_window_s=5.0, metrics_port=None, forecaster="last")
    a = SlowFlips(4, 4)
    autoscaler = Autoscaler(config, sizing, source=Source(PROMPT_HEAVY, PROMPT_HEAVY, decode_heavy), actuator=a,
                            forecaster=LastValueForecaster(), cost=COST, clock=lambda: now[0])

    async def at(t: float):
        now[0] = t
        return await autoscaler.step()

    async def body():
        return [await at(0.0), await at(10.0), await at(45.0), await at(61.0)]

    warm, flip, held, back = asyncio.run(body())
    assert warm.cause == "no_signal" and (flip.action, flip.flip_to) == (FLIP, "prefill")
    assert held.action == "hold" and held.cause == "cooldown"  # 5 s after the flip landed at 40 s
    assert (back.action, back.flip_to) == (FLIP, "decode")  # 21 s after: allowed
    assert a.calls == [("flip", "prefill"), ("flip", "decode")]


def test_a_fresh_autoscaler_grows_at_once_but_shrinks_only_after_the_scale_down_cooldown():
    """Pools found at start count as changed one scale-up cooldown before the first step: the first reading
    after the warm-up (here a ramp's low start) may grow them, but not shrink them for another 30 s."""
    quiet = ScalingSignals(time=0.0, request_rate=4.0, prompt_tokens_mean=1000.0, output_tokens_mean=50.0)
    sizing = dataclasses.replace(SIZING, gpu_budget=0, scale_up_cooldown_s=30.0, scale_down_cooldown_s=60.0)
    config = AutoscalerConfig(rate_window_s=15.0, metrics_port=None, forecaster="last")

    def run(*signals: ScalingSignals) -> list:
        now = [0.0]
        autoscaler = Autoscaler(config, sizing, source=Source(*signals), actuator=Actuator(4, 4, can_flip=False),
                                forecaster=LastValueForecaster(), cost=COST, clock=lambda: now[0])

        async def body():
            out = []
            for t in (0.0, 15.0, 30.0):
                now[0] = t
                out.append(await autoscaler.step())
            return out
        return asyncio.run(body())

    warm, held, shrunk = run(quiet)
    assert warm.cause == "no_signal"
    assert (held.action, held.cause, held.prefill, held.decode) == ("hold", "cooldown", 4, 4)
    assert shrunk.action == "scale" and (shrunk.prefill, shrunk.decode) == (1, 1)
    grown = run(PROMPT_HEAVY)[1]  # 7 prefill and 1 decode wanted: prefill grows, decode waits
    assert grown.action == "scale" and (grown.prefill, grown.decode) == (7, 4)


def test_without_in_place_flips_it_shrinks_before_it_grows():
    a = Actuator(4, 4, can_flip=False)
    steps(loop(a, PROMPT_HEAVY), 2)
    assert a.calls == [("flip", "prefill"), ("scale", "decode", 1), ("scale", "prefill", 7)]
    assert a.replicas == {"prefill": 7, "decode": 1}


def test_a_failed_shrink_stops_the_step():
    a = Actuator(4, 4, can_flip=False, fail="decode")
    autoscaler = loop(a, PROMPT_HEAVY)
    steps(autoscaler, 2)
    assert a.calls == [("flip", "prefill"), ("scale", "decode", 1)]  # prefill did not grow past the budget
    assert a.replicas == {"prefill": 4, "decode": 4}
    assert autoscaler.state is not None and autoscaler.state.decode_changed_at == 0.0  # as found at the first step


def test_advisory_mode_only_reports():
    a = Actuator(4, 4)
    decisions = steps(loop(a, PROMPT_HEAVY, advisory=True), 3)
    assert a.calls == []
    assert (decisions[-1].prefill, decisions[-1].decode) == (7, 1)
    assert REGISTRY.get_sample_value("pdserve_autoscaler_desired_replicas", {"role": "prefill"}) == 7
    assert REGISTRY.get_sample_value("pdserve_autoscaler_actual_replicas", {"role": "prefill"}) == 4
    assert REGISTRY.get_sample_value("pdserve_autoscaler_advisory", {"actuator": "double"}) == 1
    assert REGISTRY.get_sample_value("pdserve_autoscaler_predicted_value", {"signal": "request_rate"}) == 56


def test_no_signal_or_no_backend_changes_nothing():
    unreachable = ScalingSignals(time=0.0, error="Prometheus unreachable (ConnectError)")
    a = Actuator(3, 2)
    decisions = steps(loop(a, PROMPT_HEAVY, PROMPT_HEAVY, unreachable, unreachable, PROMPT_HEAVY), 5)
    assert [d.cause for d in decisions] == ["no_signal", "budget", "no_signal", "no_signal", "no_signal"]
    assert "warming up" in decisions[-1].reason  # back after a gap: hold one rate window first
    # 7 + 2 wanted > 8 GPUs: decode gives one worker up by a flip, then prefill grows to 7
    assert a.calls == [("flip", "prefill"), ("scale", "prefill", 7)]
    a = Actuator(3, 2, fail="current")
    assert steps(loop(a, PROMPT_HEAVY), 2) == [None, None] and a.calls == []


def test_a_failing_step_is_logged_not_raised():
    class Broken:
        async def read(self) -> ScalingSignals:
            raise RuntimeError("bug")

    autoscaler = loop(Actuator(1, 1))
    autoscaler.source = Broken()
    assert steps(autoscaler, 1) == [None]


def test_run_stops_on_the_event():
    async def body() -> None:
        autoscaler = loop(Actuator(1, 1), PROMPT_HEAVY)
        autoscaler.config = AutoscalerConfig(interval_s=0.01, metrics_port=None, rate_window_s=1)
        stop = asyncio.Event()
        task = asyncio.create_task(autoscaler.run(stop))
        await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(task, 2)
        assert autoscaler.last_decision is not None

    asyncio.run(body())


# --- forecasters ----------------------------------------------------------------------------------


def at(t: float, **values: float) -> ScalingSignals:
    return ScalingSignals(time=t, **values)


def test_holt_follows_a_trend():
    f = HoltForecaster(alpha=0.5, beta=0.5)
    for t in range(0, 300, 15):  # the rate climbs 1/s every 15 s
        f.observe(at(t, request_rate=10 + t / 15, prompt_tokens_mean=500.0, prefix_hit_rate=0.5))
    p = f.predict(60.0)
    assert p.request_rate == pytest.approx(29 + 4, rel=0.02)  # last value 29, 4 more a minute on
    assert p.prompt_tokens_mean == pytest.approx(500.0)
    assert math.isnan(p.output_tokens_mean)  # never observed: no prediction
    last = LastValueForecaster()
    last.observe(at(0, request_rate=29.0))
    assert last.predict(60.0).request_rate == 29.0


def test_forecasts_skip_gaps_and_stay_in_their_domain():
    f = HoltForecaster(alpha=0.5, beta=0.5)
    for t, rate in ((0, 10.0), (15, 5.0), (30, 0.0)):
        f.observe(at(t, request_rate=rate, prefix_hit_rate=min(1.0, 0.5 + t / 30)))
    f.observe(at(45, error="down"))  # an outage leaves the state alone
    f.observe(at(60, request_rate=math.nan))
    p = f.predict(600.0)
    assert p.request_rate == 0.0 and 0.0 <= p.prefix_hit_rate <= 1.0
    with pytest.raises(ConfigError):
        make_forecaster("prophet")
    with pytest.raises(ConfigError):
        HoltForecaster(alpha=0.0)


def test_forecasts_do_not_hide_an_outage():
    f = LastValueForecaster()
    f.observe(PROMPT_HEAVY)
    down = ScalingSignals(time=1.0, error="Prometheus unreachable")
    assert down.with_forecast(f.predict(60.0)) == down


# --- PromQL and answers -----------------------------------------------------------------------------


def test_queries_filter_by_model_and_role():
    q = build_queries(60, 'my"model')
    assert q["request_rate"] == ('sum(rate(pdserve_router_requests_total{endpoint=~"/v1/completions|'
                                 '/v1/chat/completions",status=~"2..|429|5..",model="my\\"model"}[60s]))')
    assert 'role="prefill"' in q["prefix_hit_rate"] and 'role="decode"' in q["kv_usage_decode"]
    assert q["ttft_p90_s"].startswith("histogram_quantile(0.9, sum by (le) (rate(")


def test_answers_parse_to_values_or_nan():
    ok = {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "2.5"]}]}}
    assert parse_single_value(ok) == 2.5
    for value in ("NaN", "+Inf", "-Inf"):
        assert math.isnan(parse_single_value({"status": "success", "data": {
            "resultType": "vector", "result": [{"metric": {}, "value": [1, value]}]}}))
    assert math.isnan(parse_single_value({"status": "success", "data": {"resultType": "vector", "result": []}}))
    assert parse_single_value({"status": "success", "data": {"resultType": "scalar", "result": [1, "3"]}}) == 3
    from autoscaler.signals import PrometheusUnavailable

    with pytest.raises(PrometheusUnavailable):
        parse_single_value({"status": "error", "error": "bad query"})


def test_the_autoscaler_never_imports_torch():
    code = ("import sys, autoscaler.cli, autoscaler.actuators.kubernetes, autoscaler.actuators.local; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2]).returncode == 0


def test_a_cost_model_that_predicts_nothing_is_refused():
    with pytest.raises(ConfigError) as e:
        Autoscaler(AutoscalerConfig(metrics_port=None), SIZING, source=Source(PROMPT_HEAVY),
                   forecaster=LastValueForecaster(), actuator=Actuator(1, 1), cost=CostModel())
    assert e.value.field == "cost_model"


def test_make_actuator_names_the_backends(tmp_path):
    with pytest.raises(ConfigError) as e:
        make_actuator(AutoscalerConfig(actuator="local"))
    assert e.value.field == "actuator"
    with pytest.raises(ConfigError) as e:  # no pod, no kubeconfig: refused at start, not at the first step
        make_actuator(AutoscalerConfig(kubeconfig=str(tmp_path / "missing")))
    assert e.value.field == "kubeconfig"


def test_cli_exits_2_on_a_config_error(tmp_path, capsys):
    import argparse

    from autoscaler import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--kubeconfig", str(tmp_path / "missing"), "--metrics-port", "none"])
    assert cli.run(args) == 2
    assert "kubeconfig" in capsys.readouterr().err
    assert cli.run(parser.parse_args(["--actuator", "local"])) == 2
    assert cli.run(parser.parse_args(["--min-decode", "0"])) == 2


def test_serve_exports_metrics_and_holds_without_prometheus():
    import httpx

    from autoscaler.cli import serve
    from tests.prometheus_server import free_port

    port = free_port()
    config = AutoscalerConfig(prometheus_url=f"http://127.0.0.1:{free_port()}", prometheus_timeout_s=0.5,
                              interval_s=0.05, metrics_port=port)
    a = Actuator(2, 3)

    async def body() -> str:
        stop = asyncio.Event()
        task = asyncio.create_task(serve(config, SIZING, a, stop=stop))
        await asyncio.sleep(0.5)
        text = (await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/metrics", timeout=5)).text
        stop.set()
        await asyncio.wait_for(task, 5)
        return text

    text = asyncio.run(body())
    assert a.calls == []  # nothing to go on: nothing changes
    assert 'pdserve_autoscaler_desired_replicas{role="decode"} 3.0' in text
    assert 'pdserve_autoscaler_signal_errors_total{reason="unreachable"}' in text
    assert 'pdserve_autoscaler_decisions_total{action="hold",cause="no_signal"}' in text
