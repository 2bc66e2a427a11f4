"""transfer_aware: hand-computed decisions on small clusters (see router_helpers for the numbers)."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import build_config
from common.errors import ConfigError, OverloadedError, UnavailableError
from router.links import LinkState
from router.policy import POLICIES, get_policy, route, transfer_aware_reference
from router.routing_config import POLICY_NAMES, RoutingConfig
from router.snapshot import REJECT_KV, REJECT_TBT, REJECT_TTFT, REJECT_UNAVAILABLE, SLO, RoutingRequest
from tests.unit.router_helpers import COST, LINKS, config, decode, prefill, request, snapshot

NO_LOCAL = config(local_prefill_by_cost=False)


def decide(snap, req=None, cfg=NO_LOCAL):
    return route(req or request(), snap, COST, cfg)


# --- choosing the pair ------------------------------------------------------------------------------


def test_cache_hit_picks_the_prefill_instance_holding_the_prefix():
    # P0: 1000 tokens to compute = 1.0 s; P1 holds 800: 0.2 s. Transfer of 1000 tokens: 0.101 s.
    d = decide(snapshot([prefill("p0"), prefill("p1")], [decode("d0"), decode("d1")], {"p1": 800}))
    assert (d.prefill_id, d.decode_id, d.rejected) == ("p1", "d0", False)
    assert d.predicted_ttft_s == pytest.approx(0.2 + 0.101)
    assert d.predicted_transfer_s == pytest.approx(0.101)
    assert d.num_cached_tokens == 800
    assert d.predicted_tbt_s == pytest.approx(0.010 + 0.001)  # alone in the batch


def test_slow_link_moves_the_decode_instance():
    links = LINKS.with_link("p1", "d0", LinkState(1.0, 0.001))  # 1.001 s for the prompt's KV
    d = decide(snapshot([prefill("p0"), prefill("p1")], [decode("d0"), decode("d1")], {"p1": 800}, links))
    assert (d.prefill_id, d.decode_id) == ("p1", "d1")
    assert d.predicted_ttft_s == pytest.approx(0.301)


def test_slow_links_from_the_cache_hit_make_the_cold_instance_faster():
    links = LINKS.with_link("p1", "d0", LinkState(0.5, 0.001)).with_link("p1", "d1", LinkState(0.5, 0.001))
    d = decide(snapshot([prefill("p0"), prefill("p1")], [decode("d0"), decode("d1")], {"p1": 800}, links))
    assert (d.prefill_id, d.decode_id) == ("p0", "d0")
    assert d.predicted_ttft_s == pytest.approx(1.0 + 0.101)  # beats 0.2 + 2.001


@pytest.mark.parametrize("load", [dict(num_queued_prefill_tokens=2000, num_waiting=2),
                                  dict(num_inflight_tokens=2000, num_inflight_requests=2)])
def test_long_queue_outweighs_a_cache_hit(load):
    # 2000 queued tokens = 2.0 s of wait on P1: 2.301 s there against 1.101 s on the idle P0.
    d = decide(snapshot([prefill("p0"), prefill("p1", **load)], [decode("d0")], {"p1": 800}))
    assert d.prefill_id == "p0"
    assert d.predicted_ttft_s == pytest.approx(1.101)


def test_decode_instance_holding_the_prefix_receives_less_kv():
    # d1 holds 512 tokens: 488 MB to move (0.0498 s) instead of 1000 MB (0.101 s).
    d = decide(snapshot([prefill("p0")], [decode("d0"), decode("d1")], {"d1": 512}))
    assert (d.prefill_id, d.decode_id) == ("p0", "d1")
    assert d.predicted_transfer_s == pytest.approx(0.001 + 488e6 / 10e9)


# --- the decode side: KV headroom and TBT ---------------------------------------------------------


def test_decode_without_kv_headroom_is_avoided_even_on_a_faster_link():
    # The request lives for ceil((1000 + 200) / 16) = 75 blocks; d0 has 10 free of 100.
    links = LINKS.with_link("p0", "d1", LinkState(5.0, 0.001))
    d = decide(snapshot([prefill("p0")], [decode("d0", num_total_blocks=100, num_free_blocks=10),
                                          decode("d1", num_total_blocks=200, num_free_blocks=190)], links=links))
    assert d.decode_id == "d1"


def test_predicted_growth_of_running_requests_counts_against_headroom():
    # d0: 10 used + 120 predicted growth + 75 = 205 > 190 usable (5% reserve of 200); d1: 50 + 75 = 125.
    d = decide(snapshot([prefill("p0")], [
        decode("d0", num_total_blocks=200, num_free_blocks=190, num_running=1, num_predicted_growth_blocks=120),
        decode("d1", num_total_blocks=200, num_free_blocks=150, num_running=1)]))
    assert d.decode_id == "d1"


def test_decode_over_the_tbt_slo_is_avoided():
    # 100 running: a step with this request is 0.010 + 0.101 = 0.111 s > 0.1 s.
    d = decide(snapshot([prefill("p0")], [decode("d0", num_running=100), decode("d1", num_running=10)]))
    assert d.decode_id == "d1"
    assert d.predicted_tbt_s == pytest.approx(0.010 + 0.011)


def test_prompts_queued_on_a_decode_instance_slow_its_steps():
    # d0 is prefilling 2000 tokens of its own (2 s): until then each step carries a 2000-token chunk
    d = decide(snapshot([prefill("p0")], [decode("d0", num_queued_prefill_tokens=2000, num_waiting=1),
                                          decode("d1", num_running=20)]))
    assert d.decode_id == "d1"
    alone = decide(snapshot([prefill("p0")], [decode("d0", num_queued_prefill_tokens=2000, num_waiting=1)]))
    assert alone.rejected and alone.reject_reason == REJECT_TBT
    # a queue that drains before the request arrives (0.5 s < 1.101 s) does not matter
    drained = decide(snapshot([prefill("p0")], [decode("d0", num_queued_prefill_tokens=500, num_waiting=1)]))
    assert not drained.rejected and drained.predicted_tbt_s == pytest.approx(0.012)


def test_decode_pressure_breaks_ties_between_equal_ttfts():
    d = decide(snapshot([prefill("p0")], [decode("d0", num_running=50), decode("d1", num_running=5)]))
    assert d.decode_id == "d1"


# --- early rejection ----------------------------------------------------------------------------------


def test_rejects_when_the_ttft_slo_cannot_be_met_and_not_when_it_can():
    busy = [prefill("p0", num_queued_prefill_tokens=5000, num_waiting=5),
            prefill("p1", num_queued_prefill_tokens=5000, num_waiting=5)]
    snap = snapshot(busy, [decode("d0")])
    d = decide(snap, request(ttft_s=2.0))
    assert d.rejected and d.reject_reason == REJECT_TTFT
    assert d.predicted_ttft_s == pytest.approx(5.0 + 1.0 + 0.101)
    assert d.retry_after_s == pytest.approx(6.101 - 2.0)
    assert isinstance(d.error(), OverloadedError) and d.error().retry_after_s == d.retry_after_s
    ok = decide(snap, request(ttft_s=10.0))
    assert not ok.rejected and ok.prefill_id == "p0"
    assert decide(snap, request(ttft_s=2.0), config(local_prefill_by_cost=False, reject=False)).decode_id == "d0"


def test_prefilling_on_an_idle_decode_instance_saves_a_request_the_prefill_pool_cannot():
    busy = [prefill("p0", num_queued_prefill_tokens=5000, num_waiting=5)]
    d = decide(snapshot(busy, [decode("d0")]), request(ttft_s=2.0), config())
    assert not d.rejected and d.local_prefill
    assert d.predicted_ttft_s == pytest.approx(1.0)
    assert "local(cost)" in d.explain


def test_rejects_when_no_decode_instance_has_kv_headroom():
    full = [decode(f"d{i}", num_total_blocks=100, num_free_blocks=5, num_running=10,
                   num_predicted_remaining_tokens=1000) for i in range(2)]
    d = decide(snapshot([prefill("p0")], full))
    assert d.rejected and d.reject_reason == REJECT_KV
    assert 1.0 <= d.retry_after_s <= 60.0


def test_rejects_when_every_decode_instance_would_miss_the_tbt_slo():
    d = decide(snapshot([prefill("p0")], [decode("d0", num_running=100), decode("d1", num_running=120)]))
    assert d.rejected and d.reject_reason == REJECT_TBT


def test_tbt_is_judged_at_the_moment_the_prefill_finishes():
    # 100 running requests on d0 (0.11 s steps); the request reaches d0 after ~1.1 s.
    def with_remaining(tokens: int):
        return decide(snapshot([prefill("p0")], [decode("d0", num_running=100,
                                                        num_predicted_remaining_tokens=tokens)]))
    soon_done = with_remaining(100)  # 1 token left each on average: all gone by then
    assert not soon_done.rejected and soon_done.predicted_tbt_s == pytest.approx(0.011)
    long_lived = with_remaining(100_000)  # 1000 tokens each: still there
    assert long_lived.rejected and long_lived.reject_reason == REJECT_TBT


def test_no_decode_instance_is_unavailable_not_overloaded():
    d = decide(snapshot([prefill("p0")], [decode("d0", draining=True)]))
    assert d.rejected and d.reject_reason == REJECT_UNAVAILABLE
    assert isinstance(d.error(), UnavailableError)


def test_draining_instances_are_never_chosen():
    d = decide(snapshot([prefill("p0", draining=True), prefill("p1")], [decode("d0", draining=True), decode("d1")],
                        {"p0": 900}))
    assert (d.prefill_id, d.decode_id) == ("p1", "d1")


# --- conditional disaggregation ---------------------------------------------------------------------


def test_short_prompt_is_prefilled_on_the_decode_instance():
    d = decide(snapshot([prefill("p0")], [decode("d0")]), request(20))
    assert d.local_prefill and d.decode_id == "d0" and "local(short)" in d.explain
    assert d.predicted_transfer_s == 0.0
    assert d.predicted_ttft_s == pytest.approx(0.020)


def test_prompt_mostly_cached_on_a_decode_instance_is_prefilled_there():
    d = decide(snapshot([prefill("p0")], [decode("d0"), decode("d1")], {"d1": 960}))
    assert d.local_prefill and d.decode_id == "d1" and "local(cached)" in d.explain
    assert d.predicted_ttft_s == pytest.approx(0.040)
    assert d.num_cached_tokens == 960


def test_local_prefill_by_cost_needs_the_decode_batch_to_tolerate_the_stall():
    busy_prefill = [prefill("p0", num_queued_prefill_tokens=3000, num_waiting=3)]
    idle = decide(snapshot(busy_prefill, [decode("d0")]), cfg=config())
    assert idle.local_prefill and idle.predicted_ttft_s == pytest.approx(1.0)
    # 20 running: a step carrying the 1000-token chunk takes 0.03 + 1.0 s, far over the 0.1 s TBT SLO.
    busy = decide(snapshot(busy_prefill, [decode("d0", num_running=20)]), cfg=config())
    assert not busy.local_prefill and busy.prefill_id == "p0"
    assert busy.predicted_ttft_s == pytest.approx(3.0 + 1.0 + 0.101)


def test_a_stall_on_the_decode_batch_does_not_outweigh_a_larger_ttft_saving():
    # A 100-token prompt behind a 5 s prefill queue: remote TTFT 5.0 + 0.1 + 0.011 s. On d0 (20 running,
    # 0.03 s steps) one step carrying the prompt takes 0.13 s, over the 0.1 s TBT SLO, so the old rule
    # (no step over the TBT SLO) queued it for 5 s. It delays each request decoding on d0 by 0.1 s, one
    # TBT SLO, and saves this one 4.98 s, 2.5 TTFT SLOs: prefilled on d0.
    busy_prefill = [prefill("p0", num_queued_prefill_tokens=5000, num_waiting=5)]
    d = decide(snapshot(busy_prefill, [decode("d0", num_running=20)]), request(100, ttft_s=2.0), config())
    assert d.local_prefill and d.decode_id == "d0" and "local(cost)" in d.explain
    assert d.predicted_ttft_s == pytest.approx(0.03 + 0.1)
    # with the prefill pool idle the saving (none) is smaller than the delay: prefilled remotely
    idle_prefill = decide(snapshot([prefill("p0")], [decode("d0", num_running=20)]), request(100, ttft_s=2.0),
                          config())
    assert idle_prefill.prefill_id == "p0"
    # a 1000-token prompt delays d0's requests by 1 s, 10 TBT SLOs, for 5.07 s (2.5 TTFT SLOs): remote
    long = decide(snapshot(busy_prefill, [decode("d0", num_running=20)]), request(1000, ttft_s=2.0),
                  config(reject=False))
    assert long.prefill_id == "p0"


def test_without_prefill_instances_everything_is_prefilled_locally():
    d = decide(snapshot([], [decode("d0", num_running=30), decode("d1", num_running=3)]), cfg=config())
    assert d.local_prefill and d.decode_id == "d1"


# --- the fast path agrees with the reference ------------------------------------------------------------


def _random_cluster(rng: np.random.Generator):
    num_p, num_d = int(rng.integers(0, 5)), int(rng.integers(1, 5))
    prefills = [prefill(f"p{i}", num_queued_prefill_tokens=int(rng.integers(0, 4000)),
                        num_waiting=int(rng.integers(0, 4)), num_inflight_tokens=int(rng.integers(0, 1000)),
                        num_inflight_requests=int(rng.integers(0, 2)), draining=bool(rng.random() < 0.1))
                for i in range(num_p)]
    decodes = []
    for i in range(num_d):
        total = int(rng.integers(100, 2000))
        decodes.append(decode(f"d{i}", num_total_blocks=total, num_free_blocks=int(rng.integers(0, total)),
                              num_running=int(rng.integers(0, 120)), num_waiting=int(rng.integers(0, 3)),
                              num_queued_prefill_tokens=int(rng.integers(0, 500)),
                              num_inflight_tokens=int(rng.integers(0, 2000)),
                              num_inflight_requests=int(rng.integers(0, 3)),
                              num_predicted_remaining_tokens=int(rng.integers(0, 50_000)),
                              num_predicted_growth_blocks=int(rng.integers(0, 200)),
                              step_time_s=float(rng.choice([0.0, rng.uniform(0.01, 0.2)]))))
    links = LINKS
    for p in prefills:
        for d in decodes:
            if rng.random() < 0.5:
                links = links.with_link(p.instance_id, d.instance_id,
                                        LinkState(float(rng.uniform(0.5, 50)), float(rng.uniform(0, 0.01))))
    ids = [x.instance_id for x in prefills + decodes]
    cached = {i: int(rng.integers(0, 130)) * 16 for i in ids if rng.random() < 0.5}
    return snapshot(prefills, decodes, cached, links)


def test_vectorised_transfer_aware_agrees_with_the_scalar_reference():
    rng = np.random.default_rng(0)
    kinds = set()
    for case in range(400):
        snap = _random_cluster(rng)
        req = RoutingRequest(f"r{case}", int(rng.integers(1, 2100)), predicted_output_tokens=int(rng.integers(0, 800)),
                             slo=SLO(float(rng.uniform(0.3, 6)), float(rng.uniform(0.03, 0.3))))
        cfg = RoutingConfig(
            decode_weight=float(rng.uniform(0, 1)), local_prefill_by_cost=bool(rng.random() < 0.7),
            reject=bool(rng.random() < 0.8))
        fast = route(req, snap, COST, cfg)
        slow = transfer_aware_reference(req, snap, COST, cfg)
        key = lambda d: (d.rejected, d.reject_reason, d.prefill_id, d.decode_id)  # noqa: E731
        assert key(fast) == key(slow), (case, fast.explain, slow.explain)
        assert fast.predicted_ttft_s == pytest.approx(slow.predicted_ttft_s)
        kinds.add((fast.rejected, fast.reject_reason, fast.local_prefill))
    assert len(kinds) >= 4  # the cases exercised rejections of several kinds and both prefill modes


# --- configuration ------------------------------------------------------------------------------------


def test_every_policy_is_registered_by_name():
    assert tuple(POLICIES) == POLICY_NAMES
    with pytest.raises(ConfigError) as err:
        get_policy("nope")
    assert err.value.field == "policy"


@pytest.mark.parametrize("field,value", [("policy", "fastest"), ("ttft_slo_s", 0), ("tbt_slo_s", -1.0),
                                         ("kv_reserve_fraction", 1.0), ("chunk_tokens", 0),
                                         ("local_prefill_min_cached_ratio", 0.0), ("min_retry_after_s", 100.0),
                                         ("kvcache_balancing_threshold", 0.5), ("dynamo_temperature", -1.0)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        RoutingConfig(**{field: value})
    assert err.value.field == field


def test_config_maps_onto_environment_variables():
    cfg = build_config(RoutingConfig, environ={"PDSERVE_ROUTING_POLICY": "dynamo",
                                               "PDSERVE_ROUTING_TTFT_SLO_S": "1.5",
                                               "PDSERVE_ROUTING_REJECT": "false"})
    assert (cfg.policy, cfg.ttft_slo_s, cfg.reject) == ("dynamo", 1.5, False)


def test_request_slo_defaults_to_the_config():
    cfg = RoutingConfig(ttft_slo_s=0.5, tbt_slo_s=0.05)
    assert cfg.slo_for(RoutingRequest("r", 10)) == SLO(0.5, 0.05)
    assert cfg.slo_for(request(ttft_s=3.0)) == SLO(3.0, 0.1)


def test_the_routing_core_does_not_import_torch():
    import subprocess
    import sys

    modules = ("snapshot", "links", "nnls", "cost_model", "length_predictor", "prefix_index", "routing_config",
               "estimates", "policy", "policy_baselines", "policy_transfer_aware", "cluster_state")
    code = ("import sys\n" + "".join(f"import router.{m}\n" for m in modules)
            + "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules), 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
