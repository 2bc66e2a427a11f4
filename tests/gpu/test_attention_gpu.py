"""The fast attention backends agree with the torch reference on the GPU, at Llama-3-8B shapes.

bf16 inputs (fp16 and fp32 once each), 32 query heads over 8 KV heads, head_dim
128, blocks of 16 tokens (256 for flash-attn), contexts up to 8k. The reference
is the torch backend run in fp32 on upcast copies; the check is each token's
relative error ``|out - ref| / |ref|`` over its heads.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from engine.attention.base import AttentionBatch, kv_cache_shape
from engine.attention.torch_backend import TorchAttentionBackend

pytestmark = pytest.mark.gpu

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
SCALE = HEAD_DIM ** -0.5
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
DEVICE = torch.device("cuda")


def _case(specs: list[tuple[int, int]], *, block_size: int = 16, dtype=torch.bfloat16, seed: int = 0,
          pad_blocks: int = 0):
    """A batch of (num_computed, query_len) requests on random blocks, a random cache and random q/k/v."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in specs]
    counts = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(counts) + 4
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(counts) + pad_blocks
    tables = torch.zeros(len(specs), width, dtype=torch.int32)
    slots = []
    used = 0
    for i, ((num_computed, query_len), n) in enumerate(zip(specs, counts)):
        tables[i, :n] = perm[used:used + n].int()
        used += n
        pos = torch.arange(num_computed, num_computed + query_len)
        slots.append(tables[i, pos // block_size].long() * block_size + pos % block_size)
    query_lens = [n for _, n in specs]
    starts = torch.zeros(len(specs) + 1, dtype=torch.int32)
    starts[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    batch = AttentionBatch(query_start_loc=starts.to(DEVICE), seq_lens=torch.tensor(seq_lens, dtype=torch.int32,
                                                                                    device=DEVICE),
                           block_tables=tables.to(DEVICE), slot_mapping=torch.cat(slots).to(DEVICE),
                           query_lens_host=query_lens, seq_lens_host=seq_lens, block_size=block_size)
    dgen = torch.Generator(DEVICE).manual_seed(seed)
    cache = torch.randn(kv_cache_shape(num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM), generator=dgen,
                        device=DEVICE).to(dtype)
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, generator=dgen, device=DEVICE).to(dtype)
    k = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=dgen, device=DEVICE).to(dtype)
    v = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=dgen, device=DEVICE).to(dtype)
    return batch, cache, q, k, v


def _reference(batch, cache, q, k, v, window):
    backend = TorchAttentionBackend()
    return backend.forward(q.float(), k.float(), v.float(), cache.float(), backend.build_metadata(batch),
                           scale=SCALE, sliding_window=window)


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == dtype
    diff = (out.float() - ref).flatten(1).norm(dim=1)
    rel = diff / ref.flatten(1).norm(dim=1).clamp_min(1e-6)
    assert torch.isfinite(out).all()
    worst = int(rel.argmax())
    assert rel.max().item() < TOL[dtype], f"token {worst}: relative error {rel.max().item():.3g}"


def _run(backend, batch, cache, q, k, v, window):
    return backend.forward(q, k, v, cache, backend.build_metadata(batch), scale=SCALE, sliding_window=window)


DECODE_LENS = [1, 15, 16, 17, 255, 256, 257, 1000, 4095, 4096, 4097, 8191, 8192]


