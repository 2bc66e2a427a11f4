"""The router's connections to its workers: one channel each, load reports and KV events in.

``WorkerPool.update(endpoints)`` (called by discovery whenever the set
changes) opens a client for each new worker and closes the ones that left.
Each client keeps two server streams open for as long as the worker is
known, reconnecting with backoff: ``StreamLoad`` feeds
``ClusterState.apply_load_report`` and ``StreamKVEvents`` feeds the prefix
index (``apply_kv_events``; a broken event stream marks the worker's entries
stale). A worker counts as healthy while its load reports keep arriving; a
load report whose role differs from the registered one (a role flip) moves
the worker to its new pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from common.rpc import worker_pb2 as pb
from common.rpc import worker_pb2_grpc as pb_grpc
from common.tls import TlsConfig, aio_channel
from router.cluster_state import ClusterState, LoadReport
from router.discovery import WorkerEndpoint
from router.prefix_index import KVEventBatch

logger = logging.getLogger(__name__)

BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0)
HEALTHY_WITHIN_S = 3.0
# A worker that leaves discovery is normally draining (scale-down, rollout): the calls already on its
# channel get this long to finish before the channel is closed under them. Closing at once would cancel
# them mid-stream, and a cancelled call cannot be told apart from a cancelled client.
REMOVE_GRACE_S = 120.0


class WorkerClient:
    def __init__(self, endpoint: WorkerEndpoint, *, options: list[tuple[str, int]], tls: TlsConfig) -> None:
        self.endpoint = endpoint
        self.channel = aio_channel(endpoint.address, tls, options)
        self.decode = pb_grpc.DecodeServiceStub(self.channel)
        self.admin = pb_grpc.WorkerAdminStub(self.channel)
        self.last_report_at = 0.0
        self.role = endpoint.role
        self.tasks: list[asyncio.Task] = []

    @property
    def instance_id(self) -> str:
        return self.endpoint.instance_id

    @property
    def healthy(self) -> bool:
        return time.monotonic() - self.last_report_at < HEALTHY_WITHIN_S

    async def close(self, grace_s: float | None = None) -> None:
        """Stop the load/event streams; calls in flight get ``grace_s`` to finish (None: cancelled now)."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.channel.close(grace=grace_s)


class WorkerPool:
    def __init__(self, state: ClusterState, *, load_interval_ms: int = 100, max_message_bytes: int = 64 << 20,
                 clock: Callable[[], float] = time.monotonic, tls: TlsConfig | None = None) -> None:
        self.state = state
        self.tls = tls or TlsConfig()
        self.load_interval_ms = load_interval_ms
        self.clock = clock
        self._options = [("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.max_send_message_length", max_message_bytes)]
        self.clients: dict[str, WorkerClient] = {}
        self._leaving: dict[asyncio.Task, WorkerClient] = {}  # removed, channel closing after its grace

    def update(self, endpoints: list[WorkerEndpoint]) -> None:
        wanted = {e.instance_id: e for e in endpoints}
        for instance_id in list(self.clients):
            client = self.clients[instance_id]
            new = wanted.get(instance_id)
            if new is None or new.address != client.endpoint.address:
                self._remove(instance_id)
            elif new.role != client.role:
                self._set_role(client, new.role)
        for instance_id, endpoint in wanted.items():
            if instance_id not in self.clients:
                self._add(endpoint)

    def _add(self, endpoint: WorkerEndpoint) -> None:
        client = WorkerClient(endpoint, options=self._options, tls=self.tls)
        self.clients[endpoint.instance_id] = client
        self.state.register(endpoint.instance_id, endpoint.role, endpoint.address)
        client.tasks = [asyncio.create_task(self._load_loop(client)),
                        asyncio.create_task(self._events_loop(client))]
        logger.info("worker %s (%s) at %s added", endpoint.instance_id, endpoint.role, endpoint.address)

    def _remove(self, instance_id: str) -> None:
        client = self.clients.pop(instance_id)
        self.state.unregister(instance_id)
        task = asyncio.create_task(client.close(REMOVE_GRACE_S))
        self._leaving[task] = client
        task.add_done_callback(lambda t: self._leaving.pop(t, None))
        logger.info("worker %s removed (calls in flight on it may finish)", instance_id)

    def _set_role(self, client: WorkerClient, role: str) -> None:
        logger.info("worker %s is now %s (was %s)", client.instance_id, role, client.role)
        client.role = role
        self.state.register(client.instance_id, role, client.endpoint.address)  # in place: keeps its ledger

    def get(self, instance_id: str) -> WorkerClient | None:
        return self.clients.get(instance_id)

    def address(self, instance_id: str) -> str:
        return self.clients[instance_id].endpoint.address

    def healthy(self, role: str) -> list[WorkerClient]:
        return [c for c in self.clients.values() if c.role == role and c.healthy]

    async def close(self) -> None:
        clients, self.clients = list(self.clients.values()), {}
        leaving, self._leaving = dict(self._leaving), {}
        for task in leaving:
            task.cancel()
        await asyncio.gather(*(c.close() for c in clients), *(c.channel.close() for c in leaving.values()),
                             return_exceptions=True)

    async def _load_loop(self, client: WorkerClient) -> None:
        attempt = 0
        while True:
            try:
                stream = client.admin.StreamLoad(pb.LoadRequest(interval_ms=self.load_interval_ms))
                async for msg in stream:
                    attempt = 0
                    client.last_report_at = time.monotonic()
                    report = LoadReport.from_proto(msg)
                    if report.role and report.role != client.role:
                        self._set_role(client, report.role)
                    self.state.apply_load_report(report, self.clock())
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                logger.debug("load stream of %s broke: %s", client.instance_id, e.code())
            await asyncio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
            attempt += 1

    async def _events_loop(self, client: WorkerClient) -> None:
        attempt = 0
        while True:
            try:
                async for msg in client.admin.StreamKVEvents(pb.KVEventsRequest()):
                    attempt = 0
                    self.state.apply_kv_events(KVEventBatch.from_proto(msg), self.clock())
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                logger.debug("KV event stream of %s broke: %s", client.instance_id, e.code())
            self.state.kv_events_lost(client.instance_id, self.clock())
            await asyncio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
            attempt += 1
