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

Control never waits on data, and data never waits on control per layer. At
the start of each engine step the producer announces, in one header down the
Prefill stream, the blocks the step will send of every layer and how many
layers each message carries; the consumer posts all of that step's receives
on the channel's stream at once. When a message's last layer is done, the
producer gathers the message's blocks of all its layers into a staging buffer
on the compute stream (kvtransfer/block_copy.py, one launch) and sends it on
the channel's stream, so sends overlap the next layers' compute. Messages of
several layers are used because NVLink point-to-point moves small messages
slower (on 2 H200s, benchmarks/gpu_kv_transfer.py: torch.distributed sends
512 MiB at 356 GB/s as one message, about 270 as 16 MiB ones, 329 as 64 MiB
ones). The consumer receives each message into a ring of staging buffers and
a side stream scatters it into the reserved blocks while the next message
arrives. Both ends are host-bound if a message's Python work (posting the
receive, launching the copy, the events) outlasts its 0.2 ms on the wire,
which is why the copies take one launch per message: the data phase of 512
MiB in 64 MiB messages went from 235 GB/s to 347, 0.98 of the one-message
baseline (benchmarks/results/gpu_kv_transfer_2xh200_2026-11-21_block_copy.json).
``finish`` waits, with a deadline, for the last scatter; a
transfer that fails or times out aborts its channel. GPU payloads carry no
checksum (headers do).

The prefill worker's ``kv_nccl_message_mib`` (default 64) sets the message
size a step aims for: whole layers, at least one, at most the step's all.
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
from kvtransfer.block_copy import gather_blocks, scatter_blocks
from kvtransfer.codec import encode_header
from kvtransfer.layout import KVLayout

logger = logging.getLogger(__name__)

INIT_TIMEOUT_S = 60.0
MAX_CHANNELS_PER_PEER = 4
STAGING_BUFFERS = 3  # consumer: messages being received or scattered at once, per step ...
STAGING_BYTES = 256 << 20  # ... as long as their buffers fit in this (one always does)
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
        self.scatter_stream = torch.cuda.Stream(device)  # the consumer's copies out of its staging buffers
        self.broken = False
        # NCCL connects a peer pair lazily, at its first send/recv, and that call blocks the host until the peer
        # makes its own. Do it here, where both sides are waiting anyway, so a transfer's sends never block
        # before their headers have told the consumer to receive.
        probe = torch.zeros(1, dtype=torch.int32, device=device)
        with torch.cuda.stream(self.stream):
            (self.send if rank == 0 else self.recv)(probe)
        self.stream.synchronize()

    def send(self, tensor: torch.Tensor) -> None:
        """Enqueue a send of ``tensor`` (contiguous) on this channel's stream."""
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