@pytest.mark.parametrize("window", [None, 4096])
@pytest.mark.parametrize("num_splits", [1, 4, 37])
def test_triton_decode_kernel(window, num_splits):
    from engine.attention.triton_kernels import decode_attention, write_kv_cache

    batch, cache, q, k, v = _case([(n - 1, 1) for n in DECODE_LENS], seed=num_splits, pad_blocks=3)
    ref = _reference(batch, cache, q, k, v, window)
    write_kv_cache(cache, k, v, batch.slot_mapping)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, cache, batch.block_tables, batch.seq_lens, out, scale=SCALE, sliding_window=window,
                     num_splits=num_splits)
    _check(out, ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_backend_decode_batch(dtype):
    from engine.attention.triton_backend import TritonAttentionBackend

    batch, cache, q, k, v = _case([(n - 1, 1) for n in DECODE_LENS], dtype=dtype, seed=1)
    ref = _reference(batch, cache, q, k, v, None)
    _check(_run(TritonAttentionBackend(), batch, cache, q, k, v, None), ref, dtype)


@pytest.mark.parametrize("window", [None, 1000])
def test_triton_backend_prefill_and_mixed(window):
    from engine.attention.triton_backend import TritonAttentionBackend

    specs = [(0, 2000), (3000, 517), (0, 1), (7000, 1), (4095, 130), (100, 1), (0, 63), (8000, 192)]
    batch, cache, q, k, v = _case(specs, seed=2)
    ref = _reference(batch, cache, q, k, v, window)
    _check(_run(TritonAttentionBackend(), batch, cache, q, k, v, window), ref, torch.bfloat16)


def test_triton_prefill_long_prompt():
    from engine.attention.triton_backend import TritonAttentionBackend

    batch, cache, q, k, v = _case([(0, 8192)], seed=3)
    ref = _reference(batch, cache, q, k, v, None)
    _check(_run(TritonAttentionBackend(), batch, cache, q, k, v, None), ref, torch.bfloat16)


def test_triton_decode_cuda_graph_replay():
    """Capture one decode forward on static tensors, change their contents, replay: matches the reference."""
    from engine.attention.triton_backend import TritonAttentionBackend

    num_requests, width = 8, 512  # static bound: 512 blocks of 16 = 8192 tokens
    batch, cache, q, k, v = _case([(n - 1, 1) for n in [5, 300, 8192, 17, 4000, 1, 2500, 64]], seed=4)
    static_tables = torch.zeros(num_requests, width, dtype=torch.int32, device=DEVICE)
    static_lens = torch.zeros(num_requests, dtype=torch.int32, device=DEVICE)
    static_slots = torch.full((num_requests,), -1, dtype=torch.int64, device=DEVICE)
    static_q, static_k, static_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    backend = TritonAttentionBackend()
    meta = backend.build_decode_metadata(static_tables, static_lens, static_slots)

    def step():
        return backend.forward(static_q, static_k, static_v, cache, meta, scale=SCALE, sliding_window=None)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles the kernels and allocates the split scratch outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()

    live = 6  # rows 6 and 7 stay padding
    ref = _reference(_slice(batch, live), cache, q[:live], k[:live], v[:live], None)
    static_tables[:live, :batch.block_tables.shape[1]] = batch.block_tables[:live]
    static_lens[:live] = batch.seq_lens[:live]
    static_slots[:live] = batch.slot_mapping[:live]
    static_q[:live], static_k[:live], static_v[:live] = q[:live], k[:live], v[:live]
    graph.replay()
    torch.cuda.synchronize()
    _check(static_out[:live], ref, torch.bfloat16)
    assert torch.isfinite(static_out[live:]).all()


def _slice(batch: AttentionBatch, n: int) -> AttentionBatch:
    return AttentionBatch(batch.query_start_loc[:n + 1], batch.seq_lens[:n], batch.block_tables[:n],
                          batch.slot_mapping[:n], batch.query_lens_host[:n], batch.seq_lens_host[:n],
                          batch.block_size)


flash_attn_missing = importlib.util.find_spec("flash_attn") is None


@pytest.mark.skipif(flash_attn_missing, reason="flash-attn is not installed")
@pytest.mark.parametrize("window", [None, 1000])
def test_flash_attn_matches_torch(window):
    from engine.attention.flash_attn_backend import FlashAttnBackend

    backend = FlashAttnBackend(block_size=256)
    decode, cache, q, k, v = _case([(n - 1, 1) for n in DECODE_LENS], block_size=256, seed=5)
    ref = _reference(decode, cache, q, k, v, window)
    _check(_run(backend, decode, cache, q, k, v, window), ref, torch.bfloat16)
    mixed, cache, q, k, v = _case([(0, 2000), (3000, 517), (7000, 1), (0, 1), (8000, 192)], block_size=256,
                                  seed=6)
    ref = _reference(mixed, cache, q, k, v, window)
    _check(_run(backend, mixed, cache, q, k, v, window), ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kv_block_copy_kernels_match_torch(dtype):
    """The nccl transport's gather and scatter kernels, compiled, on 4 layers of Llama-3-8B's block shape."""
    from kvtransfer.block_copy import gather_blocks, scatter_blocks

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    caches = [torch.randn(2, 300, 16, NUM_KV_HEADS, HEAD_DIM, generator=gen, device=DEVICE).to(dtype)
              for _ in range(4)]
    ids = torch.randperm(300, generator=gen, device=DEVICE)[:256]
    out = torch.full((4, 2, 256, 16, NUM_KV_HEADS, HEAD_DIM), -3.0, dtype=dtype, device=DEVICE)
    gather_blocks(caches, ids, out)
    assert torch.equal(out, torch.stack([c.index_select(1, ids) for c in caches]))
    targets = [torch.zeros_like(c) for c in caches]
    scatter_blocks(out, targets, ids)
    for j, target in enumerate(targets):
        expected = torch.zeros_like(target).index_copy_(1, ids, out[j])
        assert torch.equal(target, expected)
