"""The Triton attention kernels, run by Triton's interpreter on the CPU, agree with the torch reference backend.

Every case draws random Q/K/V and a random prefix in the cache; cache slots no
request owns hold a large poison value, so a kernel that reads past a
request's length or through a padded block-table entry gives a visibly wrong
answer. Sizes are tiny: the interpreter runs each program in numpy.
"""

from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available():
    # a CUDA process runs the same checks compiled, in tests/gpu; the interpreter would shadow those kernels
    pytest.skip("interpreter tests run on CPU-only machines", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, so before the first import
pytest.importorskip("triton")
import triton.runtime.interpreter as _interpreter


def _patch_tensor_index(patch_lang_tensor):
    """Triton 3.6's interpreter turns a loop bound into an int with int() on a 1-element array, which
    NumPy >= 2.4 refuses; .item() accepts it. Only the interpreter is touched, and only in this module."""
    def patched(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))
    return patched


_interpreter._patch_lang_tensor = _patch_tensor_index(_interpreter._patch_lang_tensor)

from common.errors import ConfigError  # noqa: E402
from engine.attention import select_backend  # noqa: E402
from engine.attention.base import AttentionBatch, kv_cache_shape, write_kv  # noqa: E402
from engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from engine.attention.triton_kernels import (  # noqa: E402
    _decode_kernel,
    decode_attention,
    num_decode_splits,
    prefill_attention,
    write_kv_cache,
)

if not isinstance(_decode_kernel, _interpreter.InterpretedFunction):
    pytest.skip("the kernels were imported before TRITON_INTERPRET was set", allow_module_level=True)

POISON = 1.0e3
HEAD_DIM = 16
SCALE = HEAD_DIM ** -0.5