def layers_per_message(message_bytes: int, layer_bytes: int, num_layers: int) -> int:
    """Whole layers in a message of about ``message_bytes``: at least one, at most the step's all."""
    return min(num_layers, max(1, -(-message_bytes // layer_bytes)))


def message_groups(first: int, num_layers: int, per_message: int) -> list[range]:
    """The layers of each message of a step: ``per_message`` at a time (the last may hold fewer)."""
    end = first + num_layers
    return [range(i, min(i + per_message, end)) for i in range(first, end, per_message)]


class NcclSink:
    announces_steps = True

    def __init__(self, channel: Channel, layout: KVLayout, message_bytes: int) -> None:
        self.channel = channel
        self.layout = layout
        self.message_bytes = message_bytes
        self._ids: torch.Tensor | None = None  # the announced step's source blocks, on the device
        self._groups: list[range] = []  # the step's layers, message by message
        self._caches: list[torch.Tensor] = []  # the current message's layers done so far (reset at its first)

    def announce(self, header: pb.KVChunkHeader, src_block_ids: list[int]) -> bytes:
        num_layers = max(1, header.num_layers)
        layer_bytes = 2 * len(src_block_ids) * self.layout.block_bytes
        per_message = layers_per_message(self.message_bytes, layer_bytes, num_layers)
        self._groups = message_groups(header.layer, num_layers, per_message)
        self._ids = _device_ids(src_block_ids, self.channel.device)
        header.layers_per_message = per_message
        header.payload_bytes = layer_bytes * num_layers
        return encode_header(header)

    def send_layer(self, layer: int, layer_cache: torch.Tensor) -> None:
        group = next(g for g in self._groups if layer in g)
        if layer == group.start:
            self._caches = []
        self._caches.append(layer_cache)
        if layer != group.stop - 1:
            return
        # the message's layers are done: gather them on the compute stream, in one launch (their blocks stay
        # as they are until the step ends; the staging copy lives until its send is done)
        buffer = torch.empty((len(group), *self.layout.chunk_shape(len(self._ids))), dtype=layer_cache.dtype,
                             device=layer_cache.device)
        gather_blocks(self._caches, self._ids, buffer)
        ready = torch.cuda.Event()
        ready.record()
        stream = self.channel.stream
        stream.wait_event(ready)
        self.channel.send(buffer)
        buffer.record_stream(stream)

    def close(self, completed: bool = True) -> None:
        if not completed:  # the consumer may be gone mid-transfer: this channel's order is lost
            self.channel.abort()
            _producer_channels.pop(self.channel.key, None)


async def open_nccl_sink(params: bytes, device: torch.device, layout: KVLayout, message_bytes: int) -> NcclSink:
    if device.type != "cuda":
        raise InvalidRequestError("the nccl transport needs a CUDA device", field="transport")
    kind, key = params[:1], params[1:1 + KEY_BYTES].decode(errors="replace")
    if kind == b"U":
        channel = _producer_channels.get(key)
        if channel is None or channel.broken:
            raise InvalidRequestError(f"unknown NCCL channel {key!r}", field="transport_params")
        return NcclSink(channel, layout, message_bytes)
    if kind != b"N" or len(params) != 1 + KEY_BYTES + 128:
        raise InvalidRequestError("malformed NCCL transport parameters", field="transport_params")
    uid = params[1 + KEY_BYTES:]
    try:
        async with asyncio.timeout(INIT_TIMEOUT_S):
            channel = await asyncio.to_thread(Channel, key, uid, 0, device)
    except TimeoutError as e:
        raise InvalidRequestError("the consumer never joined the NCCL channel", field="transport_params") from e
    _producer_channels[key] = channel
    return NcclSink(channel, layout, message_bytes)


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
        self._first: torch.cuda.Event | None = None  # timing events around every receive of the transfer
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
        layers = range(header.layer, header.layer + max(1, header.num_layers))
        nbytes = 2 * len(ids) * layout.block_bytes * len(layers)
        if header.payload_bytes != nbytes:
            raise KVTransferError(f"header says {header.payload_bytes} bytes, expected {nbytes}", code="checksum")
        per_message = header.layers_per_message
        if not 1 <= per_message <= len(layers):
            raise KVTransferError(f"{per_message} layers per message of {len(layers)}", code="checksum")
        shape = (per_message, *layout.chunk_shape(len(ids)))
        with self._cond:  # receives must be posted in the order the producer sent
            if not self._cond.wait_for(lambda: self._next_sequence == header.sequence, timeout=INIT_TIMEOUT_S):
                raise KVTransferError(f"chunk {self._next_sequence} never came before {header.sequence}",
                                      code="incomplete")
            recv_stream, scatter_stream = channel.stream, channel.scatter_stream
            with torch.cuda.stream(scatter_stream):  # copied in the order of the scatters that read it
                device_ids = _device_ids(ids, channel.device)
            with torch.cuda.stream(recv_stream):
                if self._first is None:
                    self._first = torch.cuda.Event(enable_timing=True)
                    self._first.record(recv_stream)
                ring: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
                ring_size = max(1, min(STAGING_BUFFERS, STAGING_BYTES // (nbytes // len(layers) * per_message)))
                for index, group in enumerate(message_groups(layers.start, len(layers), per_message)):
                    if len(ring) < ring_size:
                        buffer = torch.empty(shape, dtype=layout.torch_dtype, device=channel.device)
                        buffer.record_stream(scatter_stream)
                        ring.append((buffer, None))
                    buffer, scattered = ring[index % ring_size]
                    if scattered is not None:  # the buffer's previous message is in the cache
                        recv_stream.wait_event(scattered)
                    message = buffer[:len(group)]
                    channel.recv(message)
                    scatter_stream.wait_stream(recv_stream)
                    with torch.cuda.stream(scatter_stream):
                        scatter_blocks(message, [kv_caches[layer] for layer in group], device_ids)
                        scattered = torch.cuda.Event(enable_timing=True)
                        scattered.record(scatter_stream)
                    ring[index % ring_size] = (buffer, scattered)
                self._last = scattered
            self._next_sequence += 1
            self._cond.notify_all()
        return nbytes

    def finish(self, timeout_s: float) -> float | None:
        deadline = time.monotonic() + timeout_s
        while self._last is not None and not self._last.query():
            if time.monotonic() > deadline:
                raise KVTransferError("the NCCL receives did not complete in time", code="timeout")
            time.sleep(0.0001)
        self._ok = True
        if self._first is None or self._last is None:
            return None
        return self._first.elapsed_time(self._last) / 1e3

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
        # receives and scatters still queued write into blocks the caller frees next: the engine's stream (the
        # device's default one) waits for them, so a later owner's writes land after (they end quickly once
        # the communicator is aborted)
        compute = torch.cuda.default_stream(self.device)
        compute.wait_stream(channel.stream)
        compute.wait_stream(channel.scatter_stream)
        with _pool_lock:
            _count[self.peer] -= 1


async def open_nccl_source(peer: str, device: torch.device) -> NcclSource:
    if device.type != "cuda":
        raise InvalidRequestError("the nccl transport needs a CUDA device", field="transport")
    return NcclSource(peer, device)
