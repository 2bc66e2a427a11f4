"""Which instance holds which prompt blocks: the router's view of every worker's prefix cache.

Fed two ways:

- **KV events** (authoritative). Each worker streams ``KVEventBatch`` messages: the hashes of blocks
  that entered (``stored``) and left (``removed``) its prefix cache; the first batch of a stream has
  ``reset`` set and lists the whole cache, so it replaces everything known about that instance.
  From a reset on, the instance's events are *live*. When its stream breaks, the router calls
  :meth:`PrefixIndex.mark_stale`: what was known stays, but expires after ``stale_ttl_s``.
- **Approximation** from the router's own decisions, for instances whose events are not live:
  after routing a request to an instance, :meth:`PrefixIndex.record_routed` assumes the instance
  holds the request's blocks for ``approx_ttl_s`` seconds (Dynamo's approximate mode).

Blocks are identified by their chained hash (``common.block_hash``): equal hashes at position
``i`` mean equal prefixes of ``i + 1`` blocks, so the index needs no tree. Parent hashes in the
events are accepted (the wire format has them) but not needed. Within one batch, removals are
applied before stores (the batch does not say which came first; a block evicted and recomputed in
one interval is more likely than one stored and evicted, since a stored block is in use).

:meth:`PrefixIndex.longest_prefix` answers, per request, how many leading tokens of the prompt each
instance holds: a walk along the prompt's hashes that narrows the set of instances still
matching, so its cost is the number of (block, instance) pairs matched, not the index size.

Memory is bounded: at most ``max_entries`` (hash, instance) entries. Recency is tracked per hash
(lookups and stores touch a chain deepest block first, so a prefix's root is more recent than its
leaves); when over the bound, the least recently used hash is evicted with all its holders.

Storage sits behind :class:`PrefixStore` (``add``, ``remove``, ``clear``, ``expire_all``, ``match``,
``len``) so a Redis-backed store can replace :class:`InMemoryPrefixStore` for routers that share
state; ``match`` is the one hot call and is meant to run where the data is (a Lua script in Redis).
Time is always passed in (``now``), never read, so the simulator can run it on virtual time.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

logger = logging.getLogger(__name__)

NEVER = math.inf  # expiry of an entry backed by live KV events


@dataclass(frozen=True, slots=True)
class KVEventBatch:
    """A worker's KV events (the ``KVEventBatch`` message of proto/worker.proto, as plain data)."""

    instance_id: str
    block_size: int
    reset: bool = False
    stored_hashes: tuple[int, ...] = ()
    stored_parent_hashes: tuple[int, ...] = ()
    removed_hashes: tuple[int, ...] = ()

    @classmethod
    def from_proto(cls, msg: Any) -> KVEventBatch:
        return cls(instance_id=msg.instance_id, block_size=msg.block_size, reset=msg.reset,
                   stored_hashes=tuple(msg.stored_hashes), stored_parent_hashes=tuple(msg.stored_parent_hashes),
                   removed_hashes=tuple(msg.removed_hashes))


class PrefixStore(Protocol):
    """Where (hash, instance) entries live. Each entry has an expiry time (``NEVER`` for event-backed)."""

    def add(self, instance_id: str, block_hashes: Sequence[int], expires_at: float) -> None:
        """Record that the instance holds these blocks until ``expires_at`` (an entry's expiry only grows)."""
        ...

    def remove(self, instance_id: str, block_hashes: Iterable[int]) -> None: ...

    def clear(self, instance_id: str) -> None:
        """Forget every entry of the instance (a reset, or the instance left the cluster)."""
        ...

    def expire_all(self, instance_id: str, expires_at: float) -> None:
        """Bring every entry of the instance's expiry forward to at most ``expires_at``."""
        ...

    def match(self, block_hashes: Sequence[int], now: float) -> dict[str, int]:
        """Per instance, how many leading blocks of ``block_hashes`` it holds unexpired (> 0 only)."""
        ...

    def __len__(self) -> int:
        """Number of (hash, instance) entries held."""
        ...


