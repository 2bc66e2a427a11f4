"""The decode side of KV transfers: pull a prompt's KV into reserved blocks, or say why not.

:meth:`KVConsumer.fetch` calls the prefill worker's ``Prefill`` (plus
``StreamKV`` for each extra stream), and for every chunk checks that its
header is intact, that it names this request, a real layer and only blocks
reserved for it, each layer's block at most once, and that its payload is
intact; then copies it into the cache. It returns only when ``PrefillDone``
arrived, its chunk count matches and every (layer, block) was written. Any
other ending raises :class:`KVTransferError` with a short ``code`` (the
fallback counter's reason) and the caller prefills locally: nothing
unverified is ever decoded from.

Chunks are applied on a small thread pool (hashing and copying release the
GIL), so parallel streams are applied in parallel. Cancelling ``fetch`` waits
for chunks being written, so the blocks can be freed right after.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import torch

from common.errors import KVTransferError, PdserveError
from common.rpc import worker_pb2 as pb
from common.tls import TlsConfig, aio_channel
from engine.request import TokenLogprobs
from kvtransfer.codec import decode_message
from kvtransfer.layout import KVLayout
from kvtransfer.transport import PayloadSource, open_source

logger = logging.getLogger(__name__)

PREFILL_METHOD = "/pdserve.v1.PrefillService/Prefill"
APPLY_AHEAD = 3
STREAM_KV_METHOD = "/pdserve.v1.PrefillService/StreamKV"


@dataclass(slots=True)
class TransferResult:
    first_token_id: int
    logprobs: TokenLogprobs | None
    num_chunks: int
    num_bytes: int
    seconds: float
    num_prefill_cached_tokens: int
    prefill_queue_s: float = 0.0  # of ``seconds``, as the prefill worker measured them
    prefill_compute_s: float = 0.0
    device_receive_s: float | None = None  # GPU transports: first posted receive -> last one landed


@dataclass(slots=True)
class _State:
    request_id: str
    source: PayloadSource
    dest: set[int]
    received: list[set[int]]
    lock: threading.Lock = field(default_factory=threading.Lock)
    inflight: set[concurrent.futures.Future] = field(default_factory=set)
    num_chunks: int = 0
    num_bytes: int = 0
    done: pb.PrefillDone | None = None


def _rpc_code(error: grpc.aio.AioRpcError) -> str:
    code = error.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "timeout"
    if code == grpc.StatusCode.UNAVAILABLE:
        return "unavailable"
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED):
        return "refused"
    return "stream_broken"


class KVConsumer:
    def __init__(self, kv_caches: list[torch.Tensor], *, consumer_id: str, max_message_bytes: int,
                 num_threads: int = 2, tls: TlsConfig | None = None) -> None:
        self.tls = tls or TlsConfig()
        self.kv_caches = kv_caches
        self.layout = KVLayout.of_cache(kv_caches)
        self.consumer_id = consumer_id
        self._options = [("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.max_send_message_length", max_message_bytes)]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._executor = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="kv-apply")

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = aio_channel(address, self.tls, self._options)
        return channel

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._executor.shutdown(wait=True)

    async def fetch(self, *, address: str, transport: int, num_streams: int, request_id: str,
                    prompt_token_ids: list[int], sampling: pb.SamplingParams, block_ids: list[int],
                    num_cached_tokens: int, timeout_s: float) -> TransferResult:
        start = time.monotonic()
        bs = self.layout.block_size
        first, last = num_cached_tokens // bs, -(-len(prompt_token_ids) // bs)
        dest = block_ids[first:last]
        source = await open_source(transport, self.layout, len(dest), peer=address,
                                   device=self.kv_caches[0].device)
        state = _State(request_id, source, set(dest), [set() for _ in range(self.layout.num_layers)])
        request = pb.PrefillRequest(
            request_id=request_id, prompt_token_ids=prompt_token_ids, sampling=sampling, dest_block_ids=dest,
            num_cached_tokens=num_cached_tokens, layout=self.layout.to_proto(), transport=transport,
            num_streams=num_streams, consumer_id=self.consumer_id, transport_params=source.transport_params())
        channel = self._channel(address)
        prefill = channel.unary_stream(PREFILL_METHOD, request_serializer=pb.PrefillRequest.SerializeToString,
                                       response_deserializer=bytes)
        stream_kv = channel.unary_stream(STREAM_KV_METHOD, request_serializer=pb.StreamKVRequest.SerializeToString,
                                         response_deserializer=bytes)
        calls = [prefill(request, timeout=timeout_s)]
        calls += [stream_kv(pb.StreamKVRequest(request_id=request_id, stream_index=i), timeout=timeout_s)
                  for i in range(1, num_streams)]
        tasks = [asyncio.create_task(self._drain(call, state)) for call in calls]
        receive_s = None
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: it can swallow a racing cancellation
                await asyncio.gather(*tasks)
                if state.done is not None:  # GPU transports: the last chunks may still be landing
                    receive_s = await asyncio.to_thread(source.finish,
                                                        max(0.0, timeout_s - (time.monotonic() - start)))
        except TimeoutError as e:
            raise KVTransferError(f"transfer of {request_id} timed out after {timeout_s}s", code="timeout") from e
        except grpc.aio.AioRpcError as e:
            raise KVTransferError(f"prefill stream failed: {e.code().name} {e.details()}", code=_rpc_code(e)) from e
        finally:
            for call in calls:
                call.cancel()
            for task in tasks:
                task.cancel()
            # chunks being written finish before anyone may free the blocks (a short, bounded wait)
            concurrent.futures.wait(list(state.inflight))
            source.close()
        done = state.done
        if done is None:
            raise KVTransferError(f"prefill stream of {request_id} ended without PrefillDone", code="stream_broken")
        if done.num_chunks != state.num_chunks:
            raise KVTransferError(f"got {state.num_chunks} of {done.num_chunks} chunks", code="incomplete")
        if any(r != state.dest for r in state.received):
            raise KVTransferError("some blocks of some layers never arrived", code="incomplete")
        logprobs = None
        if done.HasField("first_logprob"):
            lp = done.first_logprob
            logprobs = TokenLogprobs(lp.token_id, lp.logprob, list(lp.top_ids), list(lp.top_logprobs))
        return TransferResult(done.first_token_id, logprobs, state.num_chunks, state.num_bytes,
                              time.monotonic() - start, done.num_prefill_cached_tokens, done.queue_s, done.compute_s,
                              receive_s)

    async def _drain(self, call: grpc.aio.UnaryStreamCall, state: _State) -> None:
        # Up to APPLY_AHEAD chunks are applied while the next ones are read: awaiting each copy before
        # reading on would leave the connection idle for the copy's duration, every chunk.
        pending: deque[asyncio.Future] = deque()
        async for raw in call:
            future = self._executor.submit(self._apply, raw, state)
            state.inflight.add(future)
            future.add_done_callback(state.inflight.discard)
            pending.append(asyncio.wrap_future(future))
            if len(pending) >= APPLY_AHEAD:
                await pending.popleft()
        while pending:
            await pending.popleft()

    def _apply(self, raw: bytes, state: _State) -> None:
        try:
            message = decode_message(raw, verify_payload=False)  # the source checks it before writing it
        except PdserveError:
            raise
        except Exception as e:  # a malformed protobuf
            raise KVTransferError(f"undecodable KV message: {e}", code="checksum") from e
        if isinstance(message, pb.PrefillDone):
            if message.request_id != state.request_id:
                raise KVTransferError("PrefillDone names another request", code="checksum")
            state.done = message
            return
        header, inline = message
        layout = self.layout
        if header.request_id != state.request_id:
            raise KVTransferError("chunk names another request", code="checksum")
        layers = range(header.layer, header.layer + max(1, header.num_layers))
        if layers.stop > layout.num_layers or header.dtype != layout.dtype:
            raise KVTransferError(f"chunk for layers {layers.start}..{layers.stop - 1} dtype {header.dtype} "
                                  "does not fit", code="checksum")
        ids = list(header.block_ids)
        if list(header.shape) != layout.chunk_shape(len(ids)):
            raise KVTransferError(f"chunk shape {list(header.shape)} does not fit", code="checksum")
        blocks = set(ids)  # set operations: a GPU step's header names every block of every layer at once
        if len(blocks) != len(ids) or not blocks <= state.dest:
            raise KVTransferError(f"chunk names blocks {sorted(blocks - state.dest)} not reserved, or one twice",
                                  code="checksum")
        with state.lock:
            for layer in layers:
                if not blocks.isdisjoint(state.received[layer]):
                    raise KVTransferError(f"chunk writes blocks {sorted(blocks & state.received[layer])} of layer "
                                          f"{layer} again", code="checksum")
            for layer in layers:
                state.received[layer].update(blocks)
        nbytes = state.source.apply(header, inline, self.kv_caches, layout)
        with state.lock:
            state.num_chunks += 1
            state.num_bytes += nbytes
