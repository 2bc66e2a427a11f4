"""Headers covering several layers (how GPU transports announce a step): what the consumer accepts."""

from __future__ import annotations

import pytest
import torch

from common.errors import KVTransferError
from common.rpc import worker_pb2 as pb
from kvtransfer.codec import encode_chunk, encode_header
from kvtransfer.consumer import KVConsumer, _State
from kvtransfer.layout import KVLayout, payload_views
from kvtransfer.transport import GrpcSource

LAYOUT = KVLayout(num_layers=4, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")


class CountingSource(GrpcSource):
    """The grpc source, recording which layers each accepted header covered."""

    def __init__(self) -> None:
        self.applied: list[range] = []

    def apply(self, header, inline, kv_caches, layout) -> int:
        self.applied.append(range(header.layer, header.layer + max(1, header.num_layers)))
        return 0


def _consumer() -> KVConsumer:
    caches = [torch.zeros(2, 8, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim) for _ in range(4)]
    return KVConsumer(caches, consumer_id="t", max_message_bytes=1 << 20)


def _header(layer: int, num_layers: int, blocks: list[int], sequence: int = 0) -> bytes:
    return encode_header(pb.KVChunkHeader(request_id="r", layer=layer, num_layers=num_layers, block_ids=blocks,
                                          dtype="float32", shape=LAYOUT.chunk_shape(len(blocks)),
                                          sequence=sequence))


def test_a_step_header_marks_every_layer_it_covers():
    consumer, source = _consumer(), CountingSource()
    state = _State("r", source, {2, 3, 5}, [set() for _ in range(4)])
    consumer._apply(_header(0, 4, [2, 3]), state)
    consumer._apply(_header(0, 4, [5], sequence=1), state)
    assert source.applied == [range(0, 4), range(0, 4)]
    assert all(r == {2, 3, 5} for r in state.received) and state.num_chunks == 2


@pytest.mark.parametrize("layer,num_layers,blocks", [
    (2, 3, [2]),     # past the last layer
    (0, 4, [2, 6]),  # block 6 was never reserved
    (1, 2, [3]),     # layer 1's block 3 is already written
    (0, 1, [5, 2, 5]),  # block 5 twice in one chunk
])
def test_a_step_header_that_does_not_fit_is_refused(layer, num_layers, blocks):
    consumer, source = _consumer(), CountingSource()
    state = _State("r", source, {2, 3, 5}, [set() for _ in range(4)])
    state.received[1].add(3)
    with pytest.raises(KVTransferError) as e:
        consumer._apply(_header(layer, num_layers, blocks), state)
    assert e.value.code == "checksum" and source.applied == []


def test_cpu_transports_refuse_a_payload_claiming_several_layers():
    """A CPU payload is one layer's: a header claiming more would mark layers written that never were."""
    src = torch.randn(2, 4, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    header = pb.KVChunkHeader(request_id="r", layer=0, num_layers=2, block_ids=[0], dtype="float32",
                              shape=LAYOUT.chunk_shape(1))
    consumer = _consumer()
    state = _State("r", GrpcSource(), {0}, [set() for _ in range(4)])
    with pytest.raises(KVTransferError, match="several|layers on a CPU transport"):
        consumer._apply(encode_chunk(header, payload_views(src, [1]), checksum=True), state)
