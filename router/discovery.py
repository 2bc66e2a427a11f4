"""Where the router learns its workers: a static list, a Redis registry, or Kubernetes EndpointSlices.

Every source implements :class:`Discovery`. Lifecycle: construct, ``await start()`` (the first view is
read before it returns; an unreachable backend is logged and retried, never raised), read
``endpoints()`` on the hot path (a cached list, no I/O), get ``on_change`` callbacks on the event
loop when the set changes (an instance added, removed, or its role or address changed), and
``await stop()``. The view is empty until ``start()``.

**Redis registry** (written by ``worker/registration.py``, read by :class:`RedisDiscovery`)::

    {prefix}:workers                  SET of instance ids: the index
    {prefix}:worker:{instance_id}     STRING, JSON {"instance_id", "role", "address", "ttl_s", "ts"}
                                      with PX ttl; rewritten (SET + SADD in one MULTI) every ttl/3

A worker that stops heartbeating vanishes when its key expires; discovery then drops the index
member with a Lua check-and-remove, so a worker re-registering at that moment is not lost. The index
exists because the same Redis holds one key per prompt block (``router/shared_state.py``): a
``SCAN`` for worker keys would walk all of them every poll. After Redis restarts empty (or comes
back after an outage, when every key may have expired) workers re-register within ttl/3; meanwhile
discovery holds on to its last view for one TTL rather than report an empty cluster.

**Kubernetes**: one list + watch of ``discovery.k8s.io/v1`` EndpointSlices per role, each in its own
thread (the official client is synchronous), posting that role's endpoints to the event loop. The
label selectors match the slices' labels, which the EndpointSlice controller copies from the
Service (``kubernetes.io/service-name=<svc>`` always works).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from common.errors import ConfigError

logger = logging.getLogger(__name__)

PREFILL, DECODE = "prefill", "decode"
ROLES = (PREFILL, DECODE)
DEFAULT_PREFIX = "pdserve"
DEFAULT_TTL_S = 10.0
REGISTRY_INDEX_KEY = "{prefix}:workers"
REGISTRY_ENTRY_KEY = "{prefix}:worker:{instance_id}"
REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


def reraise_if_cancelled(error: BaseException | None = None) -> None:
    """Raise CancelledError if this task was asked to stop. A cancel that lands inside a redis-py call can
    come out as the client's TimeoutError, or not come out at all; swallowed, the task runs on and whoever
    awaits it waits forever. So every Redis loop calls this after each round, and every ``except
    REDIS_ERRORS`` first (so a stop is not reported as an outage)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from error


@dataclass(frozen=True)
class WorkerEndpoint:
    instance_id: str
    role: str  # "prefill" | "decode"
    address: str  # host:port of the worker's gRPC server


class Discovery(Protocol):
    async def start(self) -> None:
        """Called once by the router at startup; returns after the first read of the source."""

    async def stop(self) -> None:
        """Called once at shutdown; no callbacks fire afterwards."""

    def endpoints(self) -> list[WorkerEndpoint]:
        """The current view, sorted by (role, instance_id); cheap, called per request."""

    def on_change(self, callback: Callable[[list[WorkerEndpoint]], None]) -> None:
        """Register ``callback(view)``, run on the event loop each time the view changes."""


