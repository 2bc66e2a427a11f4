"""The nccl transport's block gather and scatter kernels, run by Triton's interpreter on the CPU, copy exactly
what the torch ops copy: every block the ids name, in every layer of the message, and nothing else.

Sizes are tiny (the interpreter runs each program in numpy); a block of 40 elements with a chunk of 16 also
covers the masked tail of a block. tests/gpu runs the compiled kernels at real sizes.
"""

from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("interpreter tests run on CPU-only machines", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, so before the first import
pytest.importorskip("triton")

import triton.runtime.interpreter as _interpreter

from kvtransfer import block_copy

if not isinstance(block_copy._copy_blocks_kernel, _interpreter.InterpretedFunction):
    pytest.skip("the kernel was imported before TRITON_INTERPRET was set", allow_module_level=True)


@pytest.fixture
def kernel(monkeypatch):
    """The kernel on CPU tensors, in chunks of 16 elements so that 40-element blocks end in a partial one."""
    monkeypatch.setattr(block_copy, "_use_kernel", lambda cache: True)
    monkeypatch.setattr(block_copy, "CHUNK", 16)


def _caches(num_layers: int, num_blocks: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, num_blocks, 4, 2, 5, generator=g).to(dtype)  # blocks of 4 tokens x 2 heads x 5 dims
            for _ in range(num_layers)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_gather_matches_index_select(kernel, dtype, num_layers):
    caches = _caches(num_layers, 12, dtype, 0)
    ids = torch.tensor([7, 0, 11, 3, 4])
    out = torch.full((num_layers, 2, 5, 4, 2, 5), -7.0, dtype=dtype)
    block_copy.gather_blocks(caches, ids, out)
    assert torch.equal(out, torch.stack([c.index_select(1, ids) for c in caches]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scatter_matches_index_copy_and_leaves_other_blocks(kernel, dtype):
    caches = _caches(3, 12, dtype, 1)
    expected = [c.clone() for c in caches]
    staging = torch.stack(_caches(3, 5, dtype, 2))
    ids = torch.tensor([9, 2, 5, 10, 1])
    block_copy.scatter_blocks(staging, caches, ids)
    for j, c in enumerate(expected):
        c.index_copy_(1, ids, staging[j])
    assert all(torch.equal(a, b) for a, b in zip(caches, expected))


def test_a_message_slice_of_a_ring_buffer(kernel):
    """The consumer scatters buffer[:n], the layers of a short last message, into caches it names out of order."""
    buffer = torch.stack(_caches(4, 4, torch.bfloat16, 3))
    caches = [torch.zeros(2, 8, 4, 2, 5, dtype=torch.bfloat16) for _ in range(3)]
    ids = torch.tensor([6, 1, 3, 0])
    block_copy.scatter_blocks(buffer[:2], [caches[2], caches[0]], ids)
    assert torch.equal(caches[2][:, ids], buffer[0]) and torch.equal(caches[0][:, ids], buffer[1])
    assert not caches[1].any() and not caches[0][:, [2, 4, 5, 7]].any()


def test_torch_path_and_mismatches():
    caches = _caches(2, 6, torch.float32, 4)
    out = torch.empty(2, 2, 2, 4, 2, 5)
    block_copy.gather_blocks(caches, torch.tensor([5, 1]), out)  # no kernel off CUDA
    assert torch.equal(out, torch.stack([c[:, [5, 1]] for c in caches]))
    with pytest.raises(ValueError, match="ids"):
        block_copy.gather_blocks(caches, torch.tensor([1, 2, 3]), out)
    with pytest.raises(ValueError, match="do not match"):
        block_copy.scatter_blocks(torch.empty(2, 2, 2, 4, 2, 6), caches, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="do not match"):
        block_copy.scatter_blocks(out, caches[:1], torch.tensor([0, 1]))
