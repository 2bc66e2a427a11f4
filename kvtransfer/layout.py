"""The shape of a paged KV cache as both ends of a transfer see it, and block payload views.

A layer's cache is ``[2, num_blocks, block_size, num_kv_heads, head_dim]``. A
payload holds the K rows of some blocks followed by their V rows, each block
``block_size * num_kv_heads * head_dim`` elements, in the order of the chunk's
block ids.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from common.rpc import worker_pb2 as pb

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True, slots=True)
class KVLayout:
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @classmethod
    def of_cache(cls, kv_caches: list[torch.Tensor]) -> KVLayout:
        _, _, block_size, heads, dim = kv_caches[0].shape
        return cls(len(kv_caches), block_size, heads, dim, DTYPE_NAMES[kv_caches[0].dtype])

    @classmethod
    def from_proto(cls, msg: pb.KVLayout) -> KVLayout:
        return cls(msg.num_layers, msg.block_size, msg.num_kv_heads, msg.head_dim, msg.dtype)

    def to_proto(self) -> pb.KVLayout:
        return pb.KVLayout(num_layers=self.num_layers, block_size=self.block_size,
                           num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, dtype=self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def block_bytes(self) -> int:
        """Bytes of K (or of V) of one block of one layer."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.torch_dtype.itemsize

    def chunk_shape(self, num_blocks: int) -> list[int]:
        return [2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim]


def contiguous_runs(block_ids: list[int]) -> list[tuple[int, int]]:
    """``[3, 4, 5, 9, 10]`` -> ``[(3, 6), (9, 11)]``: half-open ranges of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs


def payload_views(layer_cache: torch.Tensor, block_ids: list[int]) -> list[memoryview]:
    """Byte views of K then V of ``block_ids`` in one layer cache: zero-copy on the host; from a GPU
    cache, one gather and one device-to-host copy (which waits for the layer to finish)."""
    if layer_cache.device.type != "cpu":
        ids = torch.tensor(block_ids, dtype=torch.int64).to(layer_cache.device, non_blocking=True)
        host = layer_cache.index_select(1, ids).to("cpu")  # [2, n, bs, H, D]
        return [memoryview(host.view(torch.uint8).numpy()).cast("B")]
    views = []
    for kv in (0, 1):
        for start, end in contiguous_runs(block_ids):
            part = layer_cache[kv, start:end]
            views.append(memoryview(part.view(torch.uint8).numpy()).cast("B"))
    return views


def write_payload(layer_cache: torch.Tensor, block_ids: list[int], payload: memoryview | bytes,
                  layout: KVLayout) -> None:
    """Copy a payload into ``block_ids`` of one layer cache (the consumer's side).

    A contiguous host cache takes byte copies with numpy, which release the GIL and stay on the calling
    thread; ``Tensor.copy_`` would start an OpenMP team per call that spins for cores the gRPC threads
    need. One call per contiguous run: each call that releases the GIL must take it back from the busy event
    loop. Any other cache goes through :func:`write_payload_torch`, the reference."""
    if layer_cache.device.type != "cpu" or not layer_cache.is_contiguous():
        write_payload_torch(layer_cache, block_ids, payload, layout)
        return
    block_bytes = layout.block_bytes
    src = np.frombuffer(payload, dtype=np.uint8)
    if src.nbytes != 2 * len(block_ids) * block_bytes:
        raise ValueError(f"payload of {src.nbytes} bytes for {len(block_ids)} blocks")
    num_blocks = layer_cache.shape[1]
    runs = contiguous_runs(block_ids)
    if any(start < 0 or end > num_blocks for start, end in runs):
        raise ValueError(f"block ids outside the cache's {num_blocks} blocks")
    dst = layer_cache.view(-1).view(torch.uint8).numpy()  # the layer's bytes: K of every block, then V
    offset = 0
    for kv in (0, 1):
        base = kv * num_blocks * block_bytes
        for start, end in runs:
            size = (end - start) * block_bytes
            np.copyto(dst[base + start * block_bytes:base + end * block_bytes], src[offset:offset + size])
            offset += size


def write_payload_torch(layer_cache: torch.Tensor, block_ids: list[int], payload: memoryview | bytes,
                        layout: KVLayout) -> None:
    """The reference (and device) path of :func:`write_payload`: ``copy_`` per contiguous run."""
    n = len(block_ids)
    with warnings.catch_warnings():  # the view is only read from; a read-only buffer is fine
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        data = torch.frombuffer(payload, dtype=torch.uint8).view(layout.torch_dtype)
    data = data.view(layout.chunk_shape(n))
    if data.device != layer_cache.device:
        data = data.to(layer_cache.device, non_blocking=True)
    for kv in (0, 1):
        offset = 0
        for start, end in contiguous_runs(block_ids):
            layer_cache[kv, start:end].copy_(data[kv, offset:offset + end - start])
            offset += end - start
