"""The ``nccl`` transport: KV blocks GPU to GPU over two-rank NCCL communicators.

A *channel* is a two-rank communicator (producer rank 0, consumer rank 1)
plus the CUDA stream its transfers run on. The consumer keeps a small pool of
channels per prefill worker and gives each transfer one exclusively, because
NCCL matches point-to-point operations by order, not by tag: two transfers on
one channel could pair one's send with the other's receive. A new channel's
unique id travels in ``PrefillRequest.transport_params`` (``N`` + key + id);
a pooled one is named by its key (``U`` + key), and a producer that does not
know the key refuses the transfer (the consumer recomputes and drops the
channel).

On the producer, each finished layer's blocks are gathered into a staging
buffer on the compute stream and sent on the channel's stream, so the send
overlaps the next layers' compute; the chunk header (with no payload) goes
down the Prefill stream as usual. On the consumer, each header posts the
matching receive on the channel's stream, in header order, and scatters the
staging buffer into the reserved blocks. ``finish`` waits, with a deadline,
for the last scatter; a transfer that fails or times out aborts its channel.
GPU payloads carry no checksum (headers do).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import threading
import time
from collections import defaultdict

import torch

from common.errors import InvalidRequestError, KVTransferError
from common.rpc import worker_pb2 as pb
from kvtransfer.codec import encode_header
from kvtransfer.layout import KVLayout, contiguous_runs

logger = logging.getLogger(__name__)

INIT_TIMEOUT_S = 60.0
MAX_CHANNELS_PER_PEER = 4
KEY_BYTES = 16


def _uid_bytes(uid: bytes | tuple[int, ...]) -> bytes:
    """The 128-byte NCCL unique id (cupy returns bytes in recent versions, a tuple of ints in older ones)."""
    return uid if isinstance(uid, bytes) else bytes(b % 256 for b in uid)


def _communicator(nccl, uid: bytes, rank: int):
    try:
        return nccl.NcclCommunicator(2, uid, rank)
    except TypeError:  # an older cupy wants the id as a tuple of signed chars
        return nccl.NcclCommunicator(2, tuple(b - 256 if b > 127 else b for b in uid), rank)


class Channel:
    """A two-rank NCCL communicator with this process as ``rank``; construction blocks until the peer joins."""

    def __init__(self, key: str, uid: bytes, rank: int, device: torch.device) -> None:
        import cupy
        from cupy.cuda import nccl

        self._nccl = nccl
        self._cupy_device = cupy.cuda.Device(device.index if device.index is not None else 0)
        with self._cupy_device:
            self.comm = _communicator(nccl, uid, rank)
        self.key, self.rank, self.device = key, rank, device
        self.stream = torch.cuda.Stream(device)
        self.broken = False
        # NCCL connects a peer pair lazily, at its first send/recv, and that call blocks the host until the peer
        # makes its own. Do it here, where both sides are waiting anyway, so a transfer's sends never block
        # before their headers have told the consumer to receive.
        probe = torch.zeros(1, dtype=torch.int32, device=device)
        with torch.cuda.stream(self.stream):
            (self.send if rank == 0 else self.recv)(probe)
        self.stream.synchronize()

    def send(self, tensor: torch.Tensor) -> None:
        with self._cupy_device:
            self.comm.send(tensor.data_ptr(), tensor.numel() * tensor.element_size(), self._nccl.NCCL_UINT8,
                           1 - self.rank, self.stream.cuda_stream)

    def recv(self, tensor: torch.Tensor) -> None:
        with self._cupy_device:
            self.comm.recv(tensor.data_ptr(), tensor.numel() * tensor.element_size(), self._nccl.NCCL_UINT8,
                           1 - self.rank, self.stream.cuda_stream)

    def abort(self) -> None:
        self.broken = True
        try:
            with self._cupy_device:
                self.comm.abort()
        except Exception:  # already torn down
            logger.debug("aborting NCCL channel %s failed", self.key, exc_info=True)


def _device_ids(ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64).pin_memory().to(device, non_blocking=True)


# --- producer (prefill worker) -----------------------------------------------------------------

_producer_channels: dict[str, Channel] = {}


class NcclSink:
    max_chunk_bytes = 1 << 40  # no payload travels in the message: one chunk per layer and step

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._ids: dict[tuple[int, ...], torch.Tensor] = {}  # a step sends the same blocks of every layer
        self._pending: list[tuple[torch.Tensor, torch.cuda.Event, list[tuple[int, int]]]] = []

    def emit(self, header: pb.KVChunkHeader, layer_cache: torch.Tensor, src_block_ids: list[int]) -> bytes:
        key = tuple(src_block_ids)
        ids = self._ids.get(key)
        if ids is None:
            ids = self._ids[key] = _device_ids(src_block_ids, layer_cache.device)
        # gather on the compute stream, right after the layer: the blocks may be reused once the transfer
        # closes, the staging copy lives until the sends are done
        staging = layer_cache.index_select(1, ids)
        ready = torch.cuda.Event()
        ready.record()
        self._pending.append((staging, ready, contiguous_runs(list(header.block_ids))))
        header.payload_bytes = staging.numel() * staging.element_size()
        return encode_header(header)

    def flush(self) -> None:
        """Issue the sends of the chunks emitted so far (the producer calls it once their headers are queued)."""
        stream = self.channel.stream
        for staging, ready, runs in self._pending:
            stream.wait_event(ready)
            offset = 0
            with torch.cuda.stream(stream):  # one send per contiguous run of the consumer's blocks, K then V
                for start, end in runs:
                    n = end - start
                    self.channel.send(staging[0, offset:offset + n])
                    self.channel.send(staging[1, offset:offset + n])
                    offset += n
            staging.record_stream(stream)
        self._pending.clear()

    def close(self, completed: bool = True) -> None:
        if not completed:  # the consumer may be gone mid-transfer: this channel's order is lost
            self.channel.abort()
            _producer_channels.pop(self.channel.key, None)


async def open_nccl_sink(params: bytes, device: torch.device) -> NcclSink:
    if device.type != "cuda":
        raise InvalidRequestError("the nccl transport needs a CUDA device", field="transport")
    kind, key = params[:1], params[1:1 + KEY_BYTES].decode(errors="replace")
    if kind == b"U":
        channel = _producer_channels.get(key)
        if channel is None or channel.broken:
            raise InvalidRequestError(f"unknown NCCL channel {key!r}", field="transport_params")
        return NcclSink(channel)
    if kind != b"N" or len(params) != 1 + KEY_BYTES + 128:
        raise InvalidRequestError("malformed NCCL transport parameters", field="transport_params")
    uid = params[1 + KEY_BYTES:]
    try:
        async with asyncio.timeout(INIT_TIMEOUT_S):
            channel = await asyncio.to_thread(Channel, key, uid, 0, device)
    except TimeoutError as e:
        raise InvalidRequestError("the consumer never joined the NCCL channel", field="transport_params") from e
    _producer_channels[key] = channel
    return NcclSink(channel)


# --- consumer (decode worker) ------------------------------------------------------------------

_pool_lock = threading.Lock()
_free: dict[str, list[Channel]] = defaultdict(list)
_count: dict[str, int] = defaultdict(int)
_init_pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="nccl-init")


class NcclSource:
    """One transfer's receiving end; applies chunks strictly in header order."""

    def __init__(self, peer: str, device: torch.device) -> None:
        self.peer = peer
        self.device = device
        self._ok = False
        self._cond = threading.Condition()
        self._next_sequence = 0
        self._last: torch.cuda.Event | None = None
        with _pool_lock:
            free = [c for c in _free[peer] if not c.broken]
            _free[peer] = free
            channel = free.pop() if free else None
            if channel is None and _count[peer] >= MAX_CHANNELS_PER_PEER:
                raise KVTransferError(f"all {MAX_CHANNELS_PER_PEER} NCCL channels to {peer} are busy",
                                      code="refused")
            if channel is None:
                _count[peer] += 1
        if channel is not None:
            self._channel: concurrent.futures.Future = concurrent.futures.Future()
            self._channel.set_result(channel)
            self._params = b"U" + channel.key.encode()
        else:
            from cupy.cuda import nccl

            uid = _uid_bytes(nccl.get_unique_id())
            key = secrets.token_hex(KEY_BYTES // 2)
            self._params = b"N" + key.encode() + uid
            self._channel = _init_pool.submit(Channel, key, uid, 1, device)

    def transport_params(self) -> bytes:
        return self._params

    def apply(self, header: pb.KVChunkHeader, inline: memoryview, kv_caches: list[torch.Tensor], layout: KVLayout
              ) -> int:
        channel = self._channel.result(timeout=INIT_TIMEOUT_S)
        ids = list(header.block_ids)
        nbytes = 2 * len(ids) * layout.block_bytes
        if header.payload_bytes != nbytes:
            raise KVTransferError(f"header says {header.payload_bytes} bytes, expected {nbytes}", code="checksum")
        with self._cond:  # receives must be posted in the order the producer sent
            if not self._cond.wait_for(lambda: self._next_sequence == header.sequence, timeout=INIT_TIMEOUT_S):
                raise KVTransferError(f"chunk {self._next_sequence} never came before {header.sequence}",
                                      code="incomplete")
            with torch.cuda.stream(channel.stream):  # straight into the reserved blocks: no staging
                for start, end in contiguous_runs(ids):
                    channel.recv(kv_caches[header.layer][0, start:end])
                    channel.recv(kv_caches[header.layer][1, start:end])
                self._last = torch.cuda.Event()
                self._last.record(channel.stream)
            self._next_sequence += 1
            self._cond.notify_all()
        return nbytes

    def finish(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._last is not None and not self._last.query():
            if time.monotonic() > deadline:
                raise KVTransferError("the NCCL receives did not complete in time", code="timeout")
            time.sleep(0.0005)
        self._ok = True

    def close(self) -> None:
        if not self._channel.done():  # the producer never joined; the init thread stays blocked in NCCL
            with _pool_lock:
                _count[self.peer] -= 1
            return
        try:
            channel = self._channel.result()
        except Exception:  # noqa: BLE001 (the init failed: nothing to return to the pool)
            with _pool_lock:
                _count[self.peer] -= 1
            return
        if self._ok:
            with _pool_lock:
                _free[self.peer].append(channel)
            return
        channel.abort()
        with _pool_lock:
            _count[self.peer] -= 1


async def open_nccl_source(peer: str, device: torch.device) -> NcclSource:
    if device.type != "cuda":
        raise InvalidRequestError("the nccl transport needs a CUDA device", field="transport")
    return NcclSource(peer, device)
