"""The prefill worker's gRPC service: compute prompts and stream their KV to decode workers.

``Prefill`` validates the request against this engine's KV layout, opens a
transfer in the :class:`KVProducer` (installed as the engine's KV hooks), adds
the prompt as a PREFILL_ONLY request and relays the transfer's stream 0 (its
chunks, then ``PrefillDone``). ``StreamKV`` relays the other streams of the
same transfer. When every stream has drained, or the caller went away, or the
lease ran out, the transfer closes and the prompt's blocks are released (they
stay in the prefix cache until evicted).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from common.config import WorkerConfig
from common.errors import InvalidRequestError, PdserveError, UnavailableError
from common.metrics import KV_TRANSFERS
from common.rpc import worker_pb2 as pb
from common.rpc_convert import prompt_from_proto, sampling_from_proto
from common.sampling import SamplingParams
from engine.async_engine import AsyncEngine
from engine.request import RequestMode
from kvtransfer.layout import KVLayout
from kvtransfer.producer import KVProducer
from kvtransfer.transport import PayloadSink, open_sink
from worker.grpc_errors import grpc_errors
from worker.roles import RoleGate

logger = logging.getLogger(__name__)

SERVICE = "pdserve.v1.PrefillService"
ATTACH_WAIT_S = 5.0


def _passthrough(message: bytes | pb.KVMessage) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


class PrefillWorker:
    def __init__(self, engine: AsyncEngine, config: WorkerConfig, *, instance_id: str, model: str) -> None:
        self.engine = engine
        self.config = config
        self.instance_id = instance_id
        self.model = model
        self.gate: RoleGate | None = None  # set by the server: does this worker serve prefill now?
        self.layout = KVLayout.of_cache(engine.core.runner.kv_caches)
        self.producer = KVProducer(engine.core.runner.kv_caches, asyncio.get_running_loop(),
                                   lease_s=config.kv_lease_s)
        self.producer.on_close = self._on_close
        engine.core.kv_hooks = self.producer
        self._compute_tasks: dict[str, asyncio.Task] = {}
        self._labels = {"model": model, "role": "prefill", "instance": instance_id}

    def register(self, server: grpc.aio.Server) -> None:
        handlers = {
            "Prefill": grpc.unary_stream_rpc_method_handler(
                self.Prefill, request_deserializer=pb.PrefillRequest.FromString, response_serializer=_passthrough),
            "StreamKV": grpc.unary_stream_rpc_method_handler(
                self.StreamKV, request_deserializer=pb.StreamKVRequest.FromString,
                response_serializer=_passthrough),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    def num_in_flight(self) -> int:
        return len(self._compute_tasks) + len(self.producer.transfers)

    def num_transfers_in_flight(self) -> int:
        return len(self.producer.transfers)

    async def start(self) -> None:
        pass

    async def abort_all(self) -> int:
        """Cut off every open transfer (its consumer recomputes) and abort the prompts still computing."""
        ids = set(self._compute_tasks) | set(self.producer.transfers)
        for rid in ids:
            self._fail(rid, UnavailableError("this worker is switching roles"))
        return len(ids)

    async def close(self) -> None:
        for task in list(self._compute_tasks.values()):
            task.cancel()

    # --- RPCs -----------------------------------------------------------------------------------

    def _validate(self, request: pb.PrefillRequest) -> None:
        if self.gate is not None:
            self.gate.admit("prefill")
        if not request.request_id:
            raise InvalidRequestError("must not be empty", field="request_id")
        if KVLayout.from_proto(request.layout) != self.layout:
            raise InvalidRequestError(f"KV layout {request.layout} does not match this worker's {self.layout}",
                                      field="layout")
        bs = self.layout.block_size
        n = len(request.prompt_token_ids)
        if request.num_cached_tokens % bs or request.num_cached_tokens >= max(n, 1):
            raise InvalidRequestError("must be a multiple of the block size below the prompt length",
                                      field="num_cached_tokens")
        expected = -(-n // bs) - request.num_cached_tokens // bs
        if len(request.dest_block_ids) != expected:
            raise InvalidRequestError(f"got {len(request.dest_block_ids)} blocks, the prompt needs {expected}",
                                      field="dest_block_ids")
        if not 1 <= (request.num_streams or 1) <= 16:
            raise InvalidRequestError("must be in [1, 16]", field="num_streams")
        if self.producer.get(request.request_id) is not None:
            raise InvalidRequestError("a transfer with this id is in flight", field="request_id")

    async def _open_sink(self, request: pb.PrefillRequest) -> PayloadSink:
        return await open_sink(request.transport, request.transport_params, self.layout,
                               checksum=self.config.kv_checksum, device=self.engine.core.device,
                               nccl_message_bytes=self.config.kv_nccl_message_mib << 20)

    @grpc_errors
    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        if request.transport == pb.KV_TRANSPORT_NCCL:  # join the consumer's new channel even if refusing below,
            sink = await self._open_sink(request)  # or it waits forever
        self._validate(request)
        rid = request.request_id
        prompt = prompt_from_proto(request.prompt_token_ids)
        sampling = sampling_from_proto(request.sampling)
        self.engine.core.validate(rid, prompt, sampling)  # fail fast, before a transfer exists
        if request.transport != pb.KV_TRANSPORT_NCCL:
            sink = await self._open_sink(request)
        transfer = self.producer.open(rid, len(prompt), list(request.dest_block_ids), request.num_cached_tokens,
                                      sink, request.num_streams or 1)
        self._compute_tasks[rid] = asyncio.create_task(self._compute(rid, prompt, sampling))
        async for item in self.producer.relay(transfer, 0):
            yield item

    @grpc_errors
    async def StreamKV(self, request: pb.StreamKVRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[bytes]:
        deadline = asyncio.get_running_loop().time() + ATTACH_WAIT_S
        while (transfer := self.producer.get(request.request_id)) is None:
            if asyncio.get_running_loop().time() > deadline:
                raise InvalidRequestError("no such transfer", field="request_id")
            await asyncio.sleep(0.005)
        if not 1 <= request.stream_index < transfer.num_streams:
            raise InvalidRequestError(f"must be in [1, {transfer.num_streams})", field="stream_index")
        async for item in self.producer.relay(transfer, request.stream_index):
            yield item

    async def _compute(self, rid: str, prompt: list[int], sampling: SamplingParams) -> None:
        try:
            async for out in self.engine.generate(rid, prompt, sampling, mode=RequestMode.PREFILL_ONLY):
                if out.finished and out.finish_reason == "prefilled":
                    logprobs = out.new_logprobs[0] if out.new_logprobs else None
                    self.producer.prefilled(rid, out.new_token_ids[0], logprobs, out.num_cached_tokens)
                elif out.finished:
                    self._fail(rid, PdserveError(f"prefill ended: {out.finish_reason}"))
        except PdserveError as e:
            self._fail(rid, e)
        except asyncio.CancelledError:
            pass
        finally:
            self._compute_tasks.pop(rid, None)

    def _fail(self, rid: str, error: PdserveError) -> None:
        transfer = self.producer.get(rid)
        if transfer is not None:
            transfer.error = error
        self.producer.close(rid, completed=False)

    def _on_close(self, rid: str, completed: bool) -> None:
        transfer_task = self._compute_tasks.get(rid)
        if transfer_task is not None and not completed:
            transfer_task.cancel()  # still computing: its generate() aborts the request
        KV_TRANSFERS.labels(**self._labels, outcome="completed" if completed else "failed").inc()
        asyncio.get_running_loop().create_task(self._release(rid))

    async def _release(self, rid: str) -> None:
        try:
            await self.engine.call(lambda: self.engine.core.release(rid))
        except Exception:
            logger.exception("releasing the blocks of %s", rid)
