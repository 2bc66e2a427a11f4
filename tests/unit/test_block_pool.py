"""BlockPool and KVCacheManager: reference counts, free-queue order, prefix lookups, hash collisions."""

from __future__ import annotations

from hashlib import blake2b

import numpy as np
import pytest

from common.block_hash import hash_blocks
from common.sampling import SamplingParams
from engine import LLM
from engine.block_pool import BlockPool
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request
from tests.hf_reference import hf_greedy, load_hf, random_prompts

BS = 4


def make_request(request_id: str, token_ids: list[int]) -> Request:
    return Request(request_id, list(token_ids), SamplingParams(max_tokens=8, temperature=0.0),
                   frozenset(), max_model_len=1024)


def compute(kv: KVCacheManager, request: Request, *, prefix: bool = True) -> Request:
    """Admit ``request`` and pretend its whole prompt was computed: the scheduler's calls, no model."""
    blocks, num_cached = kv.find_cached_prefix(request) if prefix else ([], 0)
    assert kv.allocate_slots(request, request.num_tokens - num_cached, blocks)
    request.num_computed_tokens = request.num_tokens
    kv.cache_full_blocks(request)
    return request


def tokens(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def free_order(pool: BlockPool) -> list[int]:
    """The free queue, head (reused first) to tail (white-box: reading it through allocate would evict)."""
    return list(pool._free)


# --- BlockPool ------------------------------------------------------------------------------------


def test_ref_counts_touch_and_free() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    assert (a.ref_cnt, b.ref_cnt, pool.num_free) == (1, 1, 2)
    pool.touch([a])
    assert a.ref_cnt == 2
    pool.free([a])
    assert a.ref_cnt == 1 and pool.num_free == 2
    pool.free([a, b])
    assert (a.ref_cnt, b.ref_cnt, pool.num_free) == (0, 0, 4)
    with pytest.raises(AssertionError, match="double free"):
        pool.free([a])
    assert pool.leaks() == []


def test_touch_takes_a_free_cached_block_out_of_the_queue() -> None:
    pool = BlockPool(3)
    (a,) = pool.allocate(1)
    assert pool.cache(a, 11, (1, 2), None, None)
    pool.free([a])
    assert pool.num_free == 3 and a.block_hash == 11
    pool.touch([a])
    assert pool.num_free == 2 and a.ref_cnt == 1
    assert a.block_id not in [b.block_id for b in pool.allocate(2)]
    assert pool.num_free == 0 and a.block_hash == 11  # not evicted
    pool.free(pool.blocks)
    assert pool.leaks() == []


def test_allocate_more_than_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(3)
    held = pool.allocate(2)
    with pytest.raises(MemoryError):
        pool.allocate(2)
    assert pool.num_free == 1 and [b.ref_cnt for b in pool.blocks] == [1, 1, 0]
    pool.free(held)
    assert pool.leaks() == []


def test_uncached_blocks_are_reused_before_cached_ones() -> None:
    pool = BlockPool(4, record_events=True)
    blocks = pool.allocate(4)
    pool.cache(blocks[0], 100, (0,), None, None)
    pool.cache(blocks[1], 101, (1,), blocks[0].key, 100)
    pool.free(blocks)  # 0, 1 cached -> tail in that order; 2, 3 uncached -> head, last freed first
    assert free_order(pool) == [3, 2, 0, 1]
    got = pool.allocate(3)
    assert [b.block_id for b in got] == [3, 2, 0]
    assert blocks[0].block_hash is None and blocks[1].block_hash == 101
    assert pool.drain_events().removed == [100]
    pool.free(got)
    assert pool.leaks() == []


def test_cached_blocks_are_evicted_lru_head_first() -> None:
    pool = BlockPool(3, record_events=True)
    a, b, c = pool.allocate(3)
    for i, block in enumerate((a, b, c)):
        pool.cache(block, 200 + i, (i,), None, None)
    pool.free([a, b, c])
    pool.touch([a])  # a is used again: most recently used once freed
    pool.free([a])
    assert free_order(pool) == [b.block_id, c.block_id, a.block_id]
    pool.drain_events()
    first = pool.allocate(1)
    assert first == [b] and pool.drain_events().removed == [201]
    assert pool.lookup(200, (0,), None) is a and pool.lookup(202, (2,), None) is c
    pool.free(first)
    assert pool.leaks() == []


def test_lookup_checks_tokens_and_parent_key() -> None:
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    assert pool.cache(a, 1, (5, 6), None, None)
    assert pool.cache(b, 2, (7, 8), a.key, 1)
    assert pool.lookup(1, (5, 6), None) is a
    assert pool.lookup(2, (7, 8), a.key) is b
    assert pool.lookup(2, (7, 9), a.key) is None  # same hash, other tokens
    assert pool.lookup(2, (7, 8), None) is None  # same hash and tokens, other parent
    assert pool.lookup(3, (7, 8), a.key) is None
    assert not pool.cache(pool.allocate(1)[0], 1, (9, 9), None, None)  # hash taken: stays uncached
    pool.free(pool.blocks)
    assert pool.leaks() == []


def test_evicted_parent_reregistered_with_other_tokens_hides_its_child() -> None:
    """(b) The generation in a parent key: a child of the evicted incarnation is never returned."""
    pool = BlockPool(3)
    parent, child = pool.allocate(2)
    pool.cache(parent, 1, (1, 1), None, None)
    pool.cache(child, 2, (2, 2), parent.key, 1)
    old_key = parent.key
    pool.free([parent, child])  # parent nearer the head: evicted first
    got = pool.allocate(2)
    assert got[1] is parent and parent.block_hash is None and child.block_hash == 2
    pool.cache(parent, 1, (3, 3), None, None)  # the same block id and hash, other tokens
    assert parent.key != old_key
    assert pool.lookup(1, (3, 3), None) is parent
    assert pool.lookup(2, (2, 2), parent.key) is None
    pool.free(got)
    assert pool.leaks() == []


def test_reset_prefix_cache_forgets_only_unreferenced_blocks() -> None:
    pool = BlockPool(3, record_events=True)
    a, b = pool.allocate(2)
    pool.cache(a, 1, (1,), None, None)
    pool.cache(b, 2, (2,), a.key, 1)
    pool.free([b])
    pool.drain_events()
    pool.reset_prefix_cache()
    assert pool.drain_events().removed == [2]
    assert a.block_hash == 1 and b.block_hash is None and pool.num_cached == 1
    assert free_order(pool)[0] == b.block_id  # an uncached free block goes to the head
    pool.free([a])
    assert pool.leaks() == []


# --- KVCacheManager -------------------------------------------------------------------------------


def test_request_blocks_are_freed_tail_first() -> None:
    kv = KVCacheManager(8, BS)
    r = compute(kv, make_request("r", tokens(0, 3 * BS + 1)))
    ids = kv.block_ids("r")
    assert len(ids) == 4
    kv.free("r")
    # the partial last block is uncached (head); the full ones are queued tail first, prefix last
    queue = free_order(kv.pool)
    assert queue[0] == ids[3] and queue[-3:] == [ids[2], ids[1], ids[0]]
    # the never-used blocks and the partial block go first; then eviction takes the prefix's tail
    taken = kv.pool.allocate(6)
    assert [b.block_id for b in taken][:5] == [ids[3], 4, 5, 6, 7] and taken[5].block_id == ids[2]
    again = make_request("again", r.prompt_token_ids)
    blocks, num_cached = kv.find_cached_prefix(again)
    assert [b.block_id for b in blocks] == ids[:2] and num_cached == 2 * BS
    kv.pool.free(taken)
    assert kv.pool.leaks() == [] and kv.owners() == []


def test_prefix_lookup_finds_the_longest_chain() -> None:
    kv = KVCacheManager(16, BS)
    compute(kv, make_request("a", tokens(0, 4 * BS + 2)))
    a_ids = kv.block_ids("a")
    b = make_request("b", tokens(0, 2 * BS) + tokens(500, 2 * BS + 3))
    blocks, num_cached = kv.find_cached_prefix(b)
    assert [x.block_id for x in blocks] == a_ids[:2] and num_cached == 2 * BS
    c = make_request("c", tokens(0, BS) + [999] + tokens(BS + 1, 3 * BS))  # differs inside block 1
    assert [x.block_id for x in kv.find_cached_prefix(c)[0]] == a_ids[:1]
    d = make_request("d", [999] + tokens(1, 4 * BS))
    assert kv.find_cached_prefix(d) == ([], 0)
    assert len(kv.find_cached_prefix(make_request("e", tokens(0, 4 * BS + 2)), max_tokens=BS + 3)[0]) == 1
    kv.free("a")
    assert kv.pool.leaks() == []


@pytest.mark.parametrize("extra, expected_blocks", [(0, 2), (1, 3), (BS - 1, 3)])
def test_prefix_lookup_never_matches_past_num_tokens_minus_one(extra: int, expected_blocks: int) -> None:
    kv = KVCacheManager(16, BS)
    compute(kv, make_request("a", tokens(0, 4 * BS)))
    assert kv.pool.num_cached == 4
    r = make_request("r", tokens(0, 3 * BS + extra))
    blocks, num_cached = kv.find_cached_prefix(r)
    assert len(blocks) == expected_blocks and num_cached == expected_blocks * BS
    assert num_cached <= r.num_tokens - 1
    kv.free("a")
    assert kv.pool.leaks() == []


def test_allocate_slots_is_all_or_nothing() -> None:
    kv = KVCacheManager(6, BS)
    compute(kv, make_request("hold", tokens(0, 3 * BS)))  # 3 blocks held
    r = make_request("r", tokens(100, 3 * BS + 1))  # needs 4
    before = [(b.ref_cnt, b.block_hash) for b in kv.pool.blocks]
    assert not kv.allocate_slots(r, r.num_tokens)
    assert kv.block_ids("r") == [] and "r" not in kv.owners()
    assert [(b.ref_cnt, b.block_hash) for b in kv.pool.blocks] == before and kv.num_free_blocks == 3
    assert kv.allocate_slots(r, 3 * BS)  # exactly what is free
    assert kv.num_free_blocks == 0
    assert not kv.allocate_slots(r, 3 * BS + 1)  # growing by one block more than is free
    assert len(kv.block_ids("r")) == 3
    kv.free("hold")
    kv.free("r")
    assert kv.pool.leaks() == []


def test_allocate_slots_counts_free_cached_prefix_blocks_it_would_take() -> None:
    kv = KVCacheManager(6, BS)
    compute(kv, make_request("old", tokens(0, 2 * BS + 1)))
    kv.free("old")  # two cached blocks, now free: all 6 free
    compute(kv, make_request("hold", tokens(300, 2 * BS)))  # 4 free left, 2 of them the cached prefix
    r = make_request("r", tokens(0, 2 * BS) + tokens(700, 2 * BS + 1))  # 5 blocks: 2 cached + 3 new
    prefix, num_cached = kv.find_cached_prefix(r)
    assert len(prefix) == 2 and all(b.ref_cnt == 0 for b in prefix)
    state = [(b.ref_cnt, b.block_hash) for b in kv.pool.blocks]
    queue = free_order(kv.pool)
    # 3 new blocks > 4 free - 2 the prefix takes out of the queue
    assert not kv.allocate_slots(r, r.num_tokens - num_cached, prefix)
    assert [(b.ref_cnt, b.block_hash) for b in kv.pool.blocks] == state
    assert free_order(kv.pool) == queue and kv.owners() == ["hold"]
    # one block fewer fits exactly
    r2 = make_request("r2", tokens(0, 2 * BS) + tokens(700, BS + 1))
    prefix, num_cached = kv.find_cached_prefix(r2)
    assert kv.allocate_slots(r2, r2.num_tokens - num_cached, prefix)
    assert kv.num_free_blocks == 0 and kv.block_ids("r2")[:2] == [b.block_id for b in prefix]
    assert all(b.ref_cnt == 1 for b in prefix)
    kv.free("hold")
    kv.free("r2")
    assert kv.pool.leaks() == []


def test_cache_full_blocks_registers_in_chain_order_with_events() -> None:
    kv = KVCacheManager(8, BS, record_events=True)
    prompt = tokens(0, 3 * BS + 2)
    h = hash_blocks(prompt, BS)
    r = make_request("r", prompt)
    assert kv.allocate_slots(r, r.num_tokens)
    r.num_computed_tokens = BS + 1  # a chunk: one full block computed
    kv.cache_full_blocks(r)
    assert kv.pool.drain_events().stored == [(h[0], None)]
    r.num_computed_tokens = r.num_tokens
    kv.cache_full_blocks(r)
    kv.cache_full_blocks(r)  # idempotent
    assert kv.pool.drain_events().stored == [(h[1], h[0]), (h[2], h[1])]
    blocks = [kv.pool.blocks[i] for i in kv.block_ids("r")]
    assert [b.block_hash for b in blocks] == [*h, None]
    assert blocks[1].parent_key == blocks[0].key and blocks[2].parent_key == blocks[1].key
    # generated tokens fill the last block, which is then registered after the prompt's
    for t in (900, 901):
        r.append_token(t)
    assert kv.allocate_slots(r, 1)
    r.num_computed_tokens = r.num_tokens
    kv.cache_full_blocks(r)
    h4 = hash_blocks(r.all_token_ids, BS)
    assert kv.pool.drain_events().stored == [(h4[3], h4[2])]
    kv.free("r")
    assert kv.pool.leaks() == [] and kv.pool.drain_events().removed == []
    kv.pool.allocate(8)  # evicts all four, head (tail of the request) first
    assert kv.pool.drain_events().removed == [h4[3], h4[2], h4[1], h4[0]]
    kv.pool.free(kv.pool.blocks)
    assert kv.pool.leaks() == []


def test_prefix_caching_disabled() -> None:
    kv = KVCacheManager(8, BS, enable_prefix_caching=False, record_events=True)
    compute(kv, make_request("a", tokens(0, 3 * BS)))
    assert kv.pool.num_cached == 0 and kv.pool.drain_events().stored == []
    assert kv.find_cached_prefix(make_request("b", tokens(0, 3 * BS))) == ([], 0)
    kv.free("a")
    assert kv.pool.leaks() == []


# --- hash collisions: a miss, never wrong KV --------------------------------------------------------


def _per_index_hashes(token_ids, block_size, parent_hash=0, start_block=0):
    """Every sequence's block i gets the same hash: all sequences collide everywhere."""
    return [1000 + i for i in range(start_block, len(token_ids) // block_size)]


def _unchained_hashes(token_ids, block_size, parent_hash=0, start_block=0):
    """A block's hash ignores its parent: the same tokens after different prefixes collide."""
    arr = np.asarray(token_ids, dtype=np.int64)
    return [int.from_bytes(blake2b(arr[i * block_size:(i + 1) * block_size].tobytes(), digest_size=8).digest(),
                           "little") for i in range(start_block, len(arr) // block_size)]


def test_colliding_hashes_with_other_tokens_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    """(a) Same hashes, other tokens: lookups miss and the newcomer's blocks are not registered."""
    monkeypatch.setattr("engine.kv_cache_manager.hash_blocks", _per_index_hashes)
    kv = KVCacheManager(16, BS)
    compute(kv, make_request("a", tokens(0, 3 * BS + 1)))
    b = make_request("b", tokens(100, 3 * BS + 1))
    assert kv.find_cached_prefix(b) == ([], 0)
    assert b.block_hashes == [1000, 1001, 1002]
    compute(kv, b, prefix=False)
    assert [kv.pool.blocks[i].block_hash for i in kv.block_ids("b")] == [None] * 4
    c = make_request("c", tokens(0, BS) + tokens(100, 2 * BS + 1))  # block 0 of a, then b's tokens
    assert [x.block_id for x in kv.find_cached_prefix(c)[0]] == kv.block_ids("a")[:1]
    kv.free("a")
    kv.free("b")
    assert kv.pool.leaks() == []


def test_colliding_hash_after_another_prefix_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same block tokens after a different cached prefix: the parent key refuses the match."""
    monkeypatch.setattr("engine.kv_cache_manager.hash_blocks", _unchained_hashes)
    kv = KVCacheManager(16, BS)
    x, y, z, z2 = tokens(0, BS), tokens(10, BS), tokens(20, BS), tokens(30, BS)
    compute(kv, make_request("z2", z2 + [1]))  # caches z2 as a block 0
    compute(kv, make_request("zxy", z + x + y + [1]))  # caches z, x (after z), y
    zxy = kv.block_ids("zxy")
    q = make_request("q", z2 + x + y + [1])
    assert _unchained_hashes(z2 + x + y, BS)[1:] == _unchained_hashes(z + x + y, BS)[1:]  # x, y collide
    blocks, num_cached = kv.find_cached_prefix(q)
    assert [b.block_id for b in blocks] == kv.block_ids("z2")[:1] and num_cached == BS
    assert not {b.block_id for b in blocks} & set(zxy[1:])
    kv.free("z2")
    kv.free("zxy")
    assert kv.pool.leaks() == []


def test_child_of_a_reregistered_parent_is_not_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    """(b) Through the manager: parent evicted and re-registered with other tokens, child still cached."""
    monkeypatch.setattr("engine.kv_cache_manager.hash_blocks", _per_index_hashes)
    kv = KVCacheManager(4, BS)
    compute(kv, make_request("a", tokens(0, 2 * BS)))
    parent, child = (kv.pool.blocks[i] for i in kv.block_ids("a"))
    kv.pool.touch([child])  # an extra reference keeps the child out of the free queue
    kv.free("a")
    taken = kv.pool.allocate(3)  # the two never-used blocks, then the parent: evicted
    assert parent in taken and parent.block_hash is None and child.block_hash == 1001
    kv.pool.free([child])
    kv.pool.free([b for b in taken if b is not parent])
    # a new request computes other tokens into the parent's block, registered under the same hash
    other = make_request("b", tokens(100, BS + 1))
    kv.pool.free([parent])  # make it the only uncached block at the head: "b" takes it
    compute(kv, other, prefix=False)
    assert kv.block_ids("b")[0] == parent.block_id and parent.block_hash == 1000
    # "c" matches the parent (its tokens are b's) and the child's tokens, but the child's KV
    # was computed after a's block 0: it must not be returned
    c = make_request("c", tokens(100, BS) + tokens(BS, BS) + [7])
    blocks, num_cached = kv.find_cached_prefix(c)
    assert blocks == [parent] and num_cached == BS
    kv.free("b")
    assert kv.pool.leaks() == []


@pytest.mark.parametrize("fake_hash", [_per_index_hashes, _unchained_hashes])
def test_colliding_hashes_end_to_end_match_hf(monkeypatch: pytest.MonkeyPatch, tiny_model_factory,
                                              fake_hash) -> None:
    """(c) Two prompt sets whose blocks collide give Hugging Face's greedy tokens, with no leaks."""
    monkeypatch.setattr("engine.kv_cache_manager.hash_blocks", fake_hash)
    model_dir = tiny_model_factory("llama_gqa")
    new_tokens = 8
    shared = random_prompts([3 * BS], 512, seed=11)[0]
    first = random_prompts([13, 21, 9], 512, seed=12)
    second = random_prompts([13, 21, 9], 512, seed=13)  # same lengths, other tokens: every hash collides
    # the same block tokens after another prefix (collides under the unchained hash)
    third = [second[0][:BS] + first[1][BS:], shared + first[2], second[1][:BS] + shared + first[2], first[0]]
    sets = [first + [shared + [5, 6]], second, third]
    llm = LLM(model_dir, dtype="float32", block_size=BS, num_blocks=128, max_num_batched_tokens=32)
    hf = load_hf(model_dir)
    greedy = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for prompts in sets:
        outputs = llm.generate(prompt_token_ids=prompts, sampling=greedy)
        for prompt, out in zip(prompts, outputs):
            assert out.token_ids == hf_greedy(hf, prompt, new_tokens)[0]
    assert llm.engine.kv.stats.hits > 0  # the cache was in use, not silently off
    llm.engine.assert_no_leaks()
