"""The worker's side of the Redis worker registry: registers this worker and keeps it alive.

Key layout (the constants and the entry codec live in ``router/discovery.py``, which reads it)::

    {prefix}:workers                  SET of instance ids: the index
    {prefix}:worker:{instance_id}     STRING, JSON {"instance_id", "role", "address", "ttl_s", "ts"}, PX ttl

Lifecycle: ``await start()`` writes the entry and starts a heartbeat task that rewrites it (SET with
PX ttl + SADD to the index, one MULTI) every ``ttl_s / 3``. Every heartbeat writes everything, so a
Redis that restarted empty has the worker back within ``ttl_s / 3``; while Redis is unreachable the
heartbeat logs once and keeps trying. ``await set_role(role)`` rewrites the entry at once after a
role flip. ``await stop()`` deletes the entry and leaves the index, so routers drop the worker at
their next poll; call it before draining. A worker that dies without ``stop()`` disappears when its
key expires, at most ``ttl_s`` later.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from common.errors import ConfigError
from router.discovery import (
    DEFAULT_PREFIX,
    REDIS_ERRORS,
    ROLES,
    WorkerEndpoint,
    encode_entry,
    open_redis,
    registry_entry_key,
    registry_index_key,
    reraise_if_cancelled,
    valid_address,
)

logger = logging.getLogger(__name__)


class RedisRegistration:
    """Keeps one worker's entry in the registry alive. All methods run on the worker's event loop."""

    def __init__(self, url: str, endpoint: WorkerEndpoint, *, ttl_s: float = 10.0,
                 prefix: str = DEFAULT_PREFIX, timeout_s: float = 1.0) -> None:
        if ttl_s <= 0:
            raise ConfigError(f"must be positive, got {ttl_s}", field="ttl_s")
        if not endpoint.instance_id:
            raise ConfigError("must not be empty", field="instance_id")
        if endpoint.role not in ROLES:
            raise ConfigError(f"must be one of {ROLES}, got {endpoint.role!r}", field="role")
        if not valid_address(endpoint.address):
            raise ConfigError(f"{endpoint.address!r} is not host:port", field="address")
        self._endpoint = endpoint
        self._ttl_s = ttl_s
        self._prefix = prefix
        self._redis = open_redis(url, timeout_s=min(timeout_s, ttl_s / 3))
        self._lock = asyncio.Lock()  # one write at a time, so a heartbeat cannot undo set_role
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    @property
    def endpoint(self) -> WorkerEndpoint:
        return self._endpoint

    async def start(self) -> bool:
        """Register now and start heartbeating; False when Redis was unreachable (it keeps trying)."""
        ok = await self._write()
        self._task = asyncio.create_task(self._heartbeat(), name="redis-registration")
        return ok

    async def set_role(self, role: str) -> bool:
        """Publish a role flip now; False when Redis was unreachable (the next heartbeat retries)."""
        if role not in ROLES:
            raise ConfigError(f"must be one of {ROLES}, got {role!r}", field="role")
        self._endpoint = dataclasses.replace(self._endpoint, role=role)
        return await self._write()

    async def stop(self) -> None:
        """Stop heartbeating and remove the entry (best effort: it expires anyway)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        instance_id = self._endpoint.instance_id
        try:
            async with self._lock, self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(registry_entry_key(self._prefix, instance_id))
                pipe.srem(registry_index_key(self._prefix), instance_id)
                await pipe.execute()
            logger.info("worker %s left the registry", instance_id)
        except REDIS_ERRORS as e:
            reraise_if_cancelled(e)
            logger.warning("could not remove %s from the registry (%r); it expires within %.1fs",
                           instance_id, e, self._ttl_s)
        finally:
            await self._redis.aclose()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_s / 3)
            try:
                await self._write()
            except Exception:  # a bug must not stop the heartbeat: the worker would vanish
                logger.exception("registry heartbeat failed")
            reraise_if_cancelled()

    async def _write(self) -> bool:
        async with self._lock:
            endpoint = self._endpoint
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.set(registry_entry_key(self._prefix, endpoint.instance_id),
                             encode_entry(endpoint, self._ttl_s), px=max(1, int(self._ttl_s * 1000)))
                    pipe.sadd(registry_index_key(self._prefix), endpoint.instance_id)
                    await pipe.execute()
            except REDIS_ERRORS as e:
                reraise_if_cancelled(e)
                if not self._failing:
                    logger.warning("worker registry unreachable (%r); %s retries every %.1fs",
                                   e, endpoint.instance_id, self._ttl_s / 3)
                self._failing = True
                return False
        if self._failing:
            logger.info("worker %s registered again", endpoint.instance_id)
            self._failing = False
        return True