def valid_address(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    if host.startswith("["):
        host = host[1:-1] if host.endswith("]") else ""
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def registry_index_key(prefix: str) -> str:
    return REGISTRY_INDEX_KEY.format(prefix=prefix)


def registry_entry_key(prefix: str, instance_id: str) -> str:
    return REGISTRY_ENTRY_KEY.format(prefix=prefix, instance_id=instance_id)


def encode_entry(endpoint: WorkerEndpoint, ttl_s: float) -> str:
    return json.dumps({"instance_id": endpoint.instance_id, "role": endpoint.role,
                       "address": endpoint.address, "ttl_s": ttl_s, "ts": time.time()})


def decode_entry(instance_id: str, raw: str) -> tuple[WorkerEndpoint, float]:
    """(endpoint, ttl_s) of a registry value; ValueError says what is wrong with it."""
    obj = json.loads(raw)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if obj.get("instance_id") != instance_id:
        raise ValueError(f"instance_id {obj.get('instance_id')!r} does not match the index")
    role, address, ttl_s = obj.get("role"), obj.get("address"), obj.get("ttl_s", DEFAULT_TTL_S)
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {ROLES}")
    if not isinstance(address, str) or not valid_address(address):
        raise ValueError(f"address {address!r} is not host:port")
    if not isinstance(ttl_s, int | float) or ttl_s <= 0:
        raise ValueError(f"ttl_s {ttl_s!r} is not a positive number")
    return WorkerEndpoint(instance_id, role, address), float(ttl_s)


def open_redis(url: str, *, timeout_s: float, field: str = "redis_url") -> redis.asyncio.Redis:
    """A client that fails fast: short timeouts and no hidden retries (callers own their retry policy)."""
    try:
        return redis.asyncio.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                      socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
    except ValueError as e:  # the message would echo the URL, which may hold a password
        raise ConfigError("must be a redis://, rediss:// or unix:// URL", field=field) from e


class _View:
    """The current endpoint list and the callbacks to tell when it changes (event loop only)."""

    def __init__(self) -> None:
        self.endpoints: list[WorkerEndpoint] = []
        self._callbacks: list[Callable[[list[WorkerEndpoint]], None]] = []

    def add(self, callback: Callable[[list[WorkerEndpoint]], None]) -> None:
        self._callbacks.append(callback)

    def publish(self, endpoints: Iterable[WorkerEndpoint]) -> bool:
        new = sorted(set(endpoints), key=lambda e: (e.role, e.instance_id, e.address))
        if new == self.endpoints:
            return False
        logger.info("workers now: %s", ", ".join(f"{e.instance_id}={e.role}@{e.address}" for e in new) or "none")
        self.endpoints = new
        for callback in list(self._callbacks):
            try:
                callback(list(new))
            except Exception:
                logger.exception("discovery on_change callback failed")
        return True


# --- static ---------------------------------------------------------------------------------------


def parse_static(spec: str, *, field: str = "workers") -> list[WorkerEndpoint]:
    """Parse ``"prefill=h1:1,h2:2;decode=h3:3"``; an item may name its instance: ``p0@h1:1``.

    The instance id defaults to the address (what a worker reports when not given one).
    """
    endpoints: dict[str, WorkerEndpoint] = {}
    for group in (g.strip() for g in spec.split(";")):
        if not group:
            continue
        role, sep, items = group.partition("=")
        role = role.strip()
        if not sep or role not in ROLES:
            raise ConfigError(f"{group!r} is not <role>=<host:port>,... with role in {ROLES}", field=field)
        for item in (i.strip() for i in items.split(",")):
            if not item:
                continue
            name, at, address = item.rpartition("@")
            instance_id = name if at else address
            if not valid_address(address) or not instance_id:
                raise ConfigError(f"{item!r} is not [name@]host:port", field=field)
            if instance_id in endpoints:
                raise ConfigError(f"{instance_id!r} is listed twice", field=field)
            endpoints[instance_id] = WorkerEndpoint(instance_id, role, address)
    if not endpoints:
        raise ConfigError("no workers; expected 'prefill=host:port,...;decode=host:port,...'", field=field)
    return list(endpoints.values())


class StaticDiscovery:
    """A fixed set of workers (``pdserve up``, tests): published at start, never changes."""

    def __init__(self, endpoints: Iterable[WorkerEndpoint]) -> None:
        self._endpoints = list(endpoints)
        for e in self._endpoints:
            if e.role not in ROLES:
                raise ConfigError(f"{e.instance_id}: role {e.role!r} is not one of {ROLES}", field="workers")
        self._view = _View()

    async def start(self) -> None:
        self._view.publish(self._endpoints)

    async def stop(self) -> None:
        pass

    def endpoints(self) -> list[WorkerEndpoint]:
        return list(self._view.endpoints)

    def on_change(self, callback: Callable[[list[WorkerEndpoint]], None]) -> None:
        self._view.add(callback)


# --- Redis registry -------------------------------------------------------------------------------

# KEYS[1]: the index; KEYS[2..]: entry keys; ARGV: the instance ids of KEYS[2..]. Drops the members
# whose entry is (still) gone, atomically, so a concurrent re-registration survives.
_PRUNE_LUA = """
local n = 0
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then n = n + redis.call('SREM', KEYS[1], ARGV[i - 1]) end
end
return n
"""


class RedisDiscovery:
    """Polls the Redis registry every ``poll_interval_s``: SMEMBERS + INFO, then one MGET."""

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX, poll_interval_s: float = 1.0,
                 timeout_s: float = 1.0) -> None:
        if poll_interval_s <= 0:
            raise ConfigError(f"must be positive, got {poll_interval_s}", field="poll_interval_s")
        self._redis = open_redis(url, timeout_s=timeout_s)
        self._prune = self._redis.register_script(_PRUNE_LUA)
        self._prefix = prefix
        self._poll_interval_s = poll_interval_s
        self._view = _View()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._run_id: str | None = None  # Redis's; a new one means it restarted (empty)
        self._hold_until = 0.0  # keep missing workers in the view until then (after an outage)
        self._ttl_s = DEFAULT_TTL_S  # the longest TTL among the entries last read
        self._warned: dict[str, str] = {}  # instance id -> malformed value already logged

    async def start(self) -> None:
        await self._poll()
        self._task = asyncio.create_task(self._run(), name="redis-discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._redis.aclose()

    def endpoints(self) -> list[WorkerEndpoint]:
        return list(self._view.endpoints)

    def on_change(self, callback: Callable[[list[WorkerEndpoint]], None]) -> None:
        self._view.add(callback)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            try:
                await self._poll()
            except Exception:  # a bug must not end discovery: the router would freeze its view
                logger.exception("redis discovery poll failed")
            reraise_if_cancelled()

    async def _poll(self) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.smembers(registry_index_key(self._prefix))
                pipe.info("server")
                members, info = await pipe.execute()
            members = sorted(members)
            keys = [registry_entry_key(self._prefix, m) for m in members]
            values = await self._redis.mget(keys) if keys else []
        except REDIS_ERRORS as e:
            reraise_if_cancelled(e)
            if not self._failing:
                logger.warning("worker registry unreachable (%r); keeping the last view of %d workers, "
                               "retrying every %.1fs", e, len(self._view.endpoints), self._poll_interval_s)
            self._failing = True
            return
        run_id = info.get("run_id")
        if self._failing or (self._run_id is not None and run_id != self._run_id):
            logger.info("worker registry %s; holding the last view for %.1fs while workers re-register",
                        "back" if self._failing else "restarted", self._ttl_s)
            self._hold_until = time.monotonic() + self._ttl_s
        self._failing, self._run_id = False, run_id
        found: dict[str, WorkerEndpoint] = {}
        gone: list[str] = []
        ttls = []
        for member, raw in zip(members, values):
            if raw is None:
                gone.append(member)
                continue
            try:
                endpoint, ttl_s = decode_entry(member, raw)
            except ValueError as e:  # json.JSONDecodeError is one
                if self._warned.get(member) != raw:
                    logger.warning("skipping malformed registry entry %s: %s",
                                   registry_entry_key(self._prefix, member), e)
                    self._warned[member] = raw
                continue
            self._warned.pop(member, None)
            ttls.append(ttl_s)
            found[endpoint.instance_id] = endpoint
        if ttls:
            self._ttl_s = max(ttls)
        if time.monotonic() < self._hold_until:
            for endpoint in self._view.endpoints:
                found.setdefault(endpoint.instance_id, endpoint)
        if gone:
            try:
                await self._prune(keys=[registry_index_key(self._prefix)]
                                  + [registry_entry_key(self._prefix, m) for m in gone], args=gone)
            except REDIS_ERRORS as e:
                reraise_if_cancelled(e)
                logger.debug("pruning the worker index failed: %r", e)
        self._view.publish(found.values())


# --- a JSON file ------------------------------------------------------------------------------


class FileDiscovery:
    """Workers listed in a JSON file (``[{"instance_id", "role", "address"}, ...]``), re-read when it changes.

    ``pdserve up --autoscale`` writes it (atomically, by rename) as the local actuator starts, stops and
    flips workers. A missing or malformed file keeps the last good view.
    """

    def __init__(self, path: str, *, poll_interval_s: float = 0.5) -> None:
        if not path:
            raise ConfigError("is required with discovery=file", field="workers_file")
        self.path = path
        self.poll_interval_s = poll_interval_s
        self._view = _View()
        self._mtime: float | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._read()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def endpoints(self) -> list[WorkerEndpoint]:
        return list(self._view.endpoints)

    def on_change(self, callback: Callable[[list[WorkerEndpoint]], None]) -> None:
        self._view.add(callback)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            self._read()

    def _read(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
            if mtime == self._mtime:
                return
            entries = json.loads(Path(self.path).read_text())
            endpoints = [WorkerEndpoint(str(e["instance_id"]), str(e["role"]), str(e["address"])) for e in entries]
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.debug("cannot read the workers file %s: %r", self.path, e)
            return
        self._mtime = mtime
        self._view.publish(e for e in endpoints if e.role in ROLES and valid_address(e.address))


def write_workers_file(path: str | Path, endpoints: Iterable[WorkerEndpoint]) -> None:
    """Write the file FileDiscovery reads, atomically (a reader never sees half of it)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"instance_id": e.instance_id, "role": e.role, "address": e.address}
                               for e in endpoints]))
    os.replace(tmp, path)
