"""The cluster simulator: a hand-computed scenario, conservation, determinism, no leaks."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from router.cost_model import CostModel
from router.routing_config import RoutingConfig
from simulator.cluster import Simulation
from simulator.config import EngineSpec, SimConfig
from simulator.decode_batch import segment_time, steps_within
from simulator.scaling import ReactiveScaler, ScalingConfig
from simulator.trace import TraceRequest, from_requests, read_mooncake

MOONCAKE = Path("/work/shared/traces/mooncake/conversation_trace.jsonl")
needs_mooncake = pytest.mark.skipif(not MOONCAKE.exists(), reason="shared Mooncake trace not present")

# 1 ms per prompt token, 10 ms per decode step, 1 GB/s links with 5 ms latency, 100 kB of KV per token
HAND_COST = CostModel(prefill_per_token_s=0.001, decode_base_s=0.01, link_bandwidth_gbps=1.0, link_latency_s=0.005)


def hand_config(**overrides) -> SimConfig:
    spec = EngineSpec(num_blocks=1000, block_size=16)
    options = dict(num_prefill=1, num_decode=1, prefill_engine=spec, decode_engine=spec, kv_bytes_per_token=100_000,
                   routing=RoutingConfig(policy="round_robin", reject=False), length_predictor="oracle")
    options.update(overrides)
    return SimConfig(**options)


def test_three_requests_hand_computed() -> None:
    """A, B, C through one prefill and one decode instance; every time below is worked out by hand.

    A (t=0, 100 tokens): prefill 0.100 s alone; KV 10 MB: 5 ms + 10 ms  -> first token 0.115.
    B (t=0.05, 200 tokens) and C (t=0.06, 50 tokens, its first 3 blocks = A's) wait for A's step,
    then share one step at 0.100: B's 200 tokens + C's 2 uncached tokens (48 cached on the prefill
    instance from A) = 0.202 s -> both done at 0.302. B's KV (20 MB) 0.025 s -> 0.327; C's (5 MB)
    queues behind B on the same link: 0.327 + 0.010 -> 0.337.
    Decode: A lands at 0.115 and needs 2 more steps -> 0.135; B 1 step -> 0.337; C has 1 token.
    """
    a_hashes = tuple(range(1, 7))
    trace = from_requests([
        TraceRequest("A", 0.0, 100, 3, a_hashes),
        TraceRequest("B", 0.05, 200, 2, tuple(range(100, 112))),
        TraceRequest("C", 0.06, 50, 1, a_hashes[:3]),
    ], block_size=16)
    result = Simulation(hand_config(), HAND_COST).run(trace)
    by_id = {r.request_id: r for r in result.records}
    assert by_id["A"].ttft_s == pytest.approx(0.115, abs=1e-12)
    assert by_id["B"].ttft_s == pytest.approx(0.327 - 0.05, abs=1e-12)
    assert by_id["C"].ttft_s == pytest.approx(0.337 - 0.06, abs=1e-12)
    assert by_id["C"].num_cached_tokens == 48
    assert [by_id[x].finish_s for x in "ABC"] == pytest.approx([0.135, 0.337, 0.337], abs=1e-12)
    assert by_id["A"].tpot_s == pytest.approx(0.01, abs=1e-12)
    assert result.summary()["completed"] == 3


def test_local_prefill_on_an_idle_decode_instance() -> None:
    """No prefill instance: the decode instance computes the prompt itself (0.1 s), then decodes."""
    trace = from_requests([TraceRequest("A", 1.0, 100, 4)], block_size=16)
    result = Simulation(hand_config(num_prefill=0), HAND_COST).run(trace)
    (r,) = result.records
    assert r.prefill_id is None and r.ttft_s == pytest.approx(0.1, abs=1e-12)
    assert r.finish_s == pytest.approx(1.1 + 3 * 0.01, abs=1e-12)


def assert_clean(sim: Simulation) -> None:
    """Every request completed or rejected exactly once; nothing left anywhere."""
    assert all(r.num_outcomes == 1 for r in sim.records)
    done = [r for r in sim.records if not r.rejected]
    assert all(r.first_token_s >= r.arrival_s and r.finish_s >= r.first_token_s for r in done)
    assert not sim.flights
    assert sim.state.num_tracked_requests() == 0
    for inst in sim.pools.instances.values():
        engine = inst.engine
        assert engine.idle() and not engine.busy and inst.num_pending == 0
        assert engine.ledger.num_anon == 0 and not engine.ledger.refs
        assert len(engine.ledger.lru) <= engine.spec.num_blocks


def run_small(trace, **overrides):
    from simulator.calibration import cluster_config, from_splitwise

    cal = from_splitwise()
    cal = dataclasses.replace(cal, cost=dataclasses.replace(cal.cost, kv_capacity_tokens=200_000))
    routing = overrides.pop("routing", RoutingConfig(ttft_slo_s=10.0))
    scaler = overrides.pop("scaler", None)
    config = cluster_config(cal, trace.block_size, num_prefill=overrides.pop("num_prefill", 2),
                            num_decode=overrides.pop("num_decode", 2), routing=routing, **overrides)
    sim = Simulation(config, cal.cost, scaler=scaler, scaling=ScalingConfig(startup_delay_s=20.0))
    return sim, sim.run(trace)


@needs_mooncake
@pytest.mark.parametrize("policy,rejection", [("transfer_aware", "policy"), ("transfer_aware", "early"),
                                              ("random", "policy"), ("global_cache_aware", "policy"),
                                              ("dynamo", "policy")])
def test_conservation_under_overload(policy: str, rejection: str) -> None:
    trace = read_mooncake(MOONCAKE, max_requests=400, rate_scale=6.0)
    sim, result = run_small(trace, routing=RoutingConfig(policy=policy, ttft_slo_s=10.0), rejection=rejection)
    assert_clean(sim)
    s = result.summary()
    assert s["completed"] + s["rejected"] == 400
    if policy == "random":
        assert s["preemptions"] > 0  # KV pressure on the small instances exercises recompute


@needs_mooncake
def test_conservation_with_autoscaling_and_draining() -> None:
    trace = read_mooncake(MOONCAKE, max_requests=600, rate_scale=3.0)
    scaler = ReactiveScaler(interval_s=10.0, ttft_slo_s=10.0, down_cooldown_s=20.0, max_prefill=6, max_decode=6)
    sim, result = run_small(trace, scaler=scaler, num_prefill=1, num_decode=1)
    assert_clean(sim)
    counts = {(row[1], row[2]) for row in result.timeline}
    assert len(counts) > 1  # it did scale
    assert result.gpu_hours > 0


@needs_mooncake
def test_deterministic_under_a_seed() -> None:
    trace = read_mooncake(MOONCAKE, max_requests=300, rate_scale=3.0)

    def run(policy: str, seed: int) -> list[tuple[float, float]]:
        _, result = run_small(trace, routing=RoutingConfig(policy=policy, ttft_slo_s=10.0), seed=seed)
        return [(r.first_token_s, r.finish_s, r.decode_id) for r in result.records]

    assert run("transfer_aware", 0) == run("transfer_aware", 0)
    assert run("random", 7) == run("random", 7)
    assert run("random", 7) != run("random", 8)


def test_simulator_does_not_import_torch() -> None:
    import subprocess

    code = "import sys, simulator, simulator.cli, simulator.batching; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("d0,inc", [(0.03, 0.0), (0.03, 1e-4), (0.05, 3e-3)])
def test_segment_time_inverse(d0: float, inc: float) -> None:
    for k in range(0, 60):
        t = segment_time(k, d0, inc)
        assert steps_within(t, d0, inc, 100) == k
        if k:
            assert steps_within(t - 1e-9, d0, inc, 100) == k - 1
    assert steps_within(1e9, d0, inc, 17) == 17


def test_requests_can_decode_through_preemption() -> None:
    """A tiny decode instance: long outputs outgrow the KV, get preempted and recomputed, and finish."""
    spec = EngineSpec(num_blocks=24, block_size=16, max_num_requests=8)
    trace = from_requests([TraceRequest(f"r{i}", 0.001 * i, 40, 120) for i in range(6)], block_size=16)
    sim = Simulation(hand_config(num_prefill=0, decode_engine=spec, prefill_engine=spec), HAND_COST)
    result = sim.run(trace)
    assert result.num_preemptions > 0
    assert_clean(sim)
    assert all(r.finish_s > 0 for r in result.records)


@needs_mooncake
def test_block_accounting_matches_a_recount(monkeypatch: pytest.MonkeyPatch) -> None:
    """After every plan and step the ledger's count of blocks in use equals a recount over the
    requests held, and a planned step never uses more than the pool (prefix sharing, preemption
    and local prefill included)."""
    from simulator.engine import SimEngine

    checked = [0]
    original_plan, original_complete = SimEngine.plan, SimEngine.complete

    def check(engine: SimEngine, planned: bool) -> None:
        counted, recounted = engine.audit()
        assert counted == recounted
        if planned:  # after a step, the batch's next tokens may need a block the next plan finds
            assert counted <= engine.spec.num_blocks
        checked[0] += 1

    def plan(self, now):
        end = original_plan(self, now)
        check(self, True)
        return end

    def complete(self, now):
        original_complete(self, now)
        check(self, False)

    monkeypatch.setattr(SimEngine, "plan", plan)
    monkeypatch.setattr(SimEngine, "complete", complete)
    trace = read_mooncake(MOONCAKE, max_requests=300, rate_scale=6.0)
    sim, _ = run_small(trace, routing=RoutingConfig(policy="random", reject=False, ttft_slo_s=10.0))
    assert_clean(sim)
    assert checked[0] > 1000


def test_autoscaler_policy_plugs_into_the_scaler_hook() -> None:
    pytest.importorskip("autoscaler.policy")
    from autoscaler.config import SizingConfig
    from simulator.autoscaler_policy import AutoscalerPolicyScaler

    requests = [TraceRequest(f"r{i}", 0.05 * i, 200, 20) for i in range(400)]
    trace = from_requests(requests, block_size=16)
    sizing = SizingConfig(ttft_slo_s=2.0, itl_slo_s=0.1, scale_up_cooldown_s=5.0, scale_down_cooldown_s=5.0)
    scaler = AutoscalerPolicyScaler(HAND_COST, sizing, interval_s=2.0)
    spec = EngineSpec(num_blocks=1000, block_size=16)
    config = hand_config(num_prefill=2, num_decode=2, prefill_engine=spec, decode_engine=spec)
    sim = Simulation(config, dataclasses.replace(HAND_COST, kv_capacity_tokens=16_000), scaler=scaler,
                     scaling=ScalingConfig(startup_delay_s=1.0))
    result = sim.run(trace)
    assert_clean(sim)
    assert scaler.decisions and result.summary()["completed"] == 400


@pytest.mark.parametrize("hardware", ["h100-80gb", "a100-80gb"])
def test_packaged_fits_equal_a_fresh_fit_of_the_table(hardware):
    from router.cost_model import CostModel, cost_model_from_splitwise
    from simulator.calibration import DEFAULT_SPLITWISE, packaged_fit

    packaged = CostModel.load(packaged_fit("llama2-70b", hardware, 4))
    assert packaged.prefill_per_token_s > 0 and packaged.decode_base_s > 0
    if not DEFAULT_SPLITWISE.exists():
        pytest.skip("the shared Splitwise table is not checked out beside the repository")
    assert packaged == cost_model_from_splitwise(DEFAULT_SPLITWISE, model="llama2-70b", hardware=hardware,
                                                 tensor_parallel=4)