def _batch(specs: list[tuple[int, int]], block_size: int, num_blocks: int, gen: torch.Generator,
           pad_blocks: int = 0) -> AttentionBatch:
    """specs: (num_computed, query_len) per request; blocks are drawn at random from the pool."""
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables: list[list[int]] = []
    slots: list[int] = []
    for num_computed, query_len in specs:
        seq_len = num_computed + query_len
        ids = [perm.pop() for _ in range(-(-seq_len // block_size))]
        tables.append(ids)
        slots += [ids[p // block_size] * block_size + p % block_size for p in range(num_computed, seq_len)]
    width = max(len(t) for t in tables) + pad_blocks
    block_tables = torch.zeros(len(specs), width, dtype=torch.int32)
    for i, ids in enumerate(tables):
        block_tables[i, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
    query_lens = [n for _, n in specs]
    seq_lens = [c + n for c, n in specs]
    starts = torch.zeros(len(specs) + 1, dtype=torch.int32)
    starts[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    return AttentionBatch(query_start_loc=starts, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                          block_tables=block_tables, slot_mapping=torch.tensor(slots, dtype=torch.int64),
                          query_lens_host=query_lens, seq_lens_host=seq_lens, block_size=block_size)


def _cache(batch: AttentionBatch, num_blocks: int, num_kv_heads: int, gen: torch.Generator,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random K/V for every request's cached prefix, POISON everywhere else."""
    bs = batch.block_size
    cache = torch.full(kv_cache_shape(num_blocks, bs, num_kv_heads, HEAD_DIM), POISON)
    flat = cache.view(2, num_blocks * bs, num_kv_heads, HEAD_DIM)
    for i, (seq_len, query_len) in enumerate(zip(batch.seq_lens_host, batch.query_lens_host)):
        for p in range(seq_len - query_len):
            slot = int(batch.block_tables[i, p // bs]) * bs + p % bs
            flat[:, slot] = torch.randn(2, num_kv_heads, HEAD_DIM, generator=gen)
    return cache.to(dtype)


def _qkv(num_tokens: int, num_heads: int, num_kv_heads: int, gen: torch.Generator, dtype=torch.float32):
    def rnd(h):
        return torch.randn(num_tokens, h, HEAD_DIM, generator=gen).to(dtype)
    return rnd(num_heads), rnd(num_kv_heads), rnd(num_kv_heads)


def _reference(batch, q, k, v, cache, window):
    """The torch backend in fp32: its output and its (fp32) copy of the cache after the step."""
    cache = cache.float().clone()
    backend = TorchAttentionBackend()
    out = backend.forward(q.float(), k.float(), v.float(), cache, backend.build_metadata(batch),
                          scale=SCALE, sliding_window=window)
    return out, cache


def test_num_decode_splits_follows_static_shapes():
    assert num_decode_splits(1, 8, 256, 132) == 1  # a short context: no reduce
    assert num_decode_splits(128, 8, 8192, 132) == 1  # the batch already fills the GPU
    assert num_decode_splits(1, 8, 8192, 132) == 32  # one long request: 256-token splits
    assert 1 < num_decode_splits(8, 8, 8192, 132) < 32
    assert num_decode_splits(1, 1, 1 << 20, 132, max_splits=64) == 64


def test_write_kv_matches_index_copy_and_skips_negative_slots():
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(kv_cache_shape(6, 4, 2, HEAD_DIM), generator=gen)
    k = torch.randn(5, 2, HEAD_DIM, generator=gen)
    v = torch.randn(5, 2, HEAD_DIM, generator=gen)
    slots = torch.tensor([3, 17, 0, 22, 9])
    expected = cache.clone()
    write_kv(expected, k, v, slots)
    got = cache.clone()
    write_kv_cache(got, k, v, slots)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    skipped = cache.clone()
    write_kv_cache(skipped, k, v, torch.tensor([3, -1, 0, -1, 9]))
    write_kv(cache, k[[0, 2, 4]], v[[0, 2, 4]], torch.tensor([3, 0, 9]))
    torch.testing.assert_close(skipped, cache, rtol=0, atol=0)


@pytest.mark.parametrize("heads", [(8, 2), (4, 4), (6, 2)])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_torch(heads, window, num_splits):
    num_heads, num_kv_heads = heads
    gen = torch.Generator().manual_seed(num_heads * 10 + num_splits + (window or 0))
    bs, num_blocks = 8, 48
    lens = [1, 7, 8, 9, 15, 16, 17, 33]
    batch = _batch([(n - 1, 1) for n in lens], bs, num_blocks, gen, pad_blocks=1)
    cache = _cache(batch, num_blocks, num_kv_heads, gen)
    q, k, v = _qkv(len(lens), num_heads, num_kv_heads, gen)
    ref, ref_cache = _reference(batch, q, k, v, cache, window)
    write_kv_cache(cache, k, v, batch.slot_mapping)
    torch.testing.assert_close(cache, ref_cache, rtol=0, atol=0)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, cache, batch.block_tables, batch.seq_lens, out, scale=SCALE, sliding_window=window,
                     num_splits=num_splits, block_n=16)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_decode_padded_rows_graph_path():
    """The CUDA-graph path: static tables with padded rows (seq_len 0, slot -1) give zeros and store nothing."""
    gen = torch.Generator().manual_seed(7)
    bs, num_blocks, num_heads, num_kv_heads = 4, 32, 8, 2
    real = _batch([(4, 1), (10, 1), (0, 1)], bs, num_blocks, gen)
    cache = _cache(real, num_blocks, num_kv_heads, gen)
    q, k, v = _qkv(5, num_heads, num_kv_heads, gen)
    ref, ref_cache = _reference(real, q[:3], k[:3], v[:3], cache, None)

    width = 6  # a static bound wider than any live table
    tables = torch.zeros(5, width, dtype=torch.int32)
    tables[:3, :real.block_tables.shape[1]] = real.block_tables
    seq_lens = torch.cat([real.seq_lens, torch.zeros(2, dtype=torch.int32)])
    slots = torch.cat([real.slot_mapping, torch.full((2,), -1)])
    backend = TritonAttentionBackend(min_split_tokens=8)
    meta = backend.build_decode_metadata(tables, seq_lens, slots)
    out = backend.forward(q, k, v, cache, meta, scale=SCALE, sliding_window=None)
    assert meta.decode.splits[(num_heads, num_kv_heads, HEAD_DIM)][0] == 3  # 24 tokens / 8, the static bound
    torch.testing.assert_close(out[:3], ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(out[3:], torch.zeros_like(out[3:]))
    torch.testing.assert_close(cache, ref_cache, rtol=0, atol=0)


@pytest.mark.parametrize("heads", [(8, 2), (4, 4), (6, 2)])
@pytest.mark.parametrize("window", [None, 5])
def test_prefill_matches_torch(heads, window):
    """Empty and cached prefixes, chunks shorter and longer than a tile and not multiples of it."""
    num_heads, num_kv_heads = heads
    gen = torch.Generator().manual_seed(num_heads + (window or 0))
    bs, num_blocks = 4, 64
    specs = [(0, 13), (0, 2), (9, 11), (16, 5), (3, 22)]
    batch = _batch(specs, bs, num_blocks, gen)
    cache = _cache(batch, num_blocks, num_kv_heads, gen)
    q, k, v = _qkv(sum(n for _, n in specs), num_heads, num_kv_heads, gen)
    ref, _ = _reference(batch, q, k, v, cache, window)
    write_kv_cache(cache, k, v, batch.slot_mapping)
    out = torch.full_like(q, float("nan"))
    rows = torch.arange(len(specs), dtype=torch.int32)
    prefill_attention(q, cache, batch.block_tables, batch.query_start_loc, batch.seq_lens, rows, out,
                      max_query_len=batch.max_query_len, scale=SCALE, sliding_window=window,
                      block_m=16, block_n=8)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("window", [None, 7])
def test_backend_mixed_batch_matches_torch(heads, window):
    """Prefill chunks and decodes interleaved in one flat batch, through build_metadata and forward."""
    num_heads, num_kv_heads = heads
    gen = torch.Generator().manual_seed(100 + num_heads + (window or 0))
    bs, num_blocks = 8, 64
    specs = [(20, 1), (0, 19), (5, 1), (0, 1), (12, 37), (40, 1), (31, 2)]
    batch = _batch(specs, bs, num_blocks, gen)
    cache = _cache(batch, num_blocks, num_kv_heads, gen)
    q, k, v = _qkv(sum(n for _, n in specs), num_heads, num_kv_heads, gen)
    ref, ref_cache = _reference(batch, q, k, v, cache, window)
    backend = TritonAttentionBackend(min_split_tokens=16)
    meta = backend.build_metadata(batch)
    out = backend.forward(q, k, v, cache, meta, scale=SCALE, sliding_window=window)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache, ref_cache, rtol=0, atol=0)
    # the same metadata serves a second layer
    cache2 = _cache(batch, num_blocks, num_kv_heads, gen)
    q2, k2, v2 = _qkv(q.shape[0], num_heads, num_kv_heads, gen)
    ref2, _ = _reference(batch, q2, k2, v2, cache2, window)
    torch.testing.assert_close(backend.forward(q2, k2, v2, cache2, meta, scale=SCALE, sliding_window=window),
                               ref2, rtol=1e-4, atol=1e-4)


def test_backend_decode_only_batch_fp16():
    gen = torch.Generator().manual_seed(3)
    bs, num_blocks = 8, 32
    batch = _batch([(30, 1), (2, 1), (17, 1)], bs, num_blocks, gen)
    cache = _cache(batch, num_blocks, 2, gen, torch.float16)
    q, k, v = _qkv(3, 8, 2, gen, torch.float16)
    ref, _ = _reference(batch, q, k, v, cache, None)
    backend = TritonAttentionBackend(min_split_tokens=8)
    out = backend.forward(q, k, v, cache, backend.build_metadata(batch), scale=SCALE, sliding_window=None)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


class _FakeFlashAttn:
    """flash-attn 2.8's two entry points as documented (paged K/V through block_table, bottom-right causal
    mask, window (left, right)), in plain torch, with its argument checks: the backend's plumbing is
    exercised on CPU; tests/gpu compares the real package."""

    @staticmethod
    def _attend(q, k_cache, v_cache, table, seq_len, scale, window):
        bs = k_cache.shape[1]
        assert bs % 256 == 0 and table.dtype == torch.int32 and q.dtype in (torch.float16, torch.bfloat16)
        pos = torch.arange(seq_len)
        slots = table[pos // bs].long() * bs + pos % bs
        k = k_cache.flatten(0, 1)[slots].float().transpose(0, 1)  # [Hkv, L, D]
        v = v_cache.flatten(0, 1)[slots].float().transpose(0, 1)
        q_pos = torch.arange(seq_len - q.shape[0], seq_len)[:, None]
        mask = pos[None, :] <= q_pos
        if window[0] >= 0:
            mask &= pos[None, :] >= q_pos - window[0]
        out = torch.nn.functional.scaled_dot_product_attention(
            q.float().transpose(0, 1), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return out.transpose(0, 1).to(q.dtype)

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                               block_table=None):
        assert causal and window_size[1] in (0, -1) and cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        q_lens, k_lens = cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist()
        assert max_seqlen_q == max(q_lens) and max_seqlen_k == max(k_lens)
        starts = cu_seqlens_q.tolist()
        return torch.cat([self._attend(q[starts[i]:starts[i + 1]], k, v, block_table[i], k_lens[i],
                                       softmax_scale, window_size) for i in range(len(q_lens))])

    def flash_attn_with_kvcache(self, q, k_cache, v_cache, cache_seqlens=None, block_table=None,
                                softmax_scale=None, causal=False, window_size=(-1, -1)):
        assert causal and window_size[1] in (0, -1) and cache_seqlens.dtype == torch.int32 and q.shape[1] == 1
        return torch.stack([self._attend(q[i], k_cache, v_cache, block_table[i], int(cache_seqlens[i]),
                                         softmax_scale, window_size) for i in range(q.shape[0])])


@pytest.mark.parametrize("window", [None, 100])
def test_flash_attn_backend_plumbing(monkeypatch, window):
    from engine.attention.flash_attn_backend import FlashAttnBackend

    monkeypatch.setitem(__import__("sys").modules, "flash_attn", _FakeFlashAttn())
    backend = FlashAttnBackend(block_size=256)
    gen = torch.Generator().manual_seed(11)
    for specs in ([(300, 1), (0, 1), (40, 1)], [(300, 1), (0, 70), (200, 90), (5, 1)]):
        batch = _batch(specs, 256, 8, gen)
        cache = _cache(batch, 8, 2, gen, torch.bfloat16)
        q, k, v = _qkv(sum(n for _, n in specs), 8, 2, gen, torch.bfloat16)
        ref, ref_cache = _reference(batch, q, k, v, cache, window)
        out = backend.forward(q, k, v, cache, backend.build_metadata(batch), scale=SCALE, sliding_window=window)
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(cache.float(), ref_cache, rtol=0, atol=0)


def test_flash_attn_rejects_small_blocks_and_auto_falls_back():
    from engine.attention.flash_attn_backend import FlashAttnBackend

    with pytest.raises(ConfigError) as err:
        FlashAttnBackend(block_size=16)
    assert err.value.field == "block_size"
    assert select_backend("auto", torch.device("cpu"), block_size=16).name == "torch"
