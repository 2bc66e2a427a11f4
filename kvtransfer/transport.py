"""Transports: how block payloads travel beside the ``Prefill`` control stream.

Each transport has a producer half (a :class:`PayloadSink`, one per transfer,
called on the prefill worker's engine thread as each layer finishes) and a
consumer half (a :class:`PayloadSource`, one per transfer on the decode worker).
The control stream always carries the chunk headers, in order; the payload goes

* ``grpc``: inside the chunk message itself (works everywhere; the default);
* ``local``: into a shared-memory segment the consumer created on the same host
  and named in ``transport_params``; the message carries only its offset;
* ``nccl``: over a two-rank NCCL communicator per (prefill, decode) pair, whose
  unique id travels in ``transport_params`` (GPU only; ``kvtransfer.nccl``).

``open_sink`` / ``open_source`` build the halves (NCCL's need a communicator
set up first, so they are coroutines); everything else is synchronous.
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import re
import secrets
import tempfile
import threading
from typing import Protocol

import torch

from common.errors import InvalidRequestError, KVTransferError
from common.rpc import worker_pb2 as pb
from kvtransfer.codec import check_payload, chunk_frame, encode_chunk
from kvtransfer.gather import gather
from kvtransfer.layout import KVLayout, payload_views, write_payload
from kvtransfer.packer import PENDING, Packer, default_packer


class PayloadSink(Protocol):
    """Producer half; all but ``close`` run on the engine thread.

    CPU transports (``announces_steps`` false) get ``emit`` right after each
    layer finished, once per chunk. GPU transports get ``announce`` once per
    engine step, before its first layer, then ``send_layer`` after each layer.
    """

    announces_steps: bool

    def emit(self, header: pb.KVChunkHeader, layer_cache: torch.Tensor, src_block_ids: list[int]
             ) -> bytes | DeferredChunk:
        """Send (or stage) the payload of ``src_block_ids``; return the control message: its bytes, or a
        :class:`DeferredChunk` that makes them when gRPC sends it."""
        ...

    def announce(self, header: pb.KVChunkHeader, src_block_ids: list[int]) -> bytes:
        """A step will send ``src_block_ids`` of every layer (``header`` covers them all); return its message."""
        ...

    def send_layer(self, layer: int, layer_cache: torch.Tensor) -> None:
        """Send this layer's part of the announced step."""
        ...

    def close(self, completed: bool = True) -> None:
        """The transfer ended (``completed``: its consumer collected everything)."""
        ...


class PayloadSource(Protocol):
    """Consumer half. ``apply`` runs on the consumer's worker threads, one call per chunk."""

    def transport_params(self) -> bytes:
        """What the producer needs to reach this source (sent in ``PrefillRequest``)."""
        ...

    def apply(self, header: pb.KVChunkHeader, inline: memoryview, kv_caches: list[torch.Tensor], layout: KVLayout
              ) -> int:
        """Write a received chunk's payload into its blocks of ``kv_caches[header.layer]`` (and of the following
        layers when the header covers several); returns the payload bytes. The header is verified; the payload
        (``inline``, or wherever the transport put it) is not yet: ``apply`` checks it against
        ``header.payload_checksum`` when that is set, and raises ``KVTransferError(code="checksum")``."""
        ...

    def finish(self, timeout_s: float) -> float | None:
        """Block until every chunk applied so far is in the cache (GPU transports complete asynchronously).

        Returns the seconds the device spent receiving, from the first posted receive to the last one's end,
        where the transport can tell (None otherwise)."""
        ...

    def close(self) -> None: ...


def _check_size(header: pb.KVChunkHeader, layout: KVLayout, nbytes: int) -> None:
    if header.num_layers > 1:  # a payload through the CPU is one layer's
        raise KVTransferError(f"a chunk of {header.num_layers} layers on a CPU transport", code="checksum")
    expected = 2 * len(header.block_ids) * layout.block_bytes
    if nbytes != expected or header.payload_bytes != expected:
        raise KVTransferError(f"payload has {nbytes} bytes (header {header.payload_bytes}), expected {expected}",
                              code="checksum")


def _write_checked(header: pb.KVChunkHeader, payload: memoryview, kv_caches: list[torch.Tensor], layout: KVLayout
                   ) -> int:
    """A CPU transport's ``apply``: check the payload against the header's checksum (when set), then write it
    into its blocks, so nothing unverified reaches the cache. The payload is hashed in one call: it was just
    received, so it is still in the CPU's caches. (Hashing it piece by piece as it was copied, as this did
    before, took the GIL back from the busy event loop once per piece, which cost the stream more than the
    second read costs.)"""
    _check_size(header, layout, payload.nbytes)
    if header.payload_checksum:
        check_payload(header, payload)
    write_payload(kv_caches[header.layer], list(header.block_ids), payload, layout)
    return payload.nbytes


# --- grpc: payload inline -----------------------------------------------------------------------


