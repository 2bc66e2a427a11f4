"""The ``local`` transport's shared-memory segments: reused only after a completed transfer, under a new name."""

from __future__ import annotations

import os

import pytest
import torch

from common.errors import InvalidRequestError
from common.rpc import worker_pb2 as pb
from kvtransfer.layout import KVLayout
from kvtransfer.transport import _SEGMENTS, LocalSink, LocalSource

LAYOUT = KVLayout(num_layers=1, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")


@pytest.fixture(autouse=True)
def no_idle_segments():
    _SEGMENTS.clear()
    yield
    _SEGMENTS.clear()


def _transfer(source: LocalSource, cache: torch.Tensor, src_ids: list[int], dest: torch.Tensor) -> None:
    sink = LocalSink(source.transport_params(), checksum=True)
    header = pb.KVChunkHeader(request_id="r", layer=0, block_ids=[0, 1], dtype="float32",
                              shape=LAYOUT.chunk_shape(2))
    sink.emit(header, cache, src_ids)
    sink.close()
    source.apply(header, memoryview(b""), [dest], LAYOUT)


def test_a_completed_transfer_leaves_its_segment_for_the_next_under_a_new_name():
    size = 2 * 2 * LAYOUT.block_bytes
    cache = torch.randn(2, 4, 4, 2, 8)
    first = LocalSource(size)
    dest = torch.zeros(2, 2, 4, 2, 8)
    _transfer(first, cache, [2, 3], dest)
    assert torch.equal(dest, cache[:, 2:4])
    first.finish(1.0)
    first.close()
    assert os.path.exists(first.path)  # idle, mapped, waiting for the next transfer

    second = LocalSource(size)
    assert second.name != first.name and not os.path.exists(first.path)
    with pytest.raises(InvalidRequestError):  # whoever knew the old name cannot open it any more
        LocalSink(first.transport_params(), checksum=True)
    _transfer(second, cache, [0, 1], dest)
    assert torch.equal(dest, cache[:, 0:2])
    second.close()  # never finished: the segment goes
    assert not os.path.exists(second.path)


def test_only_a_segment_of_fitting_size_is_reused():
    small = LocalSource(4096)
    small.finish(1.0)
    small.close()
    big = LocalSource(3 * 4096)  # too small to hold it
    tiny = LocalSource(1024)  # would waste more than half of it
    assert os.path.exists(small.path) and big.size == 3 * 4096 and tiny.size == 1024
    big.close()
    tiny.close()
    _SEGMENTS.clear()
    assert not os.path.exists(small.path)