class InMemoryPrefixStore:
    """The in-process store: an LRU of hashes, each with its holders and their expiry times."""

    def __init__(self, max_entries: int = 1_000_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._table: OrderedDict[int, dict[str, float]] = OrderedDict()
        self._by_instance: dict[str, set[int]] = {}
        self._num_entries = 0
        self.num_evicted = 0

    def __len__(self) -> int:
        return self._num_entries

    def num_hashes(self) -> int:
        return len(self._table)

    def add(self, instance_id: str, block_hashes: Sequence[int], expires_at: float) -> None:
        table = self._table
        mine = self._by_instance.setdefault(instance_id, set())
        for h in reversed(block_hashes):  # deepest first: the root ends up most recent
            holders = table.get(h)
            if holders is None:
                table[h] = {instance_id: expires_at}
                self._num_entries += 1
            else:
                old = holders.get(instance_id)
                if old is None:
                    self._num_entries += 1
                    holders[instance_id] = expires_at
                elif old < expires_at:
                    holders[instance_id] = expires_at
                table.move_to_end(h)
            mine.add(h)
        while self._num_entries > self.max_entries:
            h, holders = table.popitem(last=False)
            self._num_entries -= len(holders)
            self.num_evicted += len(holders)
            for inst in holders:
                self._by_instance[inst].discard(h)

    def remove(self, instance_id: str, block_hashes: Iterable[int]) -> None:
        mine = self._by_instance.get(instance_id)
        if not mine:
            return
        for h in block_hashes:
            if h in mine:
                mine.discard(h)
                self._drop(h, instance_id)

    def _drop(self, h: int, instance_id: str) -> None:
        holders = self._table[h]
        del holders[instance_id]
        self._num_entries -= 1
        if not holders:
            del self._table[h]

    def clear(self, instance_id: str) -> None:
        for h in self._by_instance.pop(instance_id, ()):
            self._drop(h, instance_id)

    def expire_all(self, instance_id: str, expires_at: float) -> None:
        for h in self._by_instance.get(instance_id, ()):
            holders = self._table[h]
            if holders[instance_id] > expires_at:
                holders[instance_id] = expires_at

    def match(self, block_hashes: Sequence[int], now: float) -> dict[str, int]:
        table = self._table
        n = len(block_hashes)
        first = table.get(block_hashes[0]) if n else None
        if not first:
            return {}
        matched: dict[str, int] = {}
        active = set(first)
        i = 1
        while i < n:
            holders = table.get(block_hashes[i])
            if not holders:
                break
            gone = [inst for inst in active if inst not in holders]
            if gone:
                for inst in gone:
                    matched[inst] = i
                active.difference_update(gone)
                if not active:
                    break
            i += 1
        for inst in active:
            matched[inst] = i
        # Expiry is non-increasing along a chain (whatever refreshes a block refreshes its
        # ancestors), so walking back from the deepest match finds the unexpired length.
        out: dict[str, int] = {}
        deepest = 0
        for inst, m in matched.items():
            while m > 0 and table[block_hashes[m - 1]][inst] <= now:
                m -= 1
            if m:
                out[inst] = m
                deepest = max(deepest, m)
        for h in reversed(block_hashes[:deepest]):
            table.move_to_end(h)
        return out


class PrefixIndex:
    """The prefix index the router consults per request (see the module docstring)."""

    def __init__(self, block_size: int, *, store: PrefixStore | None = None, max_entries: int = 1_000_000,
                 approx_ttl_s: float = 120.0, stale_ttl_s: float = 30.0) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self.store: PrefixStore = store if store is not None else InMemoryPrefixStore(max_entries)
        self.approx_ttl_s = approx_ttl_s
        self.stale_ttl_s = stale_ttl_s
        self._live: set[str] = set()
        self.num_dropped_batches = 0

    def __len__(self) -> int:
        return len(self.store)

    def is_live(self, instance_id: str) -> bool:
        return instance_id in self._live

    def apply_events(self, batch: KVEventBatch, now: float) -> None:
        """Called by the KV-event subscriber for every batch a worker streams."""
        if batch.block_size != self.block_size:
            self.num_dropped_batches += 1
            logger.error("instance %s reports KV events at block size %d, the router hashes at %d: dropped",
                         batch.instance_id, batch.block_size, self.block_size)
            return
        if batch.reset:
            self.store.clear(batch.instance_id)
            self._live.add(batch.instance_id)
        elif batch.removed_hashes:
            self.store.remove(batch.instance_id, batch.removed_hashes)
        if batch.stored_hashes:
            self.store.add(batch.instance_id, batch.stored_hashes, NEVER)

    def record_routed(self, instance_id: str, block_hashes: Sequence[int], now: float) -> None:
        """Called after routing a request there: assume it will hold the prompt's blocks for a while."""
        if block_hashes and instance_id not in self._live:
            self.store.add(instance_id, block_hashes, now + self.approx_ttl_s)

    def mark_stale(self, instance_id: str, now: float) -> None:
        """Called when the instance's event stream breaks: keep what is known, for ``stale_ttl_s``."""
        self._live.discard(instance_id)
        self.store.expire_all(instance_id, now + self.stale_ttl_s)

    def remove_instance(self, instance_id: str) -> None:
        """Called when the instance leaves the cluster."""
        self._live.discard(instance_id)
        self.store.clear(instance_id)

    def longest_prefix(self, block_hashes: Sequence[int], now: float) -> dict[str, int]:
        """``{instance_id: cached prompt tokens}`` for every instance holding a prefix of the prompt."""
        if not block_hashes:
            return {}
        bs = self.block_size
        return {inst: blocks * bs for inst, blocks in self.store.match(block_hashes, now).items()}
