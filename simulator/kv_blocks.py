"""The KV blocks of one simulated instance: its prefix cache (LRU) and block accounting.

The same model as the engine's ``BlockPool`` (engine/block_pool.py), by counts instead of block
objects. A block is

- **hashed**: registered in the prefix cache under the chained hash of the prompt prefix it
  holds, referenced by ``refs[hash]`` requests (a shared prefix is held once);
- **cached free**: hashed, referenced by nobody, kept in ``lru`` (oldest first) and evicted only
  when an allocation finds no empty block (the engine's free queue, cached blocks at its tail);
- **anonymous**: a partial prompt block or generated tokens; counted, never cached.

The ledger counts the anonymous blocks of requests outside the decode batch (``num_anon``); the
decode batch's anonymous blocks grow every step and are counted by
:class:`simulator.decode_batch.DecodeBatch` on demand, so the engine passes that number in
(``batch_blocks``) wherever usage matters.

Every hash that enters or leaves the cache is queued in ``stored`` / ``removed``: the engine hands
them to the cluster, which feeds the router's prefix index as ``KVEventBatch`` es (the same KV
events a worker streams).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class BlockLedger:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.refs: dict[int, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.num_anon = 0
        self.stored: list[int] = []
        self.removed: list[int] = []
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    def used(self, batch_blocks: int) -> int:
        """Blocks referenced by requests (the engine's ``num_blocks - num_free_blocks``)."""
        return len(self.refs) + self.num_anon + batch_blocks

    def free(self, batch_blocks: int) -> int:
        """Blocks an allocation may take (empty ones and cached free ones), as the engine reports."""
        return self.num_blocks - self.used(batch_blocks)

    # --- the prefix cache -------------------------------------------------------------------------

    def present(self, block_hash: int) -> bool:
        return block_hash in self.refs or block_hash in self.lru

    def lookup(self, hashes: Sequence[int], limit: int) -> tuple[int, int]:
        """(leading blocks of ``hashes[:limit]`` cached here, how many of them are cached free)."""
        if not self.enable_prefix_caching:
            return 0, 0
        n = free = 0
        refs, lru = self.refs, self.lru
        for h in hashes[:limit]:
            if h in refs:
                n += 1
            elif h in lru:
                n += 1
                free += 1
            else:
                break
        return n, free

    def acquire(self, hashes: Sequence[int]) -> None:
        """Reference cached blocks found by :meth:`lookup` (cached free ones leave the LRU)."""
        refs, lru = self.refs, self.lru
        for h in hashes:
            if h in refs:
                refs[h] += 1
            else:
                del lru[h]
                refs[h] = 1

    def register(self, block_hash: int) -> bool:
        """Cache a just-computed full block under its hash (its owner converts one anonymous block).

        False when the hash is already cached here (the block stays anonymous, as in the engine).
        """
        if not self.enable_prefix_caching or self.present(block_hash):
            return False
        self.refs[block_hash] = 1
        self.stored.append(block_hash)
        return True

    def release(self, hashes: Sequence[int]) -> None:
        """Drop one reference from each hashed block; tail first, so a prefix's root is evicted last."""
        refs, lru = self.refs, self.lru
        for h in reversed(hashes):
            n = refs[h] - 1
            if n:
                refs[h] = n
            else:
                del refs[h]
                lru[h] = None

    def reclaim(self, batch_blocks: int) -> None:
        """Evict least recently used cached blocks until referenced + cached fit in the pool."""
        over = self.used(batch_blocks) + len(self.lru) - self.num_blocks
        lru = self.lru
        while over > 0 and lru:
            h, _ = lru.popitem(last=False)
            self.removed.append(h)
            over -= 1

    def take_events(self) -> tuple[list[int], list[int]]:
        """(stored, removed) hashes since the last call, netted to the cache's state now (a hash stored
        and evicted in between is in neither; the prefix index applies removals first)."""
        present = self.present
        stored = [h for h in dict.fromkeys(self.stored) if present(h)]
        removed = [h for h in dict.fromkeys(self.removed) if not present(h)]
        self.stored, self.removed = [], []
        return stored, removed