class DeferredChunk:
    """A chunk message whose payload is copied out of the cache after the layer finished: by the process's
    :class:`~kvtransfer.packer.Packer`, a bounded distance ahead of gRPC, or when gRPC serializes it if the
    packer has not got to it. Copying every chunk at ``emit`` would hold a whole prompt's KV at once (the engine
    thread may queue all its chunks together), fresh memory page-faulted in for every transfer.

    The payload checksum is taken as the payload is copied into the message (:meth:`pack`), so it is read from
    memory once, off the engine thread, and covers exactly the bytes sent. The chunk refuses to serialize once
    its sink closed, when the blocks may already belong to someone else. Serializing and closing both happen
    on the event loop."""

    __slots__ = ("header", "frame", "parts", "sink", "nbytes", "state", "data")

    def __init__(self, header: pb.KVChunkHeader, parts: list[memoryview], sink: GrpcSink) -> None:
        self.header, self.parts, self.sink = header, parts, sink
        size = sum(p.nbytes for p in parts)
        # final without checksums; with them, a frame of the final length whose checksums are placeholders
        self.frame = chunk_frame(header, size, 0 if sink.checksum else None)
        self.nbytes = len(self.frame) + size
        self.state, self.data = PENDING, None
        sink.packer.submit(self)

    def __len__(self) -> int:  # the size of the message it will serialize to
        return self.nbytes

    def pack(self) -> bytes:
        """The message: the payload copied out of the cache (hashed as it is copied) behind its frame."""
        if not self.sink.checksum:
            return gather([self.frame, *self.parts])
        size = self.nbytes - len(self.frame)
        return gather([self.frame, *self.parts], lambda checksum: chunk_frame(self.header, size, checksum))

    def SerializeToString(self) -> bytes:  # the name gRPC handlers call on a response message
        if self.sink.closed:
            raise KVTransferError("the transfer ended before its chunk was sent")
        packed = self.sink.packer.take(self)
        if packed is not None:
            return packed
        return self.pack()  # copies with the GIL released: see kvtransfer.gather


class GrpcSink:
    announces_steps = False

    def __init__(self, checksum: bool, packer: Packer | None = None) -> None:
        self.checksum = checksum
        self.packer = packer if packer is not None else default_packer()
        self.closed = False
        self.packed: set[DeferredChunk] = set()  # chunks packed and not yet sent (the packer's lock guards it)

    def emit(self, header: pb.KVChunkHeader, layer_cache: torch.Tensor, src_block_ids: list[int]
             ) -> DeferredChunk:
        return DeferredChunk(header, payload_views(layer_cache, src_block_ids), self)

    def close(self, completed: bool = True) -> None:
        self.closed = True
        self.packer.discard(self)


class GrpcSource:
    def transport_params(self) -> bytes:
        return b""

    def apply(self, header: pb.KVChunkHeader, inline: memoryview, kv_caches: list[torch.Tensor], layout: KVLayout
              ) -> int:
        return _write_checked(header, inline, kv_caches, layout)

    def finish(self, timeout_s: float) -> float | None:
        return None

    def close(self) -> None:
        pass


# --- local: payload in a shared-memory file the consumer owns ------------------------------------

_SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
_SHM_NAME = re.compile(r"^pdserve-kv-[0-9a-f]{32}$")


def _shm_path(name: str) -> str:
    if not _SHM_NAME.match(name):
        raise InvalidRequestError(f"bad shared-memory segment name {name!r}", field="transport_params")
    return os.path.join(_SHM_DIR, name)


class _Segments:
    """Shared-memory segments of completed transfers, kept mapped for the next transfers of this process.

    The kernel allocates and zeroes a fresh segment's pages as they are first touched: about 220 ms per
    256 MiB on a 2-vCPU VM, more than moving the data. A segment comes back only from a transfer whose
    producer finished writing, and is renamed before its next use, so nobody who knew its old name can
    open it again. At most ``max_segments`` wait; what is left is unlinked at exit."""

    def __init__(self, max_segments: int = 2) -> None:
        self.max_segments = max_segments
        self._lock = threading.Lock()
        self._idle: list[tuple[str, mmap.mmap, int]] = []  # (path, mapping, size), oldest first
        atexit.register(self.clear)

    def take(self, num_bytes: int) -> tuple[str, mmap.mmap, int] | None:
        """The smallest idle segment that holds ``num_bytes`` and is at most twice that, if any."""
        with self._lock:
            fits = [s for s in self._idle if num_bytes <= s[2] <= 2 * num_bytes]
            if not fits:
                return None
            segment = min(fits, key=lambda s: s[2])
            self._idle.remove(segment)
            return segment

    def give(self, path: str, mapping: mmap.mmap, size: int) -> None:
        with self._lock:
            self._idle.append((path, mapping, size))
            evicted, self._idle = self._idle[:-self.max_segments], self._idle[-self.max_segments:]
        for segment in evicted:
            _drop_segment(*segment)

    def clear(self) -> None:
        with self._lock:
            evicted, self._idle = self._idle, []
        for segment in evicted:
            _drop_segment(*segment)


