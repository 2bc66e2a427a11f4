"""Batch policies (common.batch_policy) through the real engine scheduler, and on their own."""

from __future__ import annotations

import pytest

from common.batch_policy import (
    POLICIES,
    BatchSnapshot,
    DynamicBatchPolicy,
    RunningRequest,
    ShortestFirstPolicy,
    StaticBatchPolicy,
    WaitingRequest,
    make_batch_policy,
)
from common.config import EngineConfig
from common.errors import ConfigError
from engine.kv_cache_manager import KVCacheManager
from engine.request import RequestStatus
from engine.scheduler import Scheduler
from tests.unit.test_scheduler import BS, add, assert_clean, make_request, step


def scheduler(policy, *, num_blocks: int = 64, max_num_requests: int = 8, budget: int = 64) -> Scheduler:
    config = EngineConfig(block_size=BS, num_blocks=num_blocks, max_num_batched_tokens=budget,
                          max_num_requests=max_num_requests, batch_policy=policy.name)
    return Scheduler(config, KVCacheManager(num_blocks, BS), policy)


def run(sched: Scheduler, max_steps: int = 500) -> list[int]:
    """Steps until done; the running-batch size after each step."""
    sizes = []
    while sched.has_work():
        step(sched)
        sizes.append(len(sched.running))
        assert len(sizes) < max_steps, "no progress"
    return sizes


def test_registered_by_name() -> None:
    assert set(POLICIES) >= {"static", "dynamic", "shortest_first"}
    assert isinstance(make_batch_policy("dynamic"), DynamicBatchPolicy)
    assert isinstance(make_batch_policy("shortest_first"), ShortestFirstPolicy)
    with pytest.raises(ConfigError):
        make_batch_policy("nope")


def test_shortest_first_admits_in_ascending_predicted_length() -> None:
    """In the engine the prediction falls back to max_tokens: the shortest jobs go first."""
    sched = scheduler(ShortestFirstPolicy(), max_num_requests=2)
    long, short, mid = (make_request("long", 4, max_tokens=30), make_request("short", 4, first=40, max_tokens=3),
                        make_request("mid", 4, first=80, max_tokens=10))
    add(sched, long, short, mid)
    step(sched)
    assert {r.request_id for r in sched.running} == {"short", "mid"}
    assert long.status == RequestStatus.WAITING
    run(sched)
    assert [r.num_output_tokens for r in (long, short, mid)] == [30, 3, 10]
    assert_clean(sched)


def test_shortest_first_orders_by_the_routers_prediction_when_there_is_one() -> None:
    """Same caps, different predictions (GenerateRequest.predicted_output_tokens): the prediction decides."""
    sched = scheduler(ShortestFirstPolicy(), max_num_requests=1)
    a, b = make_request("a", 4, max_tokens=20), make_request("b", 4, first=40, max_tokens=20)
    a.predicted_output_tokens, b.predicted_output_tokens = 15, 2
    add(sched, a, b)
    snapshot = sched._snapshot()
    assert [w.predicted_output_tokens for w in snapshot.waiting] == [15, 2]
    step(sched)
    assert [r.request_id for r in sched.running] == ["b"]
    snapshot = sched._snapshot()  # the running request's expected growth follows its prediction
    assert [(r.request_id, r.predicted_remaining_tokens) for r in snapshot.running] == [("b", 1)]
    run(sched)
    assert [r.num_output_tokens for r in (a, b)] == [20, 20]
    assert_clean(sched)


def growth_workload() -> list:
    # six requests of 8 prompt tokens that each grow to 20 tokens (5 blocks): 30 blocks at peak
    return [make_request(f"r{i}", 8, first=10 * i + 1, max_tokens=12) for i in range(6)]


