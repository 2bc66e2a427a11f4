"""PrefixIndex: KV events, the approximate fallback, the memory bound, and lookup speed."""

from __future__ import annotations

import random
import time

import pytest

from common.block_hash import hash_blocks
from router.prefix_index import InMemoryPrefixStore, KVEventBatch, PrefixIndex

BS = 16


def chain(seed: int, n: int, parent: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Hashes of ``n`` blocks continuing ``parent`` (real chained hashes of random tokens)."""
    rng = random.Random(seed)
    tokens = [rng.randrange(32000) for _ in range(n * BS)]
    return parent + tuple(hash_blocks(tokens, BS, parent[-1] if parent else 0, 0))


def stored(instance: str, hashes, *, reset: bool = False, removed=()) -> KVEventBatch:
    hashes = tuple(hashes)
    return KVEventBatch(instance, BS, reset, hashes, (0,) + hashes[:-1] if hashes else (), tuple(removed))


def test_longest_prefix_per_instance_from_events():
    idx = PrefixIndex(BS)
    system = chain(1, 4)
    conv = chain(2, 6, system)
    idx.apply_events(stored("a", conv, reset=True), 0.0)
    idx.apply_events(stored("b", system, reset=True), 0.0)
    idx.apply_events(stored("c", chain(3, 5), reset=True), 0.0)
    prompt = chain(4, 3, conv)
    assert idx.longest_prefix(prompt, 1.0) == {"a": 10 * BS, "b": 4 * BS}
    assert idx.longest_prefix(chain(9, 3), 1.0) == {}
    assert idx.longest_prefix((), 1.0) == {}


def test_removed_blocks_and_resets():
    idx = PrefixIndex(BS)
    conv = chain(2, 8)
    idx.apply_events(stored("a", conv, reset=True), 0.0)
    idx.apply_events(KVEventBatch("a", BS, removed_hashes=(conv[5],)), 1.0)
    assert idx.longest_prefix(conv, 2.0) == {"a": 5 * BS}  # a child without its parent does not count
    other = chain(3, 4)
    idx.apply_events(stored("a", other, reset=True), 3.0)  # reconnect: the snapshot replaces everything
    assert idx.longest_prefix(conv, 4.0) == {}
    assert idx.longest_prefix(other, 4.0) == {"a": 4 * BS}
    assert len(idx) == 4


def test_events_at_another_block_size_are_dropped():
    idx = PrefixIndex(BS)
    idx.apply_events(KVEventBatch("a", 32, True, chain(1, 2), (0, 0)), 0.0)
    assert len(idx) == 0 and idx.num_dropped_batches == 1


def test_approximation_from_routing_decisions_expires_and_yields_to_live_events():
    idx = PrefixIndex(BS, approx_ttl_s=10.0, stale_ttl_s=5.0)
    prompt = chain(1, 6)
    idx.record_routed("a", prompt, now=0.0)
    assert idx.longest_prefix(prompt, 9.0) == {"a": 6 * BS}
    assert idx.longest_prefix(prompt, 10.5) == {}
    # a later request refreshes only its own (shorter) prefix
    idx.record_routed("a", prompt, now=20.0)
    idx.record_routed("a", prompt[:3], now=25.0)
    assert idx.longest_prefix(prompt, 29.0) == {"a": 6 * BS}
    assert idx.longest_prefix(prompt, 32.0) == {"a": 3 * BS}
    # once events are live, decisions are not guesses any more
    idx.apply_events(stored("b", (), reset=True), 40.0)
    idx.record_routed("b", prompt, now=40.0)
    assert idx.longest_prefix(prompt, 41.0) == {}
    idx.apply_events(stored("b", prompt[:2]), 42.0)
    assert idx.longest_prefix(prompt, 43.0) == {"b": 2 * BS}
    # the stream breaks: known blocks stay for stale_ttl_s, and guesses are accepted again
    idx.mark_stale("b", 50.0)
    assert not idx.is_live("b")
    assert idx.longest_prefix(prompt, 54.0) == {"b": 2 * BS}
    assert idx.longest_prefix(prompt, 56.0) == {}
    idx.record_routed("b", prompt, now=60.0)
    assert idx.longest_prefix(prompt, 61.0) == {"b": 6 * BS}
    idx.remove_instance("b")
    assert idx.longest_prefix(prompt, 61.0) == {}


def test_memory_bound_holds_and_recent_entries_stay_correct():
    bound = 5_000
    idx = PrefixIndex(BS, max_entries=bound)
    instances = [f"i{k}" for k in range(8)]
    recent: list[tuple[str, tuple[int, ...]]] = []
    for n in range(2_000):  # 2000 prompts x 20 blocks = 40,000 entries, 8x the bound
        inst = instances[n % len(instances)]
        prompt = chain(n, 20)
        idx.apply_events(stored(inst, prompt, reset=n < len(instances)), float(n))
        assert len(idx) <= bound
        recent = (recent + [(inst, prompt)])[-50:]
    store = idx.store
    assert isinstance(store, InMemoryPrefixStore) and store.num_evicted >= 40_000 - bound
    for inst, prompt in recent:  # the 50 most recent prompts (1000 entries) are intact
        assert idx.longest_prefix(prompt, 1e9) == {inst: 20 * BS}
    # a lookup refreshes a prefix: an old prompt that keeps being used survives the churn
    keep_inst, keep = recent[0]
    for n in range(2_000, 2_600):
        idx.longest_prefix(keep, float(n))
        idx.apply_events(stored(instances[n % 8], chain(n, 20)), float(n))
    assert idx.longest_prefix(keep, 1e9) == {keep_inst: 20 * BS}
    assert len(idx) <= bound


def test_eviction_takes_leaves_before_roots():
    idx = PrefixIndex(BS, max_entries=10)
    prompt = chain(1, 10)
    idx.apply_events(stored("a", prompt, reset=True), 0.0)
    idx.apply_events(stored("a", chain(2, 4)), 1.0)  # 4 more entries: 4 must go
    assert idx.longest_prefix(prompt, 2.0) == {"a": 6 * BS}  # the deepest went, not the root


@pytest.mark.parametrize("num_instances,num_blocks", [(64, 100_000)])
def test_lookup_is_fast_at_cluster_scale(num_instances, num_blocks):
    rng = random.Random(0)
    idx = PrefixIndex(BS)
    system = chain(0, 8)
    instances = [f"i{k}" for k in range(num_instances)]
    for inst in instances:
        idx.apply_events(stored(inst, system, reset=True), 0.0)
    convs = []
    total = len(idx)
    n = 0
    while total < num_blocks:  # conversations of 64 to 256 blocks, each cached on 1 to 3 instances
        conv = chain(n + 1, rng.randrange(56, 248), system)
        for inst in rng.sample(instances, rng.randrange(1, 4)):
            idx.apply_events(stored(inst, conv[8:]), 0.0)
            total += len(conv) - 8
        convs.append(conv)
        n += 1
    assert len(idx) >= num_blocks
    prompts = [chain(10_000 + i, 8, c) for i, c in enumerate(rng.sample(convs, 200))]
    times = []
    for prompt in prompts:
        start = time.perf_counter()
        result = idx.longest_prefix(prompt, 1.0)
        times.append(time.perf_counter() - start)
        assert len(result) == num_instances and max(result.values()) == (len(prompt) - 8) * BS
    times.sort()
    p50 = times[len(times) // 2]
    print(f"longest_prefix over {len(idx)} entries, {num_instances} instances: p50 {p50 * 1e6:.0f} us, "
          f"p99 {times[int(len(times) * 0.99)] * 1e6:.0f} us (prompts of {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} blocks)")
    assert p50 < 1e-3
