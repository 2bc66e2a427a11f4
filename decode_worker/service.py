"""The decode worker's gRPC service: generate, pulling the prompt's KV from a prefill worker.

``Generate`` decides where the prompt is computed. With no prefill target, or
a prompt that is short or mostly cached here, it is computed locally by
design. Otherwise the request enters the engine as REMOTE_KV: the engine
reserves its blocks, and the reservation starts a :class:`KVConsumer` fetch
from the named prefill worker, which must be one of this worker's configured
peers (an address from a request is never dialled otherwise: an unknown one
is prefilled here, with fallback reason ``unknown_peer``). A fetch that
fails in any way (refused, unreachable, timed out, broken, corrupt,
incomplete) is counted and the request is prefilled here instead; the client
sees the same tokens either way.

Leaving a stream early (client gone, ``Abort``) first stops the transfer,
waiting for chunks being written, then aborts the request, which frees its
blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from common import metrics
from common.config import WorkerConfig
from common.errors import (
    InvalidRequestError,
    KVTransferError,
    PdserveError,
    UnavailableError,
)
from common.metrics import (
    KV_TRANSFER_BYTES,
    KV_TRANSFER_SECONDS,
    KV_TRANSFERS,
    LOCAL_PREFILL_FALLBACKS,
    LOCAL_PREFILLS,
)
from common.rpc import worker_pb2 as pb
from common.rpc import worker_pb2_grpc as pb_grpc
from common.rpc_convert import prompt_from_proto, sampling_from_proto
from common.tls import TlsConfig
from engine.async_engine import AsyncEngine
from engine.output import RequestOutput
from engine.request import RequestMode
from engine.scheduler import KVReservation
from kvtransfer.consumer import KVConsumer
from worker.grpc_errors import grpc_errors
from worker.roles import RoleGate

logger = logging.getLogger(__name__)

TRANSPORTS = {"grpc": pb.KV_TRANSPORT_GRPC, "local": pb.KV_TRANSPORT_LOCAL, "nccl": pb.KV_TRANSPORT_NCCL}
SUPPORTED_TRANSPORTS = {pb.KV_TRANSPORT_GRPC, pb.KV_TRANSPORT_LOCAL}


@dataclass(slots=True)
class _RemotePlan:
    address: str
    transport: int
    num_streams: int
    prompt: list[int]
    sampling: pb.SamplingParams
    info: pb.PrefillInfo
    task: asyncio.Task | None = None


def to_response(out: RequestOutput) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=out.request_id, token_ids=out.new_token_ids, text=out.delta_text,
                              finished=out.finished, finish_reason=out.finish_reason or "")
    for lp in out.new_logprobs:
        msg.logprobs.append(pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top_ids=lp.top_ids,
                                            top_logprobs=lp.top_logprobs))
    if isinstance(out.stop_reason, str):
        msg.stop_string = out.stop_reason
    elif isinstance(out.stop_reason, int):
        msg.stop_token_id = out.stop_reason
    return msg


class DecodeWorker(pb_grpc.DecodeServiceServicer):
    def __init__(self, engine: AsyncEngine, config: WorkerConfig, *, instance_id: str, model: str,
                 tls: TlsConfig | None = None) -> None:
        self.engine = engine
        self.config = config
        self.instance_id = instance_id
        self.model = model
        self.gate: RoleGate | None = None  # set by the server: does this worker serve decode now?
        self.peers = frozenset(config.prefill_peers)
        self.registry = None  # prefill workers registered in Redis are peers too
        if config.redis_url:
            from router.discovery import RedisDiscovery

            self.registry = RedisDiscovery(config.redis_url)
        self.consumer = KVConsumer(engine.core.runner.kv_caches, consumer_id=instance_id,
                                   max_message_bytes=config.max_message_mib * 2**20, tls=tls)
        self._remote: dict[str, _RemotePlan] = {}
        self._num_streams = 0
        self._labels = {"model": model, "role": "decode", "instance": instance_id}
        metrics.init_decode_series(model, instance_id)
        engine.on_reservation = self._on_reservation

    def register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_DecodeServiceServicer_to_server(self, server)

    def num_in_flight(self) -> int:
        return self._num_streams

    def num_transfers_in_flight(self) -> int:
        return sum(1 for p in self._remote.values() if p.task is not None and not p.task.done())

    async def start(self) -> None:
        if self.registry is not None:
            await self.registry.start()

    async def close(self) -> None:
        if self.registry is not None:
            await self.registry.stop()
        await self.consumer.close()

    async def abort_all(self) -> int:
        """Abort every request in flight; their streams end with UNAVAILABLE and routers migrate them."""
        ids = await self.engine.call(lambda: list(self.engine.core.scheduler.requests))
        for rid in ids:
            await self._stop_transfer(rid)
            await self.engine.abort(rid)
        return len(ids)

    def is_peer(self, address: str) -> bool:
        if address in self.peers:
            return True
        return self.registry is not None and any(
            e.role == "prefill" and e.address == address for e in self.registry.endpoints())

    # --- Generate -------------------------------------------------------------------------------

    async def _plan(self, request: pb.GenerateRequest, prompt: list[int]) -> tuple[RequestMode, pb.PrefillInfo]:
        info = pb.PrefillInfo(num_prompt_tokens=len(prompt))
        target = request.prefill if request.HasField("prefill") else None
        if target is None or not target.address:
            LOCAL_PREFILLS.labels(self.model, self.instance_id, "no_target").inc()
            info.mode = pb.PrefillInfo.MODE_LOCAL
            return RequestMode.COLOCATED, info
        if not self.is_peer(target.address):
            # never dialled (the address comes from a request); the prompt is computed here instead, so a
            # router whose view of the pools is ahead of this worker's (a fresh role flip) costs no request
            logger.warning("%r is not a known prefill worker; prefilling %s locally", target.address,
                           request.request_id)
            LOCAL_PREFILL_FALLBACKS.labels(self.model, self.instance_id, "unknown_peer").inc()
            info.mode = pb.PrefillInfo.MODE_FALLBACK
            info.fallback_reason = "unknown_peer"
            return RequestMode.COLOCATED, info
        transport = target.transport or TRANSPORTS[self.config.kv_transport]
        supported = SUPPORTED_TRANSPORTS | ({pb.KV_TRANSPORT_NCCL} if self.engine.core.device.type == "cuda" else set())
        if transport not in supported:
            raise InvalidRequestError(f"KV transport {transport} is not available", field="prefill.transport")
        if not 0 <= target.num_streams <= 16:
            raise InvalidRequestError("must be in [0, 16]", field="prefill.num_streams")
        cached = await self.engine.call(lambda: self.engine.core.peek_cached_tokens(prompt))
        info.num_cached_tokens = cached
        reason = None
        if len(prompt) - cached <= self.config.local_prefill_max_tokens:
            reason = "short"
        elif cached >= self.config.local_prefill_min_cached_ratio * len(prompt):
            reason = "cached"
        if reason is not None:
            LOCAL_PREFILLS.labels(self.model, self.instance_id, reason).inc()
            info.mode = pb.PrefillInfo.MODE_LOCAL
            return RequestMode.COLOCATED, info
        info.mode = pb.PrefillInfo.MODE_REMOTE
        info.prefill_worker = target.address
        self._remote[request.request_id] = _RemotePlan(
            target.address, transport, target.num_streams or self.config.kv_num_streams, prompt,
            request.sampling, info)
        return RequestMode.REMOTE_KV, info

    @grpc_errors
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        if self.gate is not None:
            self.gate.admit("decode")
        rid = request.request_id
        if not rid:
            raise InvalidRequestError("must not be empty", field="request_id")
        prompt = prompt_from_proto(request.prompt_token_ids)
        sampling = sampling_from_proto(request.sampling)
        self._num_streams += 1
        try:
            mode, info = await self._plan(request, prompt)
            stream = self.engine.generate(rid, prompt, sampling, mode=mode,
                                          predicted_output_tokens=request.predicted_output_tokens)
            start = time.monotonic()
            first_at = None
            try:
                async for out in stream:
                    if out.finish_reason == "abort":  # aborted here, not by the client: let the router migrate
                        raise UnavailableError("the request was aborted by the worker")
                    msg = to_response(out)
                    if first_at is None:
                        first_at = time.monotonic()
                        metrics.REQUEST_PHASE.labels(self.model, self.instance_id, "prefill").observe(first_at - start)
                        msg.prefill_info.CopyFrom(info)
                    if out.finished:
                        metrics.REQUEST_PHASE.labels(self.model, self.instance_id, "decode").observe(
                            time.monotonic() - first_at)
                    yield msg
            finally:
                await self._stop_transfer(rid)
                await stream.aclose()
        finally:
            self._remote.pop(rid, None)
            self._num_streams -= 1

    @grpc_errors
    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        await self._stop_transfer(request.request_id)
        return pb.AbortResponse(found=await self.engine.abort(request.request_id))

    # --- KV transfers ---------------------------------------------------------------------------

    def _on_reservation(self, reservation: KVReservation) -> None:
        plan = self._remote.get(reservation.request_id)
        if plan is None:  # its stream is gone; the abort that follows frees the blocks
            return
        plan.task = asyncio.create_task(self._transfer(reservation, plan))

    async def _stop_transfer(self, rid: str) -> None:
        plan = self._remote.get(rid)
        if plan is not None and plan.task is not None and not plan.task.done():
            plan.task.cancel()
            await asyncio.gather(plan.task, return_exceptions=True)

    async def _transfer(self, reservation: KVReservation, plan: _RemotePlan) -> None:
        rid = reservation.request_id
        try:
            result = await self.consumer.fetch(
                address=plan.address, transport=plan.transport, num_streams=plan.num_streams, request_id=rid,
                prompt_token_ids=plan.prompt, sampling=plan.sampling, block_ids=reservation.block_ids,
                num_cached_tokens=reservation.num_cached_tokens, timeout_s=self.config.kv_transfer_timeout_s)
        except asyncio.CancelledError:
            raise
        except KVTransferError as e:
            reason = e.code or "stream_broken"
            error: Exception = e
        except PdserveError as e:
            reason, error = "refused", e
        except Exception as e:
            logger.exception("KV transfer of %s failed unexpectedly", rid)
            reason, error = "stream_broken", e
        else:
            plan.info.kv_transfer_s = result.seconds
            plan.info.prefill_queue_s = result.prefill_queue_s
            plan.info.prefill_compute_s = result.prefill_compute_s
            plan.info.num_cached_tokens = reservation.num_cached_tokens
            KV_TRANSFERS.labels(**self._labels, outcome="completed").inc()
            KV_TRANSFER_BYTES.labels(**self._labels).inc(result.num_bytes)
            KV_TRANSFER_SECONDS.labels(**self._labels).observe(result.seconds)
            metrics.REQUEST_PHASE.labels(self.model, self.instance_id, "kv_transfer").observe(result.seconds)
            await self.engine.finish_remote_kv(rid, result.first_token_id, result.logprobs)
            return
        logger.warning("remote prefill of %s failed (%s: %s); prefilling locally", rid, reason, error)
        KV_TRANSFERS.labels(**self._labels, outcome="failed").inc()
        LOCAL_PREFILL_FALLBACKS.labels(self.model, self.instance_id, reason).inc()
        plan.info.mode = pb.PrefillInfo.MODE_FALLBACK
        plan.info.fallback_reason = reason
        await self.engine.fail_remote_kv(rid)