@pytest.mark.parametrize("policy", [ShortestFirstPolicy(), DynamicBatchPolicy(tbt_target_s=1.0)])
def test_memory_aware_policies_avoid_the_preemptions_fcfs_causes(policy) -> None:
    """24 blocks: FCFS admits all six (2 blocks each) and preempts as they grow; the memory-aware
    policies admit only what their predicted peak fits, and never preempt."""
    static = scheduler(StaticBatchPolicy(), num_blocks=24)
    add(static, *growth_workload())
    run(static)
    assert static.stats.num_preemptions > 0
    assert_clean(static)

    sched = scheduler(policy, num_blocks=24)
    requests = growth_workload()
    add(sched, *requests)
    sizes = run(sched)
    assert sched.stats.num_preemptions == 0
    assert 1 <= max(sizes) <= 5
    assert all(r.num_output_tokens == 12 for r in requests)
    assert_clean(sched)


def snapshot(*, running: int = 0, free: int = 1000, total: int = 1000, steps=(), waiting=(), running_requests=(),
             max_num_requests: int = 64) -> BatchSnapshot:
    return BatchSnapshot(num_running=running, num_free_blocks=free, num_total_blocks=total, block_size=16,
                         max_num_requests=max_num_requests, recent_step_times_s=tuple(steps), waiting=tuple(waiting),
                         running=tuple(running_requests))


def waiting(n: int, *, prompt: int = 64, predicted: int = 64) -> list[WaitingRequest]:
    return [WaitingRequest(f"w{i}", prompt, 512, float(i), predicted) for i in range(n)]


def test_dynamic_sla_feedback_is_aimd() -> None:
    policy = DynamicBatchPolicy(tbt_target_s=0.05, decrease=0.5, window=3)
    many = waiting(100, prompt=16, predicted=16)
    assert policy.decide(snapshot(running=40, steps=(0.08, 0.08), waiting=many)).max_running == 20  # halved
    assert policy.decide(snapshot(running=40, steps=(0.08, 0.08), waiting=many)).max_running == 20  # no new data
    assert policy.decide(snapshot(running=20, steps=(0.08, 0.09, 0.07), waiting=many)).max_running == 10
    assert policy.decide(snapshot(running=10, steps=(0.02, 0.02), waiting=many)).max_running == 11  # +1
    assert policy.decide(snapshot(running=11, steps=(0.02, 0.03), waiting=many)).max_running == 12
    assert policy.decide(snapshot(running=5, steps=(0.02, 0.025), waiting=many)).max_running == 12  # not binding
    # a slow step now and then (a prompt chunk) is not a trend: the median decides
    assert policy.decide(snapshot(running=12, steps=(0.02, 0.02, 0.3), waiting=many)).max_running == 13


def test_dynamic_memory_bound_counts_predicted_growth() -> None:
    policy = DynamicBatchPolicy(memory_margin=0.0)
    # 20 free blocks; each waiting request needs blocks(64 + 64) = 8; running ones will grow by 4 blocks
    grow = [RunningRequest("a", 64, 64)]
    assert policy.decide(snapshot(running=1, free=20, total=40, waiting=waiting(5), running_requests=grow)
                         ).max_running == 1 + 2
    assert policy.decide(snapshot(running=0, free=3, total=40, waiting=waiting(5))).max_running == 1  # runs alone


def test_shortest_first_checks_the_future_peak() -> None:
    """A request that fits now but would overflow when the running request has grown is held back."""
    policy = ShortestFirstPolicy()
    running = [RunningRequest("a", 100, 400)]  # will hold 500 tokens
    blocked = [WaitingRequest("w", 100, 1000, 0.0, 400)]  # would hold 500 too; the pool holds 40 * 16 = 640
    decision = policy.decide(snapshot(running=1, free=33, total=40, waiting=blocked, running_requests=running))
    assert decision.max_running == 1
    short = [WaitingRequest("s", 100, 1000, 0.0, 20)]  # done long before a peaks
    decision = policy.decide(snapshot(running=1, free=33, total=40, waiting=short, running_requests=running))
    assert decision.max_running == 2 and decision.admission_order == ("s",)
