"""Which blocks each request owns, and prefix-cache lookups on its behalf.

The scheduler is the only caller. ``find_cached_prefix`` finds the longest run
of cached blocks matching a request's tokens; ``allocate_slots`` makes room for
the tokens a step will compute (all or nothing); ``cache_full_blocks``
registers blocks once they are full and computed; ``free`` returns a request's
blocks, tail first, so its shared prefix stays cached longest.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.block_hash import NONE_HASH, hash_blocks
from engine.block_pool import Block, BlockPool
from engine.request import Request


@dataclass(slots=True)
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, found cached


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 record_events: bool = False) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, record_events=record_events)
        self.stats = PrefixCacheStats()
        self._blocks: dict[str, list[Block]] = {}
        self._num_registered: dict[str, int] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(request_id, ())]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _update_hashes(self, request: Request) -> list[int]:
        hashes = request.block_hashes
        if len(hashes) < request.num_tokens // self.block_size:
            parent = hashes[-1] if hashes else NONE_HASH
            hashes.extend(hash_blocks(request.all_token_ids, self.block_size, parent, len(hashes)))
        return hashes

    def _block_tokens(self, request: Request, i: int) -> tuple[int, ...]:
        return tuple(request.all_token_ids[i * self.block_size:(i + 1) * self.block_size])

    def find_cached_prefix(self, request: Request, *, max_tokens: int | None = None) -> tuple[list[Block], int]:
        """Longest cached prefix of the request's tokens, in whole blocks.

        At most ``num_tokens - 1`` tokens are matched (the step must compute at
        least one token to produce logits), or ``max_tokens`` when given.
        """
        if not self.enable_prefix_caching:
            return [], 0
        limit = request.num_tokens - 1 if max_tokens is None else max_tokens
        hashes = self._update_hashes(request)
        blocks: list[Block] = []
        parent_key = None
        for i in range(min(limit // self.block_size, len(hashes))):
            block = self.pool.lookup(hashes[i], self._block_tokens(request, i), parent_key)
            if block is None:
                break
            blocks.append(block)
            parent_key = block.key
        return blocks, len(blocks) * self.block_size

    def record_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.stats.queries += num_query_tokens
        self.stats.hits += num_hit_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       cached_prefix: list[Block] | None = None) -> bool:
        """Own enough blocks for ``num_computed_tokens (+ cached prefix) + num_new_tokens``.

        ``cached_prefix`` (from :meth:`find_cached_prefix`, only for a request
        that owns no blocks yet) is taken first. Returns False, changing
        nothing, when the pool cannot supply the rest.
        """
        rid = request.request_id
        owned = self._blocks.get(rid)
        cached_prefix = cached_prefix or []
        assert not (owned and cached_prefix), "a cached prefix only applies to a fresh request"
        num_owned = len(owned) if owned else 0
        computed = request.num_computed_tokens + len(cached_prefix) * self.block_size
        need = self.blocks_needed(computed + num_new_tokens) - num_owned - len(cached_prefix)
        reclaimed = sum(1 for b in cached_prefix if b.ref_cnt == 0)  # leave the free queue when touched
        if need > self.pool.num_free - reclaimed:
            return False
        if owned is None:
            owned = self._blocks[rid] = []
            self._num_registered[rid] = 0
        if cached_prefix:
            self.pool.touch(cached_prefix)
            owned.extend(cached_prefix)
            self._num_registered[rid] = len(cached_prefix)
        if need > 0:
            owned.extend(self.pool.allocate(need))
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that are now full and computed."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        blocks = self._blocks[rid]
        start = self._num_registered[rid]
        num_full = min(request.num_computed_tokens // self.block_size, len(blocks))
        if start >= num_full:
            return
        hashes = self._update_hashes(request)
        for i in range(start, num_full):
            block = blocks[i]
            if block.block_hash is None:
                parent = blocks[i - 1] if i > 0 else None
                if parent is not None and parent.block_hash is None:
                    break  # the chain is broken: nothing after an uncached block can be cached
                parent_key = parent.key if parent is not None else None
                parent_hash = hashes[i - 1] if i > 0 else None
                if not self.pool.cache(block, hashes[i], self._block_tokens(request, i), parent_key,
                                       parent_hash):
                    break
            self._num_registered[rid] = i + 1

    def free(self, request_id: str) -> None:
        blocks = self._blocks.pop(request_id, None)
        self._num_registered.pop(request_id, None)
        if blocks:
            self.pool.free(reversed(blocks))

    def owners(self) -> list[str]:
        return list(self._blocks)
