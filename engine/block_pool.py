"""The pool of KV blocks: reference counts, the prefix cache and LRU eviction.

Every block is in exactly one of two states: referenced (``ref_cnt > 0``, owned
by one or more requests) or free (in ``_free``, an ordered queue whose head is
reused first). A free block may still be *cached*: registered under the hash
of the tokens it holds, so a later request with the same prefix can take it
back. Cached free blocks go to the tail of the queue when released and are
evicted (unregistered) only when the head reaches them, which makes eviction
least-recently-used; uncached free blocks go to the head, since they hold
nothing worth keeping.

A cached block records its own tokens and the cache key of the block before it
(``parent_key``). A lookup by hash checks both, so a hash collision costs a
miss, never wrong KV: the chain of keys proves the whole prefix is identical.
Keys carry a generation that changes whenever a block is re-registered, so a
block evicted and reused for other tokens can never pass as someone's parent.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

BlockKey = tuple[int, int]  # (block_id, generation)


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None  # set while registered in the prefix cache
    token_ids: tuple[int, ...] | None = None
    parent_key: BlockKey | None = None
    parent_hash: int | None = None  # for KV events: the router indexes blocks by hash chain
    generation: int = 0

    @property
    def key(self) -> BlockKey:
        return (self.block_id, self.generation)


@dataclass(slots=True)
class KVEvents:
    """Hashes registered and evicted since the last drain (fed to the router's prefix index)."""

    stored: list[tuple[int, int | None]] = field(default_factory=list)  # (hash, parent hash)
    removed: list[int] = field(default_factory=list)


class BlockPool:
    def __init__(self, num_blocks: int, *, record_events: bool = False) -> None:
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, Block] = {}
        self.record_events = record_events
        self.events = KVEvents()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def allocate(self, n: int) -> list[Block]:
        """Take ``n`` free blocks (evicting cached ones from the head), each with ``ref_cnt`` 1."""
        if n > len(self._free):
            raise MemoryError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: Block) -> None:
        del self._cached[block.block_hash]
        if self.record_events:
            self.events.removed.append(block.block_hash)
        block.block_hash = None
        block.token_ids = None
        block.parent_key = None
        block.parent_hash = None

    def touch(self, blocks: Iterable[Block]) -> None:
        """Add a reference to each block, taking free (cached) ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop a reference from each block, in the order given (the first becomes most evictable)."""
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of block {block.block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block.block_id, last=False)

    def lookup(self, block_hash: int, token_ids: tuple[int, ...], parent_key: BlockKey | None) -> Block | None:
        """The cached block holding exactly ``token_ids`` after the block keyed ``parent_key``."""
        block = self._cached.get(block_hash)
        if block is None or block.token_ids != token_ids or block.parent_key != parent_key:
            return None
        return block

    def cache(self, block: Block, block_hash: int, token_ids: tuple[int, ...],
              parent_key: BlockKey | None, parent_hash: int | None) -> bool:
        """Register a full, computed block. False if the hash is taken (the block stays uncached)."""
        assert block.block_hash is None and block.ref_cnt > 0
        if block_hash in self._cached:
            return False
        block.generation += 1
        block.block_hash = block_hash
        block.token_ids = token_ids
        block.parent_key = parent_key
        block.parent_hash = parent_hash
        self._cached[block_hash] = block
        if self.record_events:
            self.events.stored.append((block_hash, parent_hash))
        return True

    def cached_hashes(self) -> list[tuple[int, int | None]]:
        """Every registered (hash, parent hash): the snapshot a new KV-event subscriber starts from."""
        return [(h, b.parent_hash) for h, b in self._cached.items()]

    def drain_events(self) -> KVEvents:
        events, self.events = self.events, KVEvents()
        return events

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no request holds."""
        for block in list(self._cached.values()):
            if block.ref_cnt == 0:
                self._evict(block)
                self._free.move_to_end(block.block_id, last=False)

    def leaks(self) -> list[int]:
        """Ids of blocks still referenced; empty when every request has released its blocks."""
        return [b.block_id for b in self.blocks if b.ref_cnt != 0]
