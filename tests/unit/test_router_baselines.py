"""Each baseline policy's defining behaviour, on the small clusters of router_helpers."""

from __future__ import annotations

from collections import Counter

import pytest

from router.links import LinkState
from router.policy import route
from router.snapshot import REJECT_UNAVAILABLE, RoutingRequest
from tests.unit.router_helpers import COST, LINKS, config, decode, prefill, request, snapshot


def run(policy: str, snap, req=None, **cfg):
    return route(req or request(), snap, COST, config(policy=policy, **cfg))


TWO_BY_TWO = snapshot([prefill("p0"), prefill("p1")], [decode("d0"), decode("d1")])


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded", "dynamo", "random", "load_balanced",
                                    "local_cache_aware", "global_cache_aware"])
def test_baselines_never_reject_but_need_a_decode_instance(policy):
    overloaded = snapshot([prefill("p0", num_queued_prefill_tokens=10**6, num_waiting=100)],
                          [decode("d0", num_running=500, num_total_blocks=10, num_free_blocks=0)])
    d = run(policy, overloaded, request(ttft_s=0.1))
    assert not d.rejected and (d.prefill_id, d.decode_id) == ("p0", "d0")
    assert d.predicted_ttft_s > 0.1 and d.policy == policy
    gone = run(policy, snapshot([prefill("p0")], [decode("d0", draining=True)]))
    assert gone.rejected and gone.reject_reason == REJECT_UNAVAILABLE
    local = run(policy, snapshot([], [decode("d0")]))
    assert local.local_prefill and local.decode_id == "d0"


def test_round_robin_follows_the_cursor():
    picks = [(d.prefill_id, d.decode_id) for d in
             (run("round_robin", snapshot(TWO_BY_TWO.prefill, TWO_BY_TWO.decode, rr_cursor=k)) for k in range(4))]
    assert picks == [("p0", "d0"), ("p1", "d1"), ("p0", "d0"), ("p1", "d1")]


def test_least_loaded_counts_outstanding_work_and_ignores_caches():
    snap = snapshot([prefill("p0", num_queued_prefill_tokens=100), prefill("p1", num_inflight_tokens=50)],
                    [decode("d0", num_running=3), decode("d1", num_running=1, num_inflight_requests=1)],
                    {"p0": 900})
    d = run("least_loaded", snap)
    assert (d.prefill_id, d.decode_id) == ("p1", "d1")


def test_dynamo_trades_prefix_overlap_against_active_blocks():
    # p0 holds 800 of 1000 tokens (50 blocks saved of 63) but has 40 blocks active; p1 is empty.
    snap = snapshot([prefill("p0", num_total_blocks=1000, num_free_blocks=960), prefill("p1")],
                    [decode("d0"), decode("d1")], {"p0": 800})
    assert run("dynamo", snap).prefill_id == "p0"  # 12.5 + 40 < 62.5
    assert run("dynamo", snap, dynamo_overlap_weight=0.0).prefill_id == "p1"  # pure load: 40 > 0
    loaded = snapshot([prefill("p0", num_total_blocks=1000, num_free_blocks=900), prefill("p1")],
                      [decode("d0"), decode("d1")], {"p0": 800})
    assert run("dynamo", loaded).prefill_id == "p1"  # 12.5 + 100 > 62.5


def test_dynamo_temperature_samples_reproducibly():
    snap = snapshot([prefill(f"p{i}", num_queued_prefill_tokens=16 * i) for i in range(4)], [decode("d0")])
    cold = {run("dynamo", snap, request(request_id=f"r{i}")).prefill_id for i in range(50)}
    assert cold == {"p0"}
    hot = [run("dynamo", snap, request(request_id=f"r{i}"), dynamo_temperature=5.0).prefill_id for i in range(200)]
    assert len(set(hot)) == 4
    again = [run("dynamo", snap, request(request_id=f"r{i}"), dynamo_temperature=5.0).prefill_id for i in range(200)]
    assert hot == again


