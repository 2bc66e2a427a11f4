"""The pool-sizing policy's defining behaviours, with numbers worked out by hand.

The cost model is deliberately simple: prefill costs 0.1 ms per new token (nothing else), a decode
step costs 10 ms + 0.2 ms per request. With TTFT SLO 1 s, ITL SLO 50 ms, target utilization 0.8
and a 256-request batch limit:

- prefill: prompts of 1000 tokens share a 2048-token pass two at a time: 0.2 s per pass, 10,000
  tokens/s saturated; the M/D/1 bound 2(1 - 0.2)/(2 - 0.2) = 0.89 is above 0.8, so one replica
  plans for 0.8 x 10,000 = 8,000 uncached tokens/s (100-token prompts: 20 per pass, same 8,000).
- decode: (50 ms - 10 ms) / 0.2 ms = 200 requests per batch, a 10 + 0.2 x 200 = 50 ms step;
  one replica plans for 0.8 x 200 = 160 concurrent requests; load is rate x output x 50 ms.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from autoscaler.capacity import capacity_from_cost_model, mdl_utilization_bound, prefill_pass
from autoscaler.config import SizingConfig
from autoscaler.policy import (
    BOUNDS,
    BUDGET,
    COOLDOWN,
    DEMAND,
    FLIP,
    HOLD,
    NO_SIGNAL,
    SCALE,
    SLO_DRIFT,
    STEADY,
    PoolState,
    ScalingDecision,
    decide,
)
from autoscaler.signals import ScalingSignals
from common.errors import ConfigError
from router.cost_model import CostModel

NOW = 10_000.0
COST = CostModel(prefill_per_token_s=1e-4, decode_base_s=0.01, decode_per_request_s=2e-4)
BASE = SizingConfig(ttft_slo_s=1.0, itl_slo_s=0.05, target_utilization=0.8, decode_max_batch_size=256,
                    max_prefill=8, max_decode=8, hysteresis=0.2, scale_up_cooldown_s=60,
                    scale_down_cooldown_s=300, max_step=10)
PROMPT_HEAVY = dict(request_rate=20.0, prompt_tokens_mean=1000.0, output_tokens_mean=50.0)
OUTPUT_HEAVY = dict(request_rate=20.0, prompt_tokens_mean=100.0, output_tokens_mean=1000.0)


def signals(**values: float) -> ScalingSignals:
    return ScalingSignals(time=NOW, **values)


def run(values: dict, prefill: int = 1, decode: int = 1, *, config: SizingConfig = BASE,
        state: PoolState | None = None, **signal_overrides: float) -> ScalingDecision:
    s = signals(**{**values, **signal_overrides})
    state = state or PoolState(prefill, decode)
    capacity = capacity_from_cost_model(COST, config, s.prompt_tokens_mean, s.output_tokens_mean, s.prefix_hit_rate)
    return decide(s, state, config, capacity, NOW)


def cfg(**changes) -> SizingConfig:
    return dataclasses.replace(BASE, **changes)


# --- capacities -------------------------------------------------------------------------------------


def test_capacities_from_the_cost_model():
    cap = capacity_from_cost_model(COST, BASE, 1000, 500)
    assert prefill_pass(COST, 1000, 0, 2048) == (pytest.approx(0.2), 2)
    assert mdl_utilization_bound(0.2, 1.0) == pytest.approx(1.6 / 1.8)
    assert cap.prefill_tokens_per_s == pytest.approx(8000)
    assert cap.decode_concurrency == pytest.approx(160)
    assert cap.decode_step_s == pytest.approx(0.05)
    # long prompts go in chunks, one prompt per pass; an SLO one pass cannot meet is reported
    assert prefill_pass(COST, 5000, 0, 2048) == (pytest.approx(0.5), 1)
    slow = capacity_from_cost_model(COST, cfg(ttft_slo_s=0.4), 5000, 500)
    assert "TTFT SLO 0.4s unattainable" in slow.note
    assert slow.prefill_tokens_per_s == pytest.approx(0.8 * 10_000)
    # the KV cache bounds the batch when the model knows its size: 100,000 tokens / 1250 per request
    kv = capacity_from_cost_model(dataclasses.replace(COST, kv_capacity_tokens=100_000), BASE, 1000, 500)
    assert kv.decode_concurrency == pytest.approx(0.8 * 80)


# --- demand: the load's shape decides which pool grows ----------------------------------------------


def test_prompt_heavy_load_grows_prefill():
    # 20/s x 1000 tokens = 20,000 tokens/s / 8,000 = 2.5 -> 3 prefill; 20 x 50 x 0.05 = 50 / 160 -> 1 decode
    d = run(PROMPT_HEAVY)
    assert (d.prefill, d.decode) == (3, 1)
    assert d.prefill_demand == pytest.approx(2.5) and d.decode_demand == pytest.approx(50 / 160)
    assert (d.action, d.cause, d.num_flips) == (SCALE, DEMAND, 0)
    assert "prefill 1->3" in d.reason and "20000 uncached tok/s" in d.reason


def test_output_heavy_load_grows_decode():
    # 20/s x 100 tokens = 2,000 tokens/s -> 1 prefill; 20 x 1000 x 0.05 = 1000 concurrent / 160 = 6.25 -> 7 decode
    d = run(OUTPUT_HEAVY)
    assert (d.prefill, d.decode) == (1, 7)
    assert d.decode_demand == pytest.approx(6.25)


def test_prefix_hits_shrink_prefill_demand():
    # half of each 1000-token prompt cached: 10,000 uncached tokens/s; 500-token prompts, 4 a pass -> 8,000/s
    d = run(PROMPT_HEAVY, prefix_hit_rate=0.5)
    assert d.prefill_demand == pytest.approx(1.25) and d.prefill == 2


def test_observed_queues_and_kv_pressure_raise_demand():
    # 300 requests decoding now outweigh the predicted 50: 300 / 160 = 1.875 -> 2
    assert run(PROMPT_HEAVY, num_running_decode=280, num_waiting_decode=20).decode == 2
    # 96,000 queued prompt tokens to clear in 60 s add 1,600 tokens/s: 21,600 / 8,000 = 2.7 -> 3
    d = run(PROMPT_HEAVY, num_queued_prefill_tokens=96_000)
    assert d.prefill_demand == pytest.approx(2.7)
    # 4 decode workers whose KV is 90% full: 4 x 0.9 / 0.8 = 4.5 -> 5
    d = run(PROMPT_HEAVY, 3, 4, kv_usage_decode=0.9)
    assert d.decode_demand == pytest.approx(4.5) and d.decode == 5


# --- budget, bounds, hysteresis, cooldowns, max step ------------------------------------------------


def test_gpu_budget_caps_the_total_and_splits_it_by_need():
    # both roles loaded: 2.5 prefill and 6.25 decode wanted (3 + 7 = 10 GPUs) within 9 GPUs:
    # 1+7 serves prefill at 0.4 of its need, 2+7 at 0.8, 3+6 at min(1.2, 0.96) = 0.96 -> 3+6
    both = dict(request_rate=20.0, prompt_tokens_mean=1000.0, output_tokens_mean=1000.0)
    d = run(both, config=cfg(gpu_budget=9))
    assert (d.prefill, d.decode) == (3, 6) and d.cause == BUDGET
    assert "budget 9 GPUs" in d.reason
    # without a budget: 3 + 7
    assert (run(both).prefill, run(both).decode) == (3, 7)
    # GPUs per worker count: with 2-GPU decode workers, 2+3 and 3+3 both serve decode at 3/6.25 = 0.48
    # of its need (the best there is); the tie goes to the split closer to now (1+1)
    d = run(both, config=cfg(gpu_budget=9, gpus_per_decode=2))
    assert (d.prefill, d.decode) == (2, 3)


def test_min_and_max_replicas():
    idle = dict(request_rate=0.0)
    d = run(idle, 4, 4, state=PoolState(4, 4))
    assert (d.prefill, d.decode) == (1, 1)  # an idle model shrinks to the minimums, not to zero
    d = run(idle, 4, 4, config=cfg(min_prefill=2, min_decode=3))
    assert (d.prefill, d.decode) == (2, 3)
    d = run(OUTPUT_HEAVY, config=cfg(max_decode=4))
    assert d.decode == 4 and d.decode_demand == pytest.approx(6.25)
    d = run(dict(request_rate=0.0), 1, 1, config=cfg(min_prefill=2))
    assert (d.prefill, d.decode, d.cause) == (2, 1, BOUNDS)


def test_hysteresis_holds_small_drops():
    # 7 decode workers; demand 6.25 -> ceil(6.25 x 1.2) = 8 is not below 7: hold
    d = run(OUTPUT_HEAVY, 1, 7)
    assert (d.decode, d.action, d.cause) == (7, HOLD, STEADY)
    # 17.6/s: demand 5.5 -> ceil(6.6) = 7: still hold; without hysteresis it would drop to 6
    assert run(OUTPUT_HEAVY, 1, 7, request_rate=17.6).decode == 7
    assert run(OUTPUT_HEAVY, 1, 7, request_rate=17.6, config=cfg(hysteresis=0.0)).decode == 6
    # 16/s: demand 5.0 -> ceil(6.0) = 6 < 7: down to 6
    assert run(OUTPUT_HEAVY, 1, 7, request_rate=16.0).decode == 6


def test_cooldowns():
    recent = PoolState(1, 1, prefill_changed_at=NOW - 30)
    d = run(PROMPT_HEAVY, state=recent)
    assert (d.prefill, d.action, d.cause) == (1, HOLD, COOLDOWN)
    assert "prefill up 1->3 in cooldown (30s < 60s)" in d.reason
    assert run(PROMPT_HEAVY, state=PoolState(1, 1, prefill_changed_at=NOW - 61)).prefill == 3
    # shrinking waits for the longer scale-down cooldown
    idle = dict(request_rate=0.0)
    assert run(idle, state=PoolState(3, 1, prefill_changed_at=NOW - 100)).prefill == 3
    assert run(idle, state=PoolState(3, 1, prefill_changed_at=NOW - 301)).prefill == 1
    # the other role is not held back by this one's cooldown
    d = run(OUTPUT_HEAVY, state=PoolState(1, 1, prefill_changed_at=NOW))
    assert d.decode == 7


def test_max_step():
    d = run(OUTPUT_HEAVY, config=cfg(max_step=2))
    assert (d.prefill, d.decode) == (1, 3)
    d = run(dict(request_rate=0.0), 8, 8, config=cfg(max_step=2))
    assert (d.prefill, d.decode) == (6, 6)


def test_a_shrink_held_by_cooldown_does_not_let_growth_overrun_the_budget():
    # budget 8, at 4+4; prefill wants 7 and decode would give up 3, but decode changed 100 s ago
    heavy = dict(request_rate=56.0, prompt_tokens_mean=1000.0, output_tokens_mean=50.0)
    d = run(heavy, config=cfg(gpu_budget=8), state=PoolState(4, 4, decode_changed_at=NOW - 100))
    assert (d.prefill, d.decode) == (4, 4) and d.action == HOLD and d.cause == COOLDOWN


# --- flips --------------------------------------------------------------------------------------------


def test_flip_preferred_when_the_total_is_fixed():
    # budget 8 at 4+4: 56/s x 1000 tokens = 56,000 / 8,000 = 7 prefill; decode 56 x 50 x 0.05 = 140 -> 0.875
    # wanted 7 + 2 (hysteresis: ceil(1.05)) = 9 > 8: 7+1 serves both fully -> 3 workers flip to prefill
    heavy = dict(request_rate=56.0, prompt_tokens_mean=1000.0, output_tokens_mean=50.0)
    d = run(heavy, 4, 4, config=cfg(gpu_budget=8))
    assert (d.prefill, d.decode) == (7, 1)
    assert (d.action, d.flip_to, d.num_flips) == (FLIP, "prefill", 3)
    assert "3 flips to prefill" in d.reason
    # the max step bounds flips too
    d = run(heavy, 4, 4, config=cfg(gpu_budget=8, max_step=2))
    assert (d.prefill, d.decode, d.num_flips) == (6, 2, 2)
    # and the other way round
    d = run(OUTPUT_HEAVY, 6, 2, config=cfg(gpu_budget=8))
    assert (d.prefill, d.decode, d.flip_to, d.num_flips) == (1, 7, "decode", 5)
    # no flips when disabled or when the roles' workers use different numbers of GPUs
    d = run(heavy, 4, 4, config=cfg(gpu_budget=8, prefer_flips=False))
    assert (d.action, d.num_flips) == (SCALE, 0)
    d = run(heavy, 4, 2, config=cfg(gpu_budget=8, gpus_per_decode=2))
    assert d.num_flips == 0
    # growing both roles is no flip
    assert run(dict(request_rate=20.0, prompt_tokens_mean=1000.0, output_tokens_mean=1000.0)).num_flips == 0


# --- reactive SLO correction --------------------------------------------------------------------------


def test_ttft_drift_adds_prefill_and_the_correction_persists():
    # observed TTFT p90 2 s vs SLO 1 s: x2 -> 40,000 tokens/s / 8,000 = 5 prefill
    d = run(PROMPT_HEAVY, ttft_p90_s=2.0)
    assert d.prefill_correction == pytest.approx(2.0)
    assert (d.prefill, d.cause) == (5, SLO_DRIFT)
    assert "prefill x2.00 for TTFT p90 2s vs SLO 1s" in d.reason
    # once applied the correction stays while TTFT is on target (an integral, not a one-off)
    state = PoolState(1, 1).after(d, NOW)
    later = dataclasses.replace(state, prefill_changed_at=NOW - 120)
    again = run(PROMPT_HEAVY, state=later, ttft_p90_s=1.05)
    assert again.prefill_correction == pytest.approx(2.0) and again.prefill == 5
    # it is not updated while the last change may not have taken effect yet
    assert run(PROMPT_HEAVY, state=state, ttft_p90_s=3.0).prefill_correction == pytest.approx(2.0)
    # latency well under the SLO decays it, but not below slo_correction_min
    assert run(PROMPT_HEAVY, state=later, ttft_p90_s=0.8).prefill_correction == pytest.approx(1.6)
    assert run(PROMPT_HEAVY, state=later, ttft_p90_s=0.1).prefill_correction == pytest.approx(1.0)
    # it is bounded above, and at most doubles per decision
    assert run(PROMPT_HEAVY, ttft_p90_s=10.0).prefill_correction == pytest.approx(2.0)
    capped = dataclasses.replace(later, prefill_correction=3.0)
    assert run(PROMPT_HEAVY, state=capped, ttft_p90_s=10.0).prefill_correction == pytest.approx(4.0)


def test_itl_drift_adds_decode():
    # ITL p90 75 ms vs 50 ms: x1.5 -> 20/s x 500 tokens x 0.05 s = 500 x 1.5 = 750 / 160 = 4.69 -> 5
    # (500 / 160 = 3.1 -> 4 without the drift)
    d = run(OUTPUT_HEAVY, output_tokens_mean=500.0, itl_p90_s=0.075)
    assert d.decode_correction == pytest.approx(1.5) and d.decode == 5
    assert run(OUTPUT_HEAVY, output_tokens_mean=500.0).decode == 4
    # within tolerance: no correction
    assert run(OUTPUT_HEAVY, output_tokens_mean=500.0, itl_p90_s=0.054).decode_correction == 1.0


# --- fail-static ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [
    {},                                                              # nothing at all (empty results)
    dict(request_rate=math.nan, prompt_tokens_mean=1000.0, output_tokens_mean=50.0),
    dict(request_rate=20.0, prompt_tokens_mean=math.nan, output_tokens_mean=50.0),
    dict(request_rate=20.0, prompt_tokens_mean=1000.0, output_tokens_mean=math.nan),
])
def test_no_signal_holds(values):
    d = run(values, 3, 2)
    assert (d.prefill, d.decode, d.action, d.cause) == (3, 2, HOLD, NO_SIGNAL)
    assert "no signal" in d.reason


def test_unreachable_prometheus_holds_and_never_scales_to_zero():
    s = ScalingSignals(time=NOW, error="Prometheus unreachable (ConnectError)")
    cap = capacity_from_cost_model(COST, BASE, math.nan, math.nan)
    d = decide(s, PoolState(5, 4, prefill_correction=1.5), BASE, cap, NOW)
    assert (d.prefill, d.decode, d.action) == (5, 4, HOLD)
    assert d.prefill_correction == 1.5 and "Prometheus unreachable" in d.reason
    # pools found at zero are lifted to the minimums, never left or put there
    d = decide(s, PoolState(0, 0), BASE, cap, NOW)
    assert (d.prefill, d.decode, d.action, d.cause) == (1, 1, SCALE, NO_SIGNAL)
    # an idle model (a real 0/s with NaN means) is a signal: it shrinks to the minimums, not to zero
    d = run(dict(request_rate=0.0, prompt_tokens_mean=math.nan, output_tokens_mean=math.nan), 2, 2,
            config=cfg(scale_down_cooldown_s=0))
    assert (d.prefill, d.decode) == (1, 1)


def test_state_after_a_decision():
    d = run(PROMPT_HEAVY)
    s = PoolState(1, 1).after(d, NOW)
    assert (s.prefill, s.decode, s.prefill_changed_at, s.decode_changed_at) == (3, 1, NOW, -math.inf)
    partial = PoolState(1, 1).after(d, NOW, reached={"prefill": 1, "decode": 1})  # the actuator failed
    assert partial.prefill_changed_at == -math.inf


def test_config_is_validated():
    with pytest.raises(ConfigError) as e:
        SizingConfig(min_decode=0)
    assert e.value.field == "min_decode"
    with pytest.raises(ConfigError) as e:
        SizingConfig(gpu_budget=2, min_prefill=2, min_decode=1)
    assert e.value.field == "gpu_budget"
    with pytest.raises(ConfigError) as e:
        SizingConfig(ttft_slo_s="1")  # type: ignore[arg-type]
    assert e.value.field == "ttft_slo_s"
