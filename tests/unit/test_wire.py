"""Wire formats: generated code matches proto/, KV chunk codec is real protobuf, nothing is pickled."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch

from common.errors import KVTransferError
from common.rpc import worker_pb2 as pb
from kvtransfer.codec import chunk_frame, decode_message, encode_chunk, seal_done
from kvtransfer.layout import KVLayout, contiguous_runs, payload_views, write_payload, write_payload_torch
from kvtransfer.packer import Packer
from kvtransfer.transport import GrpcSink, GrpcSource

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_proto(tmp_path):
    subprocess.run([str(ROOT / "scripts" / "gen_proto"), str(tmp_path)], check=True, cwd=ROOT)
    generated = sorted(p.name for p in (tmp_path / "common" / "rpc").iterdir())
    assert generated, "gen_proto produced nothing"
    for name in generated:
        fresh = (tmp_path / "common" / "rpc" / name).read_bytes()
        committed = (ROOT / "common" / "rpc" / name).read_bytes()
        assert fresh == committed, f"common/rpc/{name} is stale: run scripts/gen_proto"


def _cache(layout: KVLayout, num_blocks: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim, generator=g)


def test_chunk_round_trip_is_protobuf():
    layout = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")
    src = _cache(layout, 16)
    ids = [3, 4, 5, 9, 1]
    assert contiguous_runs(ids) == [(3, 6), (9, 10), (1, 2)]
    header = pb.KVChunkHeader(request_id="r", layer=1, block_ids=[7, 8, 9, 10, 11], dtype="float32",
                              shape=layout.chunk_shape(5), sequence=4)
    raw = encode_chunk(header, payload_views(src, ids), checksum=True)
    # an ordinary protobuf parser reads the same message
    msg = pb.KVMessage.FromString(raw)
    assert msg.chunk.header.request_id == "r" and list(msg.chunk.header.block_ids) == [7, 8, 9, 10, 11]
    assert len(msg.chunk.payload) == msg.chunk.header.payload_bytes == 2 * 5 * layout.block_bytes
    parsed_header, payload = decode_message(raw)
    assert parsed_header == msg.chunk.header and bytes(payload) == msg.chunk.payload
    dst = torch.zeros_like(src)
    write_payload(dst, [0, 2, 4, 6, 8], payload, layout)
    assert torch.equal(dst[:, [0, 2, 4, 6, 8]], src[:, ids])
    assert dst[:, [1, 3, 5]].abs().sum() == 0


def test_bfloat16_payload():
    layout = KVLayout(num_layers=1, block_size=4, num_kv_heads=1, head_dim=8, dtype="bfloat16")
    src = _cache(layout, 4).to(torch.bfloat16)
    header = pb.KVChunkHeader(request_id="r", layer=0, block_ids=[0, 1], dtype="bfloat16",
                              shape=layout.chunk_shape(2))
    _, payload = decode_message(encode_chunk(header, payload_views(src, [2, 3]), checksum=True))
    dst = torch.zeros_like(src)
    write_payload(dst, [0, 1], payload, layout)
    assert torch.equal(dst[:, :2], src[:, 2:])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_host_write_agrees_with_the_torch_reference(dtype):
    layout = KVLayout(num_layers=1, block_size=4, num_kv_heads=2, head_dim=8, dtype=dtype)
    src = _cache(layout, 12).to(layout.torch_dtype)
    payload = b"".join(payload_views(src, [5, 6, 7, 0, 11, 2]))
    fast, reference = torch.zeros_like(src), torch.zeros_like(src)
    dest = [9, 10, 3, 4, 5, 0]
    write_payload(fast, dest, memoryview(payload), layout)
    write_payload_torch(reference, dest, memoryview(payload), layout)
    assert torch.equal(fast, reference) and torch.equal(fast[:, dest], src[:, [5, 6, 7, 0, 11, 2]])


@pytest.mark.parametrize("dest,nbytes", [([3, 4], None), ([-1, 0], None), ([0, 1], 100)])
def test_host_write_refuses_what_does_not_fit(dest, nbytes):
    layout = KVLayout(num_layers=1, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")
    cache = torch.zeros(2, 4, 4, 2, 8)
    payload = bytes(nbytes if nbytes is not None else 2 * 2 * layout.block_bytes)
    with pytest.raises(ValueError):
        write_payload(cache, dest, payload, layout)
    assert cache.abs().sum() == 0


def test_grpc_sink_copies_the_payload_when_sent():
    """Without a packer running ahead, the grpc sink's message reads the cache when serialized: the same bytes
    as encode_chunk of the cache as it is then, its checksums taken while copying (so they cover exactly the
    bytes sent), and nothing once the sink closed."""
    layout = KVLayout(num_layers=1, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")
    src = _cache(layout, 6)

    def header() -> pb.KVChunkHeader:
        return pb.KVChunkHeader(request_id="r", layer=0, block_ids=[0, 1, 2], dtype="float32",
                                shape=layout.chunk_shape(3))

    sink = GrpcSink(checksum=True, packer=Packer(ahead_bytes=0))
    message = sink.emit(header(), src, [4, 1, 2])
    raw = message.SerializeToString()
    assert raw == encode_chunk(header(), payload_views(src, [4, 1, 2]), checksum=True) and len(message) == len(raw)
    decode_message(raw)
    changed = sink.emit(header(), src, [4, 1, 2])
    src[1, 4] += 1
    raw = changed.SerializeToString()
    assert raw == encode_chunk(header(), payload_views(src, [4, 1, 2]), checksum=True)
    _, payload = decode_message(raw)
    assert payload == b"".join(payload_views(src, [4, 1, 2]))
    sink.close()
    with pytest.raises(KVTransferError):
        message.SerializeToString()


@pytest.mark.parametrize("corrupt", [False, True])
def test_grpc_source_checks_the_payload_before_writing_it(corrupt):
    """The consumer decodes without hashing the payload; GrpcSource hashes it before copying it and refuses a
    payload that does not match its header, leaving the cache untouched."""
    layout = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")
    src = _cache(layout, 8)
    header = pb.KVChunkHeader(request_id="r", layer=1, block_ids=[2, 3, 4, 7], dtype="float32",
                              shape=layout.chunk_shape(4))
    raw = bytearray(encode_chunk(header, payload_views(src, [0, 1, 2, 5]), checksum=True))
    if corrupt:
        raw[-300] ^= 0x10
    parsed, payload = decode_message(bytes(raw), verify_payload=False)
    caches = [torch.zeros_like(src), torch.zeros_like(src)]
    if corrupt:
        with pytest.raises(KVTransferError, match="payload checksum"):
            GrpcSource().apply(parsed, payload, caches, layout)
        assert caches[1].abs().sum() == 0 and caches[0].abs().sum() == 0
        return
    assert GrpcSource().apply(parsed, payload, caches, layout) == 4 * 2 * layout.block_bytes
    assert torch.equal(caches[1][:, [2, 3, 4, 7]], src[:, [0, 1, 2, 5]]) and caches[0].abs().sum() == 0


@pytest.mark.parametrize("where", ["header", "payload", "length"])
def test_corruption_is_detected(where):
    layout = KVLayout(num_layers=1, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")
    header = pb.KVChunkHeader(request_id="r", layer=0, block_ids=[0, 1], dtype="float32",
                              shape=layout.chunk_shape(2))
    raw = bytearray(encode_chunk(header, payload_views(_cache(layout, 2), [0, 1]), checksum=True))
    if where == "header":
        raw[8] ^= 0x01
    elif where == "payload":
        raw[-5] ^= 0x01
    else:
        raw = raw[:-3]
    with pytest.raises(KVTransferError):
        decode_message(bytes(raw))


def test_chunk_frames_have_the_same_length_whatever_their_checksums():
    """So the grpc transport can lay a message out before hashing its payload: both checksums have bit 63 set
    (ten bytes as a varint, never the 0 of "no checksum")."""
    header = pb.KVChunkHeader(request_id="r", layer=3, block_ids=[0, 1], dtype="float32", shape=[2, 2, 4, 2, 8])
    frames = [chunk_frame(header, 512, digest) for digest in (0, 1, 1 << 40, (1 << 64) - 1)]
    assert len({len(f) for f in frames}) == 1
    assert header.payload_checksum >> 63 == 1 and header.header_checksum >> 63 == 1
    assert len(chunk_frame(header, 512, None)) < len(frames[0]) and header.payload_checksum == 0


def test_done_checksum():
    done = pb.PrefillDone(request_id="r", first_token_id=7, num_chunks=3)
    raw = bytearray(seal_done(done).SerializeToString())
    assert decode_message(bytes(raw)).first_token_id == 7
    raw[-12] ^= 0x02
    with pytest.raises(KVTransferError):
        decode_message(bytes(raw))


def test_nothing_is_pickled():
    """No module of ours may deserialize pickles or load torch checkpoints that can carry them."""
    forbidden = re.compile(r"\b(import pickle|from pickle|cloudpickle|import marshal|import shelve|"
                           r"torch\.load\(|pickle\.loads|dill\b|joblib\.load)")
    offenders = []
    for package in ("common", "engine", "kvtransfer", "worker", "prefill_worker", "decode_worker", "router",
                    "autoscaler", "simulator", "cli"):
        for path in (ROOT / package).rglob("*.py"):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if forbidden.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, offenders