def test_random_is_seeded_by_the_snapshot_and_the_request():
    picks = Counter()
    for i in range(400):
        d = run("random", TWO_BY_TWO, request(request_id=f"r{i}"))
        picks[(d.prefill_id, d.decode_id)] += 1
        assert run("random", TWO_BY_TWO, request(request_id=f"r{i}")).decode_id == d.decode_id
    assert len(picks) == 4 and min(picks.values()) > 50
    reseeded = snapshot(TWO_BY_TWO.prefill, TWO_BY_TWO.decode, seed=7)
    assert [run("random", reseeded, request(request_id=f"r{i}")).prefill_id for i in range(40)] != \
        [run("random", TWO_BY_TWO, request(request_id=f"r{i}")).prefill_id for i in range(40)]


def test_load_balanced_takes_the_shortest_queue_whatever_is_cached():
    snap = snapshot([prefill("p0", num_queued_prefill_tokens=300, num_waiting=1), prefill("p1")],
                    [decode("d0", num_running=40), decode("d1", num_running=4)], {"p0": 900})
    d = run("load_balanced", snap)
    assert (d.prefill_id, d.decode_id) == ("p1", "d1")


def test_local_cache_aware_weighs_its_own_cache_against_its_queue():
    # p0: 0.3 s queue + 0.1 s prefill (900 cached) = 0.4 s; p1: 1.0 s.
    snap = snapshot([prefill("p0", num_queued_prefill_tokens=300, num_waiting=1), prefill("p1")], [decode("d0")],
                    {"p0": 900})
    assert run("local_cache_aware", snap).prefill_id == "p0"
    # with 1.5 s of queue on p0, recomputing on p1 is faster
    busy = snapshot([prefill("p0", num_queued_prefill_tokens=1500, num_waiting=1), prefill("p1")], [decode("d0")],
                    {"p0": 900})
    assert run("local_cache_aware", busy).prefill_id == "p1"


def test_global_cache_aware_fetches_a_remote_prefix_over_the_link():
    # p1 holds 800 tokens but has 1.5 s of queue; p0 is idle and empty. Local-only: p0 recomputes (1.0 s).
    # Global: p0 fetches 800 tokens (800 MB at 10 GB/s + 1 ms) and computes 200: 0.081 + 0.2 s.
    snap = snapshot([prefill("p0"), prefill("p1", num_queued_prefill_tokens=1500, num_waiting=1)], [decode("d0")],
                    {"p1": 800})
    local = run("local_cache_aware", snap)
    assert (local.prefill_id, local.prefix_source_id, local.num_cached_tokens) == ("p0", None, 0)
    d = run("global_cache_aware", snap)
    assert (d.prefill_id, d.prefix_source_id, d.num_cached_tokens) == ("p0", "p1", 800)
    assert d.predicted_ttft_s == pytest.approx(0.081 + 0.2 + 0.101)
    # over a slow link the fetch does not pay: recompute instead
    slow = snapshot(snap.prefill, snap.decode, {"p1": 800}, LINKS.with_link("p1", "p0", LinkState(0.5, 0.001)))
    assert run("global_cache_aware", slow).prefix_source_id is None
    # a prefix barely longer than the local one is below the balancing threshold
    near = snapshot(snap.prefill, snap.decode, {"p1": 800, "p0": 704})
    assert run("global_cache_aware", near).prefix_source_id is None


def test_baselines_fill_predictions_like_transfer_aware():
    snap = snapshot([prefill("p0")], [decode("d0")], {"p0": 800})
    for policy in ("round_robin", "least_loaded", "transfer_aware"):
        d = run(policy, snap, RoutingRequest("r", 1000, predicted_output_tokens=10))
        assert d.predicted_ttft_s == pytest.approx(0.301)
        assert d.predicted_transfer_s == pytest.approx(0.101)
