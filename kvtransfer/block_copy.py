"""Copying whole KV blocks of some layers between paged caches and a dense staging buffer, on the GPU.

The nccl transport moves a step's blocks through staging buffers, one per
message of a few layers: the producer gathers a message's blocks into one
(``gather_blocks``), the consumer scatters a received message into its
reserved blocks (``scatter_blocks``). Both run beside NCCL's own kernels,
which need the same HBM, so they must be close to a plain copy. PyTorch's ``index_select`` and
``index_copy_`` compute an offset per element and moved about 1 TB/s on an
H200 (benchmarks/gpu_kv_transfer.py --trace: 33 µs to gather one 16 MiB
layer; benchmarks/results/gpu_kv_transfer_trace_index_ops_2xh200_2026-11-21),
a quarter of the copy bandwidth; these kernels copy each block as
one contiguous run of 16-byte vectors.

A layer's cache is ``[2, num_blocks, *block]`` and a staging buffer
``[num_layers, 2, len(ids), *block]``; one launch copies the blocks of every
layer of a message, because each launch from Python costs tens of
microseconds of host time, more than the copy of a layer takes on the GPU. Off
CUDA (or without Triton) the torch ops do the same copy.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs may lack Triton: the torch ops serve
    triton = None

CHUNK = 4096  # elements one program copies (8 KiB of bf16)
_tables: dict[tuple[int, ...], torch.Tensor] = {}  # layer caches' addresses, on their device, per layer group


if triton is not None:
    @triton.jit
    def _copy_blocks_kernel(table_ptr, staging_ptr, ids_ptr, block_elems, cache_kv_stride, staging_layer_stride,
                            staging_kv_stride, GATHER: tl.constexpr, CHUNK: tl.constexpr):
        """Program (i, 2 * j + kv, c): chunk c of block ids[i]'s K (kv 0) or V (kv 1) half in layer j."""
        i = tl.program_id(0)
        j = tl.program_id(1) // 2
        kv = tl.program_id(1) % 2
        offsets = tl.program_id(2) * CHUNK + tl.arange(0, CHUNK)
        mask = offsets < block_elems
        block = tl.load(ids_ptr + i).to(tl.int64)
        cache = tl.load(table_ptr + j).to(tl.pointer_type(staging_ptr.dtype.element_ty))
        cache += kv * cache_kv_stride + block * block_elems
        staging = staging_ptr + j * staging_layer_stride + kv * staging_kv_stride + i.to(tl.int64) * block_elems
        if GATHER:
            tl.store(staging + offsets, tl.load(cache + offsets, mask=mask), mask=mask)
        else:
            tl.store(cache + offsets, tl.load(staging + offsets, mask=mask), mask=mask)


def _check(caches: list[torch.Tensor], staging: torch.Tensor, ids: torch.Tensor) -> None:
    shape = caches[0].shape
    if (shape[0] != 2 or staging.shape[:2] != (len(caches), 2) or staging.shape[3:] != shape[2:]
            or any(c.shape != shape or c.dtype != staging.dtype for c in caches)):
        raise ValueError(f"{len(caches)} caches {tuple(shape)} and staging {tuple(staging.shape)} do not match")
    if staging.shape[2] != ids.numel():
        raise ValueError(f"{ids.numel()} ids for a staging buffer of {staging.shape[2]} blocks")


def _use_kernel(cache: torch.Tensor) -> bool:
    return triton is not None and cache.is_cuda


def _table(caches: list[torch.Tensor]) -> torch.Tensor:
    key = tuple(c.data_ptr() for c in caches)
    table = _tables.get(key)
    if table is None:  # once per layer group: a worker's caches never move
        if len(_tables) >= 4096:
            _tables.clear()
        table = _tables[key] = torch.tensor(key, dtype=torch.int64).to(caches[0].device)
    return table


def _launch(caches: list[torch.Tensor], staging: torch.Tensor, ids: torch.Tensor, gather: bool) -> bool:
    """Run the kernel if it applies here; False means the caller should use the torch ops."""
    if not _use_kernel(caches[0]) or not (staging.is_contiguous() and all(c.is_contiguous() for c in caches)):
        return False
    if ids.numel() == 0:
        return True
    block_elems = caches[0][0, 0].numel()
    grid = (ids.numel(), 2 * len(caches), triton.cdiv(block_elems, CHUNK))
    _copy_blocks_kernel[grid](_table(caches), staging, ids, block_elems, caches[0].stride(0), staging.stride(0),
                              staging.stride(1), GATHER=gather, CHUNK=CHUNK, num_warps=4)
    return True


def gather_blocks(caches: list[torch.Tensor], ids: torch.Tensor, out: torch.Tensor) -> None:
    """``out[j, kv, i] = caches[j][kv, ids[i]]``: one launch for every layer; ``ids`` int64 on their device."""
    _check(caches, out, ids)
    if not _launch(caches, out, ids, True):
        for j, cache in enumerate(caches):
            torch.index_select(cache, 1, ids, out=out[j])


def scatter_blocks(staging: torch.Tensor, caches: list[torch.Tensor], ids: torch.Tensor) -> None:
    """``caches[j][kv, ids[i]] = staging[j, kv, i]``: one launch for every layer."""
    _check(caches, staging, ids)
    if not _launch(caches, staging, ids, False):
        for j, cache in enumerate(caches):
            cache.index_copy_(1, ids, staging[j])
