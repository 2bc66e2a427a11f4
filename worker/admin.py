"""The WorkerAdmin service of both roles: health, drain, load reports, KV events.

Load reports and KV events are what the router plans with: a report is a
snapshot taken on the engine thread every ``interval_ms`` (during a long
engine step, the last snapshot is sent again, so a busy worker does not look
dead to the router; only an engine thread stuck for ``STUCK_AFTER_S`` stops
the reports); KV events stream
the hashes of blocks entering and leaving the prefix cache, after a first
batch (``reset``) holding the whole cache, so a subscriber that reconnects
starts from the truth rather than from a diff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from common.rpc import worker_pb2 as pb
from common.rpc import worker_pb2_grpc as pb_grpc
from engine.async_engine import AsyncEngine
from engine.block_pool import KVEvents
from engine.core import EngineLoad
from kvtransfer.layout import KVLayout
from worker.grpc_errors import grpc_errors
from worker.roles import RoleGate, RoleSwitcher

logger = logging.getLogger(__name__)

MIN_INTERVAL_MS = 10
FRESH_WAIT_S = 0.25  # how long a report waits for the engine thread before resending the last snapshot
STUCK_AFTER_S = 60.0  # no fresh snapshot for this long: stop reporting (the router stops routing here)
EVENT_QUEUE_LIMIT = 10_000  # batches; a subscriber that falls this far behind is cut off


class AdminService(pb_grpc.WorkerAdminServicer):
    def __init__(self, engine: AsyncEngine, *, gate: RoleGate, switcher: RoleSwitcher, instance_id: str,
                 model: str, in_flight: Callable[[], int], transfers_in_flight: Callable[[], int]) -> None:
        self.engine = engine
        self.gate = gate
        self.switcher = switcher
        self.instance_id = instance_id
        self.model = model
        self.layout = KVLayout.of_cache(engine.core.runner.kv_caches)
        self._in_flight = in_flight
        self._transfers_in_flight = transfers_in_flight
        self._subscribers: set[asyncio.Queue] = set()
        self._snapshot: asyncio.Future | None = None  # one engine-thread snapshot in flight, shared
        self._last_load: EngineLoad | None = None
        self._last_load_at = 0.0
        engine.on_kv_events = self._publish

    @property
    def role(self) -> str:
        return self.gate.role

    @property
    def draining(self) -> bool:
        return self.gate.draining

    # --- health, drain, role ---------------------------------------------------------------------

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        status = pb.HealthResponse.STATUS_DRAINING if self.draining else pb.HealthResponse.STATUS_SERVING
        return pb.HealthResponse(status=status, role=self.role, instance_id=self.instance_id, model=self.model,
                                 layout=self.layout.to_proto())

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:
        remaining = await self.drain(request.timeout_s or 60.0)
        return pb.DrainResponse(drained=remaining == 0, num_remaining=remaining)

    async def drain(self, timeout_s: float) -> int:
        """Refuse new work; wait for in-flight work to finish. Returns what is still in flight."""
        self.gate.draining = True
        deadline = time.monotonic() + timeout_s
        while (remaining := self._in_flight()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return remaining

    @grpc_errors
    async def SetRole(self, request: pb.SetRoleRequest, context: grpc.aio.ServicerContext) -> pb.SetRoleResponse:
        role, drained, aborted = await self.switcher.switch(request.role, request.drain_timeout_s or 30.0)
        return pb.SetRoleResponse(role=role, drained=drained, num_aborted=aborted)

    # --- load reports ---------------------------------------------------------------------------

    async def load(self) -> EngineLoad:
        """The engine's load snapshot, shared by the load reports and the metrics publisher."""
        if self._snapshot is None or self._snapshot.done():
            self._snapshot = asyncio.ensure_future(self.engine.call(self.engine.core.load))
        snapshot = self._snapshot
        try:
            load = await asyncio.wait_for(asyncio.shield(snapshot), FRESH_WAIT_S)
        except TimeoutError:  # mid-step: the last snapshot, unless the engine thread looks stuck
            if self._last_load is None or time.monotonic() - self._last_load_at > STUCK_AFTER_S:
                load = await snapshot
            else:
                return self._last_load
        self._last_load, self._last_load_at = load, time.monotonic()
        return load

    async def report(self) -> pb.LoadReport:
        load = await self.load()
        return pb.LoadReport(
            instance_id=self.instance_id, role=self.role, timestamp=time.time(),
            num_running=load.num_running + load.num_awaiting_kv, num_waiting=load.num_waiting,
            num_queued_prefill_tokens=load.num_queued_prefill_tokens, num_free_blocks=load.num_free_blocks,
            num_total_blocks=load.num_total_blocks, block_size=load.block_size,
            recent_step_times_s=list(load.recent_step_times_s),
            num_transfers_in_flight=self._transfers_in_flight(), draining=self.draining,
            num_prefix_cache_queries=load.num_prefix_cache_queries,
            num_prefix_cache_hits=load.num_prefix_cache_hits)

    async def StreamLoad(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[pb.LoadReport]:
        interval = max(request.interval_ms or 200, MIN_INTERVAL_MS) / 1000
        while True:
            yield await self.report()
            await asyncio.sleep(interval)

    # --- KV events ------------------------------------------------------------------------------

    def _publish(self, events: KVEvents) -> None:
        batch = _batch(self.instance_id, self.layout.block_size, events.stored, events.removed, reset=False)
        for q in list(self._subscribers):
            if q.qsize() >= EVENT_QUEUE_LIMIT:
                self._subscribers.discard(q)
                q.put_nowait(None)  # too slow: cut off; it reconnects and gets a fresh snapshot
            else:
                q.put_nowait(batch)

    async def StreamKVEvents(self, request: pb.KVEventsRequest, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.KVEventBatch]:
        q: asyncio.Queue = asyncio.Queue()
        # subscribe and snapshot in one engine-thread call: no event falls between them
        def subscribe() -> list[tuple[int, int | None]]:
            self.engine.loop_call(self._subscribers.add, q)
            return self.engine.core.kv.pool.cached_hashes()

        snapshot = await self.engine.call(subscribe)
        try:
            yield _batch(self.instance_id, self.layout.block_size, snapshot, [], reset=True)
            while (batch := await q.get()) is not None:
                yield batch
        finally:
            self._subscribers.discard(q)


def _batch(instance_id: str, block_size: int, stored: list[tuple[int, int | None]], removed: list[int], *,
           reset: bool) -> pb.KVEventBatch:
    return pb.KVEventBatch(instance_id=instance_id, block_size=block_size, reset=reset,
                           stored_hashes=[h for h, _ in stored],
                           stored_parent_hashes=[p or 0 for _, p in stored], removed_hashes=removed)
