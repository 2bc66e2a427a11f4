"""ClusterState: load reports + the router's ledger + the prefix index -> the snapshots policies read."""

from __future__ import annotations

import pytest

from common.rpc import worker_pb2 as pb
from router.cluster_state import ClusterState, LoadReport
from router.cost_model import CostModel
from router.policy import route
from router.prefix_index import KVEventBatch
from router.snapshot import RoutingDecision, RoutingRequest
from tests.unit.router_helpers import COST, KV_BYTES, config

BS = 16


def state() -> ClusterState:
    s = ClusterState(cost=COST, block_size=BS, kv_bytes_per_token=KV_BYTES, ack_delay_s=0.25)
    for name, role in (("p0", "prefill"), ("d0", "decode")):
        s.apply_load_report(LoadReport(name, role, num_total_blocks=1000, num_free_blocks=1000, block_size=BS), 0.0)
    return s


def by_id(snapshot):
    return {i.instance_id: i for i in snapshot.prefill + snapshot.decode}


def test_inflight_counts_until_a_later_report_or_the_first_token():
    s = state()
    req = RoutingRequest("r1", 1000, block_hashes=(11, 12, 13), predicted_output_tokens=100)
    s.on_routed(req, RoutingDecision("r1", "test", decode_id="d0", prefill_id="p0", num_cached_tokens=200), 1.0)
    snap = by_id(s.snapshot_for(req, 1.0))
    assert (snap["p0"].num_inflight_requests, snap["p0"].num_inflight_tokens) == (1, 800)
    assert (snap["d0"].num_inflight_requests, snap["d0"].num_inflight_tokens) == (1, 1000)
    assert snap["d0"].num_predicted_remaining_tokens == 100
    assert snap["d0"].num_predicted_growth_blocks == 69 - 63  # ceil(1100/16) - ceil(1000/16)
    # a report received too soon after the decision may predate the request: still in flight
    s.apply_load_report(LoadReport("d0", "decode", num_running=1, num_total_blocks=1000, num_free_blocks=937), 1.1)
    assert by_id(s.snapshot_for(req, 1.1))["d0"].num_inflight_requests == 1
    s.apply_load_report(LoadReport("d0", "decode", num_running=1, num_total_blocks=1000, num_free_blocks=937), 1.3)
    d0 = by_id(s.snapshot_for(req, 1.3))["d0"]
    assert (d0.num_inflight_requests, d0.num_running, d0.num_used_blocks) == (0, 1, 63)
    s.on_prefill_done("r1", 1.4, num_decode_cached_tokens=0, kv_transfer_s=0.001 + 1.0)  # 1 GB in 1 s
    assert by_id(s.snapshot_for(req, 1.4))["p0"].num_inflight_requests == 0
    assert s.links.get("p0", "d0").bandwidth_gbps < 10.0  # the link learned it is slower than assumed
    s.on_tokens("r1", 60)
    d0 = by_id(s.snapshot_for(req, 1.5))["d0"]
    assert d0.num_predicted_remaining_tokens == 40
    assert d0.num_predicted_growth_blocks == 69 - 67
    s.on_tokens("r1", 100)  # longer than predicted: nothing left, never negative
    assert by_id(s.snapshot_for(req, 1.6))["d0"].num_predicted_remaining_tokens == 0
    s.on_finished("r1")
    d0 = by_id(s.snapshot_for(req, 1.7))["d0"]
    assert (d0.num_predicted_remaining_tokens, d0.num_predicted_growth_blocks, s.num_tracked_requests()) == (0, 0, 0)


def test_routing_decisions_feed_the_prefix_approximation_and_the_cursor():
    s = state()
    req = RoutingRequest("r1", 100, block_hashes=(11, 12, 13), predicted_output_tokens=10)
    first = s.snapshot_for(req, 0.0)
    assert first.cached_tokens == {} and first.rr_cursor == 0
    decision = route(req, first, COST, config(local_prefill_by_cost=False))
    s.on_routed(req, decision, 0.0)
    second = s.snapshot_for(RoutingRequest("r2", 100, block_hashes=(11, 12, 99)), 0.5)
    assert second.cached_tokens == {"p0": 2 * BS, "d0": 2 * BS} and second.rr_cursor == 1
    # live events replace the guesses for that instance
    s.apply_kv_events(KVEventBatch("p0", BS, reset=True, stored_hashes=(11,), stored_parent_hashes=(0,)), 1.0)
    assert s.snapshot_for(req, 1.0).cached_tokens == {"p0": BS, "d0": 3 * BS}


