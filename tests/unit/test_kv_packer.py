"""The packer: grpc chunks copied out of the cache on its own thread, within its budget, handed to gRPC whole,
given back when their transfer ends; the loop copies whatever the packer has not reached."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from common.errors import KVTransferError
from common.rpc import worker_pb2 as pb
from kvtransfer import transport as transport_module
from kvtransfer.codec import decode_message, encode_chunk
from kvtransfer.layout import KVLayout, payload_views
from kvtransfer.packer import PACKED, PACKING, PENDING, TAKEN, Packer
from kvtransfer.transport import GrpcSink

LAYOUT = KVLayout(num_layers=1, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")


def _cache() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 8, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim, generator=g)


def _header(n: int) -> pb.KVChunkHeader:
    return pb.KVChunkHeader(request_id="r", layer=0, block_ids=list(range(n)), dtype="float32",
                            shape=LAYOUT.chunk_shape(n))


def _wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the packer did not get there"
        time.sleep(0.001)


def _emit(sink: GrpcSink, cache: torch.Tensor, ids: list[int]):
    return sink.emit(_header(len(ids)), cache, ids)


def test_packed_chunks_are_the_messages_and_the_budget_comes_back():
    cache = _cache()
    packer = Packer(ahead_bytes=1 << 20)
    sink = GrpcSink(checksum=True, packer=packer)
    ids = [[5, 1], [2, 3, 4], [7]]
    chunks = [_emit(sink, cache, i) for i in ids]
    _wait_for(lambda: all(c.state == PACKED for c in chunks))
    assert packer.outstanding == sum(c.nbytes for c in chunks) and sink.packed == set(chunks)
    for chunk, i in zip(chunks, ids):
        packed = chunk.data
        raw = chunk.SerializeToString()
        assert raw is packed  # handed over, not copied again
        assert raw == encode_chunk(_header(len(i)), payload_views(cache, i), checksum=True) and len(chunk) == len(raw)
        decode_message(raw)
        assert chunk.state == TAKEN and chunk.data is None
    assert packer.outstanding == 0 and not sink.packed


def test_the_packer_stays_within_its_budget_and_the_loop_copies_the_rest():
    cache = _cache()
    first = _emit(GrpcSink(checksum=False, packer=Packer(0)), cache, [0, 1])
    packer = Packer(ahead_bytes=first.nbytes)  # room for one chunk at a time
    sink = GrpcSink(checksum=False, packer=packer)
    chunks = [_emit(sink, cache, [0, 1]), _emit(sink, cache, [2, 3]), _emit(sink, cache, [4, 5])]
    _wait_for(lambda: chunks[0].state == PACKED)
    time.sleep(0.05)
    assert [c.state for c in chunks[1:]] == [PENDING, PENDING] and packer.outstanding == chunks[0].nbytes
    raw2 = chunks[2].SerializeToString()  # gRPC got ahead of the packer: the loop copies this one itself
    assert chunks[2].state == TAKEN and raw2 == encode_chunk(_header(2), payload_views(cache, [4, 5]), checksum=False)
    chunks[0].SerializeToString()  # room again: the packer moves on to the next pending chunk, skipping taken ones
    _wait_for(lambda: chunks[1].state == PACKED)
    assert packer.outstanding == chunks[1].nbytes
    chunks[1].SerializeToString()
    assert packer.outstanding == 0


def test_a_chunk_being_packed_is_waited_for_not_copied_twice(monkeypatch):
    cache = _cache()
    started, release = threading.Event(), threading.Event()
    real_gather = transport_module.gather

    def slow_gather(*args):
        started.set()
        release.wait(5)
        return real_gather(*args)

    monkeypatch.setattr(transport_module, "gather", slow_gather)
    packer = Packer()
    chunk = _emit(GrpcSink(checksum=True, packer=packer), cache, [3, 6])
    assert started.wait(5) and chunk.state == PACKING
    got: list[bytes] = []
    taker = threading.Thread(target=lambda: got.append(chunk.SerializeToString()))
    taker.start()
    time.sleep(0.05)
    assert taker.is_alive() and not got  # waiting for the packer, not copying
    release.set()
    taker.join(5)
    assert got and got[0] == encode_chunk(_header(2), payload_views(cache, [3, 6]), checksum=True)
    assert packer.outstanding == 0


def test_a_closed_transfer_gives_its_packed_chunks_back():
    cache = _cache()
    packer = Packer()
    sink = GrpcSink(checksum=True, packer=packer)
    chunks = [_emit(sink, cache, [i]) for i in range(4)]
    _wait_for(lambda: all(c.state == PACKED for c in chunks))
    assert packer.outstanding > 0
    sink.close(completed=False)
    assert packer.outstanding == 0 and not sink.packed and all(c.data is None for c in chunks)
    for chunk in chunks:
        with pytest.raises(KVTransferError, match="ended"):
            chunk.SerializeToString()
    late = _emit(sink, cache, [5])  # emitted after the close: never packed, never sent
    time.sleep(0.05)
    assert late.state == PENDING and packer.outstanding == 0


def test_a_closed_transfer_leaves_the_queue_and_the_others_go_on():
    cache = _cache()
    one = _emit(GrpcSink(checksum=False, packer=Packer(0)), cache, [0]).nbytes
    packer = Packer(ahead_bytes=one)  # the first chunk fills the budget; the rest wait in the queue
    ended, other = GrpcSink(checksum=False, packer=packer), GrpcSink(checksum=False, packer=packer)
    first = _emit(ended, cache, [0])
    _wait_for(lambda: first.state == PACKED)
    queued = [_emit(ended, cache, [1]), _emit(other, cache, [2]), _emit(ended, cache, [3])]
    ended.close(completed=False)
    assert all(chunk.sink is not ended for chunk in packer._queue)
    _wait_for(lambda: queued[1].state == PACKED)
    assert queued[1].SerializeToString() == encode_chunk(_header(1), payload_views(cache, [2]), checksum=False)
    assert packer.outstanding == 0 and [c.state for c in (queued[0], queued[2])] == [PENDING, PENDING]


def test_a_failed_pack_leaves_the_copy_to_the_loop(monkeypatch):
    cache = _cache()

    real_gather = transport_module.gather

    def no_memory_on_the_packer(*args):
        if threading.current_thread().name == "kv-pack":
            raise MemoryError
        return real_gather(*args)

    monkeypatch.setattr(transport_module, "gather", no_memory_on_the_packer)
    packer = Packer()
    chunk = _emit(GrpcSink(checksum=True, packer=packer), cache, [2])
    _wait_for(lambda: packer.outstanding == 0 and chunk.state == PENDING and not packer._queue)
    assert chunk.SerializeToString() == encode_chunk(_header(1), payload_views(cache, [2]), checksum=True)
