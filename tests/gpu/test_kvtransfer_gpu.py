"""The grpc transport from a GPU cache: chunks packed ahead of gRPC carry the blocks bit-exact."""

from __future__ import annotations

import time

import pytest
import torch

from common.rpc import worker_pb2 as pb
from kvtransfer.codec import decode_message, encode_chunk
from kvtransfer.layout import KVLayout, payload_views
from kvtransfer.packer import PACKED, Packer
from kvtransfer.transport import GrpcSink

pytestmark = pytest.mark.gpu


def test_grpc_chunks_from_a_gpu_cache_are_packed_bit_exact():
    layout = KVLayout(num_layers=1, block_size=16, num_kv_heads=8, head_dim=128, dtype="bfloat16")
    g = torch.Generator(device="cuda").manual_seed(0)
    cache = torch.randn(2, 256, 16, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    host = cache.cpu()
    packer = Packer()
    sink = GrpcSink(checksum=True, packer=packer)
    ids = [list(range(i, i + 32)) for i in range(0, 256, 32)][::-1] + [[200, 3, 77]]

    def header(n: int) -> pb.KVChunkHeader:
        return pb.KVChunkHeader(request_id="g", layer=0, block_ids=list(range(n)), dtype="bfloat16",
                                shape=layout.chunk_shape(n))

    chunks = [sink.emit(header(len(i)), cache, i) for i in ids]
    deadline = time.monotonic() + 10
    while not all(c.state == PACKED for c in chunks):  # 16 MiB in all: within the packer's budget
        assert time.monotonic() < deadline, "the packer did not pack every chunk"
        time.sleep(0.001)
    for chunk, i in zip(chunks, ids):
        raw = chunk.SerializeToString()
        assert raw == encode_chunk(header(len(i)), payload_views(host, i), checksum=True)
        decode_message(raw)
    assert packer.outstanding == 0
