"""Encoding and decoding of KV stream messages without copying payloads twice.

A chunk message is an ordinary protobuf ``KVMessage`` on the wire; it is just
assembled by hand, so the payload is copied once, straight from the cache into
the message, and parsed by hand, so the receiver gets a view of the payload
inside the received buffer instead of a copy. ``PrefillDone`` messages and any
message this parser does not expect go through the protobuf classes.

Every header carries an xxh3-64 checksum of itself (serialized with the
checksum field zero), and optionally of its payload, so a corrupted or
truncated message is rejected rather than decoded from. Both checksums have
bit 63 set (:data:`CHECKSUM_BIT`; a 63-bit hash): never 0, which means "no
checksum", and always ten bytes as a varint, so a chunk's frame has the same
length whatever its checksums are. The grpc transport relies on that: it
lays out a message before its payload is hashed, then hashes the payload
once it is copied in and writes the final frame in front
(:func:`chunk_frame`, ``kvtransfer.gather``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import xxhash
from google.protobuf.message import DecodeError

from common.errors import KVTransferError
from common.rpc import worker_pb2 as pb

if TYPE_CHECKING:
    import numpy as np

_TAG_1_LEN = b"\x0a"  # field 1, length-delimited
_TAG_2_LEN = b"\x12"  # field 2, length-delimited
CHECKSUM_BIT = 1 << 63


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise KVTransferError("truncated KV message")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise KVTransferError("malformed varint in KV message")


def payload_checksum(parts: Sequence[memoryview | bytes | np.ndarray]) -> int:
    """The payload checksum of ``parts`` in order: xxh3-64 with :data:`CHECKSUM_BIT` set."""
    h = xxhash.xxh3_64()
    for p in parts:
        h.update(p)
    return h.intdigest() | CHECKSUM_BIT


def check_payload(header: pb.KVChunkHeader, payload: memoryview) -> None:
    if payload_checksum([payload]) != header.payload_checksum:
        raise KVTransferError("KV payload checksum mismatch", code="checksum")


def seal_header(header: pb.KVChunkHeader) -> bytes:
    """Set the header's checksum and return it serialized."""
    header.header_checksum = 0
    header.header_checksum = xxhash.xxh3_64_intdigest(header.SerializeToString()) | CHECKSUM_BIT
    return header.SerializeToString()


def verify_header(header: pb.KVChunkHeader) -> None:
    claimed = header.header_checksum
    copy = pb.KVChunkHeader()
    copy.CopyFrom(header)
    copy.header_checksum = 0
    if xxhash.xxh3_64_intdigest(copy.SerializeToString()) | CHECKSUM_BIT != claimed:
        raise KVTransferError("KV chunk header checksum mismatch", code="checksum")


def seal_done(done: pb.PrefillDone) -> pb.KVMessage:
    done.checksum = 0
    done.checksum = xxhash.xxh3_64_intdigest(done.SerializeToString())
    return pb.KVMessage(done=done)


def verify_done(done: pb.PrefillDone) -> None:
    copy = pb.PrefillDone()
    copy.CopyFrom(done)
    copy.checksum = 0
    if xxhash.xxh3_64_intdigest(copy.SerializeToString()) != done.checksum:
        raise KVTransferError("PrefillDone checksum mismatch", code="checksum")


def encode_chunk(header: pb.KVChunkHeader, parts: Sequence[memoryview | bytes], *, checksum: bool,
                 inline: bool = True) -> bytes:
    """A serialized ``KVMessage(chunk=KVChunk(header, payload=b"".join(parts)))``.

    With ``inline=False`` the payload travels elsewhere (shared memory, NCCL):
    the header still states its size and checksum, the message omits it.
    """
    frame = encode_chunk_frame(header, parts, checksum=checksum, inline=inline)
    return b"".join([frame, *parts]) if inline and header.payload_bytes else frame


def encode_chunk_frame(header: pb.KVChunkHeader, parts: Sequence[memoryview | bytes], *, checksum: bool,
                       inline: bool = True) -> bytes:
    """The bytes of :func:`encode_chunk`'s message that precede the payload (all of them when it has none):
    the checksums are taken now, the payload can be appended later."""
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    return chunk_frame(header, size, payload_checksum(parts) if checksum else None, inline=inline)


def chunk_frame(header: pb.KVChunkHeader, payload_bytes: int, checksum: int | None, *, inline: bool = True
                ) -> bytes:
    """The frame of a chunk whose payload has ``payload_bytes`` and the :func:`payload_checksum` ``checksum``
    (None: checksums off). Its length does not depend on ``checksum``, so a frame made with ``checksum=0``
    reserves the room of the final one."""
    header.payload_bytes = payload_bytes
    header.payload_checksum = 0 if checksum is None else checksum | CHECKSUM_BIT
    hdr = seal_header(header)
    inner = _TAG_1_LEN + _varint(len(hdr)) + hdr
    if not inline or not payload_bytes:
        return _TAG_1_LEN + _varint(len(inner)) + inner
    inner += _TAG_2_LEN + _varint(payload_bytes)
    return _TAG_1_LEN + _varint(len(inner) + payload_bytes) + inner


def encode_header(header: pb.KVChunkHeader) -> bytes:
    """A serialized chunk message with no payload; the header's payload fields are kept as set."""
    hdr = seal_header(header)
    inner = _TAG_1_LEN + _varint(len(hdr)) + hdr
    return _TAG_1_LEN + _varint(len(inner)) + inner


def decode_message(raw: bytes, *, verify_payload: bool = True) -> tuple[pb.KVChunkHeader, memoryview] | pb.PrefillDone:
    """A chunk as (verified header, payload view into ``raw``), or a verified PrefillDone.

    ``verify_payload=False`` leaves the payload checksum to the caller (the consumer checks it on its worker
    threads, beside the copy into the cache, off the event loop that decodes)."""
    buf = memoryview(raw)
    if not raw or buf[0] != 0x0A:
        try:
            msg = pb.KVMessage.FromString(raw)
        except DecodeError as e:
            raise KVTransferError(f"undecodable KV message: {e}", code="checksum") from e
        if msg.WhichOneof("kind") != "done":
            raise KVTransferError("unexpected KV message")
        verify_done(msg.done)
        return msg.done
    length, pos = _read_varint(buf, 1)
    end = pos + length
    if end != len(buf):
        raise KVTransferError("KV message length mismatch", code="checksum")
    header = None
    payload = buf[0:0]
    while pos < end:
        tag = buf[pos]
        n, pos = _read_varint(buf, pos + 1)
        if pos + n > end:
            raise KVTransferError("truncated KV chunk", code="checksum")
        if tag == 0x0A:
            try:
                header = pb.KVChunkHeader.FromString(bytes(buf[pos:pos + n]))
            except DecodeError as e:
                raise KVTransferError(f"undecodable KV chunk header: {e}", code="checksum") from e
        elif tag == 0x12:
            payload = buf[pos:pos + n]
        else:
            raise KVTransferError(f"unexpected field tag {tag} in KV chunk")
        pos += n
    if header is None:
        raise KVTransferError("KV chunk without a header")
    verify_header(header)
    if verify_payload and payload.nbytes and header.payload_checksum:
        check_payload(header, payload)
    return header, payload