def _drop_segment(path: str, mapping: mmap.mmap, size: int) -> None:
    with contextlib.suppress(BufferError):  # a view still alive keeps the mapping until it goes
        mapping.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


_SEGMENTS = _Segments()


class LocalSource:
    """Creates the segment (sized for the whole transfer, or an idle one of a completed transfer renamed)
    and unlinks it when closed, or keeps it for the next transfer when ``finish`` came first: the consumer
    calls that only after ``PrefillDone`` and the end of every stream, when the producer wrote its last."""

    def __init__(self, num_bytes: int) -> None:
        self.name = f"pdserve-kv-{secrets.token_hex(16)}"
        self.path = _shm_path(self.name)
        self.completed = False
        idle = _SEGMENTS.take(num_bytes)
        if idle is not None:
            old_path, self._map, self.size = idle
            os.rename(old_path, self.path)
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, max(num_bytes, 1))
            self._map = mmap.mmap(fd, max(num_bytes, 1))
        finally:
            os.close(fd)
        self.size = num_bytes

    def transport_params(self) -> bytes:
        return self.name.encode()

    def apply(self, header: pb.KVChunkHeader, inline: memoryview, kv_caches: list[torch.Tensor], layout: KVLayout
              ) -> int:
        return _write_checked(header, self._payload(header), kv_caches, layout)

    def finish(self, timeout_s: float) -> float | None:
        self.completed = True
        return None

    def _payload(self, header: pb.KVChunkHeader) -> memoryview:
        if header.shm_name != self.name:
            raise KVTransferError("chunk names another shared-memory segment", code="checksum")
        start, end = header.shm_offset, header.shm_offset + header.payload_bytes
        if end > self.size:
            raise KVTransferError("chunk lies outside the shared-memory segment", code="checksum")
        return memoryview(self._map)[start:end]

    def close(self) -> None:
        if self.completed:
            _SEGMENTS.give(self.path, self._map, self.size)
        else:
            _drop_segment(self.path, self._map, self.size)


class LocalSink:
    announces_steps = False

    def __init__(self, params: bytes, checksum: bool) -> None:
        self.name = params.decode(errors="replace")
        path = _shm_path(self.name)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise InvalidRequestError(f"cannot open shared-memory segment: {e}", field="transport_params") from e
        try:
            size = os.fstat(fd).st_size
            # every page is written: mapping them all at once costs a fraction of a fault per page
            self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        finally:
            os.close(fd)
        self.size = size
        self.offset = 0
        self.checksum = checksum

    def emit(self, header: pb.KVChunkHeader, layer_cache: torch.Tensor, src_block_ids: list[int]) -> bytes:
        parts = payload_views(layer_cache, src_block_ids)
        size = sum(p.nbytes for p in parts)
        if self.offset + size > self.size:
            raise KVTransferError("shared-memory segment too small for the transfer")
        pos = self.offset
        for p in parts:
            self._map[pos:pos + p.nbytes] = p
            pos += p.nbytes
        header.shm_name = self.name
        header.shm_offset = self.offset
        self.offset = pos
        return encode_chunk(header, parts, checksum=self.checksum, inline=False)

    def close(self, completed: bool = True) -> None:
        self._map.close()


async def open_sink(transport: int, params: bytes, layout: KVLayout, *, checksum: bool, device: torch.device,
                    nccl_message_bytes: int) -> PayloadSink:
    """``nccl_message_bytes``: the size of the messages the nccl transport aims for (whole layers each)."""
    if transport == pb.KV_TRANSPORT_NCCL:
        from kvtransfer.nccl import open_nccl_sink

        return await open_nccl_sink(params, device, layout, nccl_message_bytes)
    return make_sink(transport, params, layout, checksum=checksum)


async def open_source(transport: int, layout: KVLayout, num_blocks: int, *, peer: str,
                      device: torch.device) -> PayloadSource:
    if transport == pb.KV_TRANSPORT_NCCL:
        from kvtransfer.nccl import open_nccl_source

        return await open_nccl_source(peer, device)
    return make_source(transport, layout, num_blocks)


def make_sink(transport: int, params: bytes, layout: KVLayout, *, checksum: bool) -> PayloadSink:
    if transport in (pb.KV_TRANSPORT_GRPC, pb.KV_TRANSPORT_UNSPECIFIED):
        return GrpcSink(checksum)
    if transport == pb.KV_TRANSPORT_LOCAL:
        return LocalSink(params, checksum)
    raise InvalidRequestError(f"KV transport {transport} is not available here", field="transport")


def make_source(transport: int, layout: KVLayout, num_blocks: int) -> PayloadSource:
    if transport in (pb.KV_TRANSPORT_GRPC, pb.KV_TRANSPORT_UNSPECIFIED):
        return GrpcSource()
    if transport == pb.KV_TRANSPORT_LOCAL:
        return LocalSource(2 * layout.num_layers * num_blocks * layout.block_bytes)
    raise InvalidRequestError(f"KV transport {transport} is not available here", field="transport")
