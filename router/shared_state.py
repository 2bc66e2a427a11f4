"""What router replicas share so that their routing decisions agree; a single router needs none of it.

Two facts are shared, both behind :class:`SharedState`:

- **in flight**: requests and prompt tokens each router has sent to each instance and not yet seen
  finish. Without it, N routers each believe they alone load an instance and together overload it.
- **prefix records**: "instance X was just sent a prompt with these blocks", so that another router
  sends the next request sharing that prefix to X too (before X's KV events say so).

:class:`LocalState` keeps both in process (one router, the simulator, tests). :class:`RedisState`
shares them through Redis::

    {prefix}:routers                SET of router ids (the index of in-flight hashes)
    {prefix}:inflight:{router_id}   HASH instance_id -> "<requests> <prompt_tokens>", PX in_flight_ttl_s
    {prefix}:block:{hash:016x}      STRING instance_id (the last router's pick), PX the record's ttl

Why this design:

- *Each router owns its in-flight hash and rewrites it whole* (one Lua call every
  ``refresh_interval_s``: DEL + HSET + PEXPIRE, then read every other router's hash). Absolute
  writes are idempotent, so a timed-out write that did land cannot double count, and a Redis that
  restarted empty is whole again after one refresh. The expiry makes it crash-safe: a router that
  dies stops refreshing and its counts vanish after ``in_flight_ttl_s``; nobody has to clean up.
  ``add_in_flight`` only touches local counts, so the request path never waits on Redis for them.
- *One key per block hash* with its own TTL bounds Redis memory by the write rate times the TTL,
  with no sweeper. Hashes are chained (``common.block_hash``), so the key of block ``i`` alone says
  "this instance got the whole prefix up to block ``i``": a lookup is one MGET (one round trip) and
  an instance's number of leading blocks is the deepest position it owns, gaps notwithstanding.

Failure: Redis errors are counted (``num_errors``), logged once per outage, and never raised.
After an error the request path skips Redis for ``retry_after_s`` (so an unreachable Redis costs
no latency) and serves local knowledge: this router's own counts and its own prefix records, which
it keeps in a bounded :class:`LocalState`-style table either way. The background refresh is what
notices Redis is back. The scripts address keys they are not given, so this needs a standalone
Redis (or one Redis Cluster slot), not a sharded cluster.

Lifecycle: construct, ``await start()``, use from the event loop, ``await stop()`` (after the router
drained, so its last write publishes zero counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

from common.errors import ConfigError
from router.discovery import DEFAULT_PREFIX, REDIS_ERRORS, open_redis, reraise_if_cancelled

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


class SharedState(Protocol):
    async def start(self) -> None:
        """Called once at router startup."""

    async def stop(self) -> None:
        """Called once at shutdown, after draining."""

    async def add_in_flight(self, instance_id: str, requests: int, prompt_tokens: int) -> None:
        """Called when the router sends work to an instance (positive) and when it finishes (negative)."""

    def in_flight(self) -> dict[str, tuple[int, int]]:
        """(requests, prompt_tokens) per instance summed over all routers; cheap, called per request."""

    async def record_prefix(self, instance_id: str, block_hashes: list[int], ttl_s: float) -> None:
        """Called after a routing decision: ``instance_id`` will soon hold these (chained) blocks."""

    async def lookup_prefix(self, block_hashes: list[int]) -> dict[str, int]:
        """Instance -> number of leading blocks of ``block_hashes`` recorded for it; per request."""


def leading_blocks(owners: Iterable[str | None]) -> dict[str, int]:
    """Owner of each position (None: unknown) -> instance: deepest position owned + 1."""
    out: dict[str, int] = {}
    for i, owner in enumerate(owners):
        if owner:
            out[owner] = i + 1
    return out


class _InFlight:
    def __init__(self) -> None:
        self.counts: dict[str, tuple[int, int]] = {}

    def add(self, instance_id: str, requests: int, prompt_tokens: int) -> None:
        r, t = self.counts.get(instance_id, (0, 0))
        r, t = r + requests, t + prompt_tokens
        if r or t:
            self.counts[instance_id] = (r, t)
        else:
            self.counts.pop(instance_id, None)


class _PrefixTable:
    """Block hash -> (instance, expiry), least recently used first, at most ``max_entries``."""

    def __init__(self, max_entries: int, clock: Callable[[], float]) -> None:
        if max_entries <= 0:
            raise ConfigError(f"must be positive, got {max_entries}", field="max_prefix_entries")
        self._entries: OrderedDict[int, tuple[str, float]] = OrderedDict()
        self._max_entries = max_entries
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, instance_id: str, block_hashes: list[int], ttl_s: float) -> None:
        now = self._clock()
        expiry = now + ttl_s
        for h in block_hashes:
            h &= _MASK64
            self._entries[h] = (instance_id, expiry)
            self._entries.move_to_end(h)
        while self._entries:  # with one TTL per caller, recency order is close to expiry order
            _, (_, oldest_expiry) = next(iter(self._entries.items()))
            if oldest_expiry > now and len(self._entries) <= self._max_entries:
                break
            self._entries.popitem(last=False)

    def lookup(self, block_hashes: list[int]) -> dict[str, int]:
        now = self._clock()
        owners: list[str | None] = []
        for h in block_hashes:
            entry = self._entries.get(h & _MASK64)
            owners.append(entry[0] if entry is not None and entry[1] > now else None)
        return leading_blocks(owners)


class LocalState:
    """In-process shared state: exact for one router, bounded by ``max_prefix_entries``."""

    def __init__(self, *, max_prefix_entries: int = 1_000_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._in_flight = _InFlight()
        self._prefixes = _PrefixTable(max_prefix_entries, clock)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def add_in_flight(self, instance_id: str, requests: int, prompt_tokens: int) -> None:
        self._in_flight.add(instance_id, requests, prompt_tokens)

    def in_flight(self) -> dict[str, tuple[int, int]]:
        return dict(self._in_flight.counts)

    async def record_prefix(self, instance_id: str, block_hashes: list[int], ttl_s: float) -> None:
        self._prefixes.record(instance_id, block_hashes, ttl_s)

    async def lookup_prefix(self, block_hashes: list[int]) -> dict[str, int]:
        return self._prefixes.lookup(block_hashes)


# KEYS[1]: the router index; KEYS[2]: this router's hash. ARGV[1]: this router's id, ARGV[2]: TTL
# in ms, ARGV[3]: key prefix of in-flight hashes, ARGV[4..]: field, value pairs of this router.
# Returns {router_id, {field, value, ...}, ...} for every other router with work in flight.
_REFRESH_LUA = """
redis.call('DEL', KEYS[2])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[1], ARGV[1])
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if id ~= ARGV[1] then
    local fields = redis.call('HGETALL', ARGV[3] .. id)
    if #fields == 0 then redis.call('SREM', KEYS[1], id)
    else table.insert(out, id); table.insert(out, fields) end
  end
