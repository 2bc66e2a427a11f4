"""The prefill side of KV transfers: stream each layer's blocks as soon as the layer is done.

:class:`KVProducer` is installed as the engine's ``kv_hooks``. Before a step it
notes, for every scheduled request with an open transfer, which whole blocks
this step completes (all remaining blocks, the last partial one included, on
the step that finishes the prompt). After each layer it hands those blocks of
that layer to the transfer's payload sink and queues the resulting control
message on stream ``layer % num_streams``, where the gRPC handlers pick it up.
So the first layers are on the wire while later layers are still computing.
GPU sinks instead get one header for the whole step before its first layer
(so the consumer posts every receive at once, off the data's critical path)
and each layer's data as it finishes.

A transfer's lifecycle: ``open`` (the Prefill RPC arrived) → chunks stream →
``prefilled`` (first token sampled; ``PrefillDone`` queued; the lease starts)
→ ``close`` (every stream drained, or the consumer vanished, or the lease
ended) → the worker releases the blocks. Engine-thread methods and event-loop
methods share the transfer table under one lock.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from common.errors import KVTransferError
from common.rpc import worker_pb2 as pb
from engine.request import TokenLogprobs
from engine.scheduler import ScheduledRequest
from kvtransfer.codec import seal_done
from kvtransfer.layout import KVLayout
from kvtransfer.transport import PayloadSink

logger = logging.getLogger(__name__)

END = None  # sentinel closing a stream queue

# A layer's blocks go out in CPU-transport messages of at most this many bytes. Every message costs the
# event loops on both sides a fixed amount of Python and gRPC work, so bigger messages stream faster; smaller
# ones put a layer on the wire sooner. `benchmarks/kv_transfer.py --transfer-only --message-mib N` on the H200
# host's CPUs (16 cores), the grpc transport over a plain gRPC stream sending messages of the same size:
# 0.54-0.61 at 1 MiB, 0.68-0.76 at 2, 0.74-0.80 at 4, 0.85-0.94 at 8 (kv_transfer_2026-11-21_h200host_sweep_*.json,
# ..._h200host_msg*.json, ..._h200host_8mib_*.json). On a 2-vCPU VM, 0.64 at 8 MiB (..._vm_8mib.json) against
# 0.57-0.61 at 4.
MAX_CHUNK_BYTES = 8 << 20


@dataclass(slots=True, eq=False)
class ProducerTransfer:
    request_id: str
    num_prompt_tokens: int
    dest_block_ids: list[int]
    first_block: int  # prompt block index of dest_block_ids[0]
    sink: PayloadSink
    queues: list[asyncio.Queue]
    next_block: int = 0  # first prompt block not yet sent
    pending_next: int = 0
    sequence: int = 0
    prefilled: bool = False
    closed: bool = False
    failed: bool = False  # a sink error on the engine thread; close() follows on the loop
    error: Exception | None = None  # why the worker ended it, for the caller's status
    opened_at: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None  # the first engine step that computes part of the prompt
    lease: asyncio.TimerHandle | None = None
    handler_tasks: set[asyncio.Task] = field(default_factory=set)
    streams_done: set[int] = field(default_factory=set)
    attached: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def num_streams(self) -> int:
        return len(self.queues)


@dataclass(slots=True)
class _Planned:
    transfer: ProducerTransfer
    src_block_ids: list[int]
    dest_block_ids: list[int]


class KVProducer:
    def __init__(self, kv_caches: list[torch.Tensor], loop: asyncio.AbstractEventLoop, *,
                 lease_s: float, max_chunk_bytes: int = MAX_CHUNK_BYTES) -> None:
        self.kv_caches = kv_caches
        self.layout = KVLayout.of_cache(kv_caches)
        self.loop = loop
        self.lease_s = lease_s
        self.max_chunk_bytes = max_chunk_bytes  # a layer's blocks go out in messages of at most this size
        self.transfers: dict[str, ProducerTransfer] = {}
        self.on_close: Callable[[str, bool], None] | None = None  # (request_id, completed), on the loop
        self._lock = threading.Lock()
        self._planned: list[_Planned] = []
        self.num_completed = 0
        self.num_failed = 0

    # --- event loop side ------------------------------------------------------------------------

    def open(self, request_id: str, num_prompt_tokens: int, dest_block_ids: list[int], num_cached_tokens: int,
             sink: PayloadSink, num_streams: int) -> ProducerTransfer:
        first = num_cached_tokens // self.layout.block_size
        transfer = ProducerTransfer(request_id, num_prompt_tokens, list(dest_block_ids), first, sink,
                                    [asyncio.Queue() for _ in range(num_streams)], next_block=first,
                                    pending_next=first)
        with self._lock:
            self.transfers[request_id] = transfer
        return transfer

    def get(self, request_id: str) -> ProducerTransfer | None:
        with self._lock:
            return self.transfers.get(request_id)

    def prefilled(self, request_id: str, first_token_id: int, logprobs: TokenLogprobs | None,
                  num_prefill_cached_tokens: int) -> None:
        """The engine sampled the first token: queue PrefillDone and end every stream; start the lease."""
        transfer = self.get(request_id)
        if transfer is None or transfer.closed:
            return
        transfer.prefilled = True
        now = time.monotonic()
        scheduled = transfer.scheduled_at if transfer.scheduled_at is not None else now  # nothing to compute
        done = pb.PrefillDone(request_id=request_id, first_token_id=first_token_id, num_chunks=transfer.sequence,
                              num_prefill_cached_tokens=num_prefill_cached_tokens,
                              queue_s=max(0.0, scheduled - transfer.opened_at), compute_s=max(0.0, now - scheduled))
        if logprobs is not None:
            done.first_logprob.CopyFrom(pb.TokenLogprob(
                token_id=logprobs.token_id, logprob=logprobs.logprob, top_ids=logprobs.top_ids,
                top_logprobs=logprobs.top_logprobs))
        transfer.queues[0].put_nowait(seal_done(done).SerializeToString())
        for q in transfer.queues:
            q.put_nowait(END)
        transfer.lease = self.loop.call_later(self.lease_s, self._expire, request_id)

    async def relay(self, transfer: ProducerTransfer, index: int) -> AsyncIterator[bytes]:
        """Yield stream ``index`` of a transfer (the body of a Prefill or StreamKV handler).

        Ends normally after PrefillDone; raises if the transfer was cut off, so
        the consumer sees an error status rather than a short stream.
        """
        task = asyncio.current_task()
        transfer.handler_tasks.add(task)
        ok = False

        def handler_ended(_: asyncio.Task) -> None:
            # gRPC cancels a handler while it awaits a write, with this generator suspended at its yield: the
            # ``finally`` below then waits for the garbage collector, and the blocks with it
            self.stream_done(transfer.request_id, index, False)

        task.add_done_callback(handler_ended)
        try:
            queue = transfer.queues[index]
            while (item := await queue.get()) is not END:
                yield item
            if transfer.error is not None:
                raise transfer.error
            if not transfer.prefilled or transfer.failed:
                raise KVTransferError("the transfer was cut off")
            ok = True
        finally:
            task.remove_done_callback(handler_ended)
            transfer.handler_tasks.discard(task)
            self.stream_done(transfer.request_id, index, ok)

    def stream_done(self, request_id: str, stream_index: int, ok: bool) -> None:
        """A gRPC handler finished draining (ok) or was cut off (not ok)."""
        transfer = self.get(request_id)
        if transfer is None or transfer.closed:
            return
        if not ok:
            self.close(request_id, completed=False)
            return
        transfer.streams_done.add(stream_index)
        if transfer.prefilled and len(transfer.streams_done) == transfer.num_streams:
            self.close(request_id, completed=True)

    def _expire(self, request_id: str) -> None:
        transfer = self.get(request_id)
        if transfer is None or transfer.closed:
            return
        logger.warning("KV lease of %s ended after %.1fs before its consumer collected it",
                       request_id, self.lease_s)
        for task in list(transfer.handler_tasks):
            task.cancel()
        self.close(request_id, completed=False)

    def close(self, request_id: str, *, completed: bool) -> None:
        with self._lock:
            transfer = self.transfers.pop(request_id, None)
        if transfer is None or transfer.closed:
            return
        transfer.closed = True
        if transfer.lease is not None:
            transfer.lease.cancel()
        for q in transfer.queues:
            q.put_nowait(END)
        try:
            transfer.sink.close(completed)
        except Exception:
            logger.exception("closing the payload sink of %s", request_id)
        if completed:
            self.num_completed += 1
        else:
            self.num_failed += 1
        if self.on_close is not None:
            self.on_close(request_id, completed)

    # --- engine thread side (KVStepHooks) -------------------------------------------------------

    def begin_step(self, scheduled: list[ScheduledRequest]) -> bool:
        bs = self.layout.block_size
        planned: list[_Planned] = []
        with self._lock:
            if not self.transfers:
                self._planned = planned
                return False
            for s in scheduled:
                t = self.transfers.get(s.request_id)
                if t is None or t.closed:
                    continue
                if t.scheduled_at is None:
                    t.scheduled_at = time.monotonic()
                end = s.start_pos + len(s.token_ids)
                send_to = -(-t.num_prompt_tokens // bs) if end >= t.num_prompt_tokens else end // bs
                if send_to <= t.next_block:
                    continue
                planned.append(_Planned(t, s.block_ids[t.next_block:send_to],
                                        t.dest_block_ids[t.next_block - t.first_block:send_to - t.first_block]))
                t.pending_next = send_to
        self._planned = planned
        for p in planned:  # GPU sinks: one header for the whole step, so the consumer posts every receive now
            if p.transfer.sink.announces_steps:
                self._send(p.transfer, 0, functools.partial(p.transfer.sink.announce, src_block_ids=p.src_block_ids),
                           p.dest_block_ids, self.layout.num_layers)
        return bool(planned)

    def layer_done(self, layer: int) -> None:
        cache = self.kv_caches[layer]
        for p in self._planned:
            t = p.transfer
            if t.closed or t.failed:
                continue
            if t.sink.announces_steps:
                self._guard(t, functools.partial(t.sink.send_layer, layer, cache))
                continue
            per_chunk = max(1, self.max_chunk_bytes // (2 * self.layout.block_bytes))  # blocks per message
            for i in range(0, len(p.src_block_ids), per_chunk):
                if t.closed or t.failed:
                    break
                emit = functools.partial(t.sink.emit, layer_cache=cache, src_block_ids=p.src_block_ids[i:i + per_chunk])
                self._send(t, layer, emit, p.dest_block_ids[i:i + per_chunk], 1)

    def _send(self, t: ProducerTransfer, layer: int, encode: Callable[[pb.KVChunkHeader], bytes],
              dest_ids: list[int], num_layers: int) -> None:
        """Queue one chunk message (its header covering ``num_layers`` layers from ``layer``) on its stream."""
        header = pb.KVChunkHeader(request_id=t.request_id, layer=layer, block_ids=dest_ids, dtype=self.layout.dtype,
                                  shape=self.layout.chunk_shape(len(dest_ids)), sequence=t.sequence,
                                  num_layers=num_layers)
        t.sequence += 1
        message = self._guard(t, lambda: encode(header))
        if message is not None:
            self.loop.call_soon_threadsafe(t.queues[layer % t.num_streams].put_nowait, message)

    def _guard(self, t: ProducerTransfer, action: Callable[[], bytes | None]) -> bytes | None:
        """Run a sink call; if it fails, the transfer fails (and is closed on the loop)."""
        try:
            return action()
        except Exception:
            logger.exception("sending KV of %s failed", t.request_id)
            t.failed = True
            self.loop.call_soon_threadsafe(functools.partial(self.close, t.request_id, completed=False))
            return None

    def end_step(self) -> None:
        for p in self._planned:
            p.transfer.next_block = p.transfer.pending_next
        self._planned = []