def test_reports_from_protobuf_and_silent_instances_drop_out():
    s = state()
    msg = pb.LoadReport(instance_id="p1", role="prefill", num_waiting=2, num_queued_prefill_tokens=4096,
                        num_free_blocks=10, num_total_blocks=100, block_size=BS, recent_step_times_s=[0.1, 0.3])
    s.apply_load_report(LoadReport.from_proto(msg), 5.0)
    req = RoutingRequest("r", 10)
    p1 = by_id(s.snapshot_for(req, 5.0))["p1"]
    assert (p1.num_queued_prefill_tokens, p1.num_used_blocks, p1.step_time_s) == (4096, 90, pytest.approx(0.2))
    assert set(by_id(s.snapshot_for(req, 12.0))) == {"p1"}  # p0 and d0 last reported at 0 s
    s.unregister("p1")
    assert by_id(s.snapshot_for(req, 12.0)) == {}


def test_kv_event_batches_from_protobuf():
    msg = pb.KVEventBatch(instance_id="p0", block_size=BS, reset=True, stored_hashes=[5, 6],
                          stored_parent_hashes=[0, 5], removed_hashes=[])
    batch = KVEventBatch.from_proto(msg)
    assert batch == KVEventBatch("p0", BS, True, (5, 6), (0, 5), ())


def test_instances_join_snapshots_with_their_first_report():
    s = state()
    s.register("d1", "decode", "10.0.0.7:50051")
    req = RoutingRequest("r", 10)
    assert "d1" not in by_id(s.snapshot_for(req, 1.0))  # registered, never reported: not routable yet
    s.apply_load_report(LoadReport("d1", "decode", num_total_blocks=100, num_free_blocks=100, block_size=0), 1.0)
    d1 = by_id(s.snapshot_for(req, 1.0))["d1"]
    assert (d1.address, d1.block_size) == ("10.0.0.7:50051", BS)  # a report without a block size: the cluster's
    s.apply_load_report(LoadReport("x", "colocated"), 1.0)  # not a role the router routes to
    assert "x" not in by_id(s.snapshot_for(req, 1.0))


def test_the_link_learns_only_what_the_transfer_added_to_the_prefill():
    """kv_transfer_s includes the prefill worker's queue and compute; charging them to the link would
    teach it a bandwidth far below the real one."""
    s = state()
    req = RoutingRequest("r1", 1000, block_hashes=(), predicted_output_tokens=10)
    s.on_routed(req, RoutingDecision("r1", "test", decode_id="d0", prefill_id="p0", num_cached_tokens=0), 1.0)
    before = s.links.get("p0", "d0")
    expected_s = before.transfer_time(1000 * s.kv_bytes_per_token)
    # 3 s queued, 2 s computing, then exactly the time the link should take: nothing to learn
    s.on_prefill_done("r1", 7.0, num_decode_cached_tokens=0, kv_transfer_s=3.0 + 2.0 + expected_s,
                      prefill_queue_s=3.0, prefill_compute_s=2.0)
    assert s.links.get("p0", "d0").bandwidth_gbps == pytest.approx(before.bandwidth_gbps, rel=1e-6)
    # the same transfer reported without the breakdown reads as a link 2500x too slow
    s.on_routed(RoutingRequest("r2", 1000, block_hashes=(), predicted_output_tokens=10),
                RoutingDecision("r2", "test", decode_id="d0", prefill_id="p0", num_cached_tokens=0), 8.0)
    s.on_prefill_done("r2", 14.0, num_decode_cached_tokens=0, kv_transfer_s=3.0 + 2.0 + expected_s)
    assert s.links.get("p0", "d0").bandwidth_gbps < before.bandwidth_gbps / 2


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("compute_s", [0.0, 0.05, 1.0])
@pytest.mark.parametrize("link_s", [0.01, 0.2, 3.0])
def test_link_time_from_visible_inverts_the_cost_models_overlap(overlap, compute_s, link_s):
    from router.links import link_time_from_visible

    cost = CostModel(transfer_overlap=overlap)
    visible = cost.visible_transfer_time(compute_s, link_s)
    if visible <= 0:
        return  # hidden entirely behind compute: nothing to learn, observe_transfer skips it
    assert link_time_from_visible(visible, compute_s, overlap) == pytest.approx(link_s, rel=1e-9)