end
return out
"""


class RedisState:
    """Shared state in Redis for several router replicas; see the module docstring for the layout."""

    def __init__(self, url: str, router_id: str, *, prefix: str = DEFAULT_PREFIX,
                 refresh_interval_s: float = 0.02, in_flight_ttl_s: float = 5.0, timeout_s: float = 0.1,
                 retry_after_s: float = 0.5, max_prefix_entries: int = 1_000_000) -> None:
        if not router_id:
            raise ConfigError("must not be empty", field="router_id")
        if refresh_interval_s <= 0:
            raise ConfigError(f"must be positive, got {refresh_interval_s}", field="refresh_interval_s")
        if in_flight_ttl_s <= refresh_interval_s:
            raise ConfigError("must exceed refresh_interval_s", field="in_flight_ttl_s")
        self.router_id = router_id
        self._prefix = prefix
        self._refresh_interval_s = refresh_interval_s
        self._in_flight_ttl_s = in_flight_ttl_s
        self._retry_after_s = retry_after_s
        self._redis = open_redis(url, timeout_s=timeout_s)
        self._refresh_script = self._redis.register_script(_REFRESH_LUA)
        self._own = _InFlight()
        self._prefixes = _PrefixTable(max_prefix_entries, time.monotonic)
        self._others: dict[str, tuple[int, int]] = {}  # summed over the other routers
        self._others_at = -math.inf  # monotonic time of the last successful refresh
        self._skip_until = 0.0  # the request path leaves Redis alone until then
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self._nudge = asyncio.Event()
        self.num_errors = 0

    @property
    def healthy(self) -> bool:
        return not self._failing

    async def start(self) -> None:
        await self._refresh()
        self._task = asyncio.create_task(self._run(), name="redis-shared-state")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._refresh()  # publish the final counts (zero once drained: the hash is deleted)
        await self._redis.aclose()

    async def add_in_flight(self, instance_id: str, requests: int, prompt_tokens: int) -> None:
        self._own.add(instance_id, requests, prompt_tokens)  # published by the next refresh
        if requests < 0:  # work left an instance: publish now, a stale count would steer others away
            self._nudge.set()

    def in_flight(self) -> dict[str, tuple[int, int]]:
        out = dict(self._own.counts)
        if time.monotonic() - self._others_at < self._in_flight_ttl_s:
            for instance_id, (r, t) in self._others.items():
                r0, t0 = out.get(instance_id, (0, 0))
                out[instance_id] = (r0 + r, t0 + t)
        return out

    async def record_prefix(self, instance_id: str, block_hashes: list[int], ttl_s: float) -> None:
        self._prefixes.record(instance_id, block_hashes, ttl_s)
        if not block_hashes or self._skipping():
            return
        px = max(1, int(ttl_s * 1000))
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for h in block_hashes:
                    pipe.set(self._block_key(h), instance_id, px=px)
                await pipe.execute()
        except REDIS_ERRORS as e:
            reraise_if_cancelled(e)
            self._error("record_prefix", e)

    async def lookup_prefix(self, block_hashes: list[int]) -> dict[str, int]:
        local = self._prefixes.lookup(block_hashes)
        if not block_hashes or self._skipping():
            return local
        try:
            owners = await self._redis.mget([self._block_key(h) for h in block_hashes])
        except REDIS_ERRORS as e:
            reraise_if_cancelled(e)
            self._error("lookup_prefix", e)
            return local
        out = leading_blocks(owners)
        for instance_id, n in local.items():  # our own records that a failed write did not publish
            out[instance_id] = max(out.get(instance_id, 0), n)
        return out

    def _block_key(self, block_hash: int) -> str:
        return f"{self._prefix}:block:{block_hash & _MASK64:016x}"

    def _skipping(self) -> bool:
        return self._failing and time.monotonic() < self._skip_until

    def _error(self, what: str, e: BaseException) -> None:
        self.num_errors += 1
        self._skip_until = time.monotonic() + self._retry_after_s
        if not self._failing:
            logger.warning("shared state in Redis unreachable (%s: %r); serving local knowledge", what, e)
        self._failing = True

    async def _run(self) -> None:
        while True:
            # woken by a nudge or by the interval (asyncio.timeout, not wait_for: 3.11's wait_for can
            # swallow a cancellation that races the timeout, and then stop() would wait forever)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._retry_after_s if self._failing else self._refresh_interval_s):
                    await self._nudge.wait()
            self._nudge.clear()
            try:
                await self._refresh()
            except Exception:  # a bug must not stop the refresh: our counts would expire for everyone
                logger.exception("shared state refresh failed")
            reraise_if_cancelled()  # or a crashed router's counts would be refreshed on forever

    async def _refresh(self) -> None:
        """Publish this router's counts (whole) and read everyone else's: one round trip."""
        args: list[str | int] = [self.router_id, max(1, int(self._in_flight_ttl_s * 1000)),
                                 f"{self._prefix}:inflight:"]
        for instance_id, (r, t) in self._own.counts.items():
            args += [instance_id, f"{r} {t}"]
        try:
            reply = await self._refresh_script(
                keys=[f"{self._prefix}:routers", f"{self._prefix}:inflight:{self.router_id}"], args=args)
        except REDIS_ERRORS as e:
            reraise_if_cancelled(e)
            self._error("refresh", e)
            return
        others: dict[str, tuple[int, int]] = {}
        for fields in reply[1::2]:
            for instance_id, value in zip(fields[::2], fields[1::2]):
                try:
                    r, t = map(int, value.split())
                except ValueError:
                    logger.debug("ignoring malformed in-flight value %r", value)
                    continue
                r0, t0 = others.get(instance_id, (0, 0))
                others[instance_id] = (r0 + r, t0 + t)
        self._others, self._others_at = others, time.monotonic()
        if self._failing:
            logger.info("shared state in Redis reachable again after %d errors", self.num_errors)
        self._failing, self._skip_until = False, 0.0
