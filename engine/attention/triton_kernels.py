"""Triton kernels over the paged KV cache: KV write, split-K decode, and prefill over a cached prefix.

Every kernel reads one layer's cache ``[2, num_blocks, block_size, num_kv_heads,
head_dim]`` through ``block_tables`` (K is ``kv_cache[0]``, V ``kv_cache[1]``);
tokens of one block tile are gathered one page id per key, so a tile may span
several blocks and the block size only has to be a power of two.

* ``write_kv_cache``: one program per new token stores its K and V rows at
  ``slot_mapping[t]``; a negative slot is skipped (padded rows of a graph).
* ``decode_attention`` (one query per request): grid ``(requests, kv_heads,
  splits)``. A program loads the ``num_heads // num_kv_heads`` query heads that
  share its KV head as one ``[QH_PAD, D]`` tile (K/V are read once per group),
  takes its share of the request's context (the window, when there is one, cut
  into ``splits`` equal tile-aligned pieces), and keeps an online softmax in
  fp32. With one split it writes the output; otherwise it writes a partial
  (unnormalised accumulator, running max, running sum) and
  ``_decode_reduce_kernel`` merges the splits. Nothing is read back to the host
  and the split count comes from static shapes (``num_decode_splits``), so a
  decode step can be captured in a CUDA graph.
* ``prefill_attention`` (a query chunk after ``num_computed`` cached tokens):
  grid ``(prefill requests, query tiles, kv_heads)``. A tile holds
  ``BLOCK_M // QH`` query tokens times the ``QH`` query heads of one KV head
  (rows are (token, head) pairs), so GQA shares every K/V load. Key tiles that
  every row may see run without masks; only the tiles on the causal diagonal
  and at the lower edge of a sliding window are masked.

Scores are scaled by ``scale * log2(e)`` and exponentiated with ``exp2``.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# running-max start: finite, so exp2(m_old - m_new) never sees inf - inf
_NEG_INIT: tl.constexpr = tl.constexpr(-1.0e30)


@functools.cache
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_decode_splits(num_requests: int, num_kv_heads: int, max_context: int, sms: int, *,
                      min_split_tokens: int = 256, max_splits: int = 64) -> int:
    """Splits of each request's context: enough programs to fill the GPU, none shorter than ``min_split_tokens``.

    A pure function of static shapes (the padded batch size and the block
    table's width), never of the sequence lengths, so a captured decode graph
    keeps its grid. Short contexts get one split (no reduce kernel).
    """
    programs = max(1, num_requests * num_kv_heads)
    wanted = -(-4 * sms // programs)  # ~4 programs per SM keep enough loads in flight
    fits = max(1, max_context // min_split_tokens)
    return max(1, min(wanted, fits, max_splits))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: three tf32 products per dot, fp32-level accuracy on the tensor cores ("ieee" falls back
    # to FMAs and spills at these tiles on sm_90); fp16/bf16 ignore the setting
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _cache_strides(kv_cache: torch.Tensor) -> tuple[int, int, int]:
    assert kv_cache.stride(-1) == 1, "the KV cache's head_dim must be contiguous"
    return kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# ---------------------------------------------------------------------------------------------- KV write


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_ct, stride_ch,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     BLOCK_HD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    i = tl.arange(0, BLOCK_HD)
    head = i // HEAD_DIM
    d = i % HEAD_DIM
    mask = i < NUM_KV_HEADS * HEAD_DIM
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + head * stride_ch + d
    k = tl.load(k_ptr + t * stride_kt + head * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + head * stride_vh + d, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store ``k``/``v`` ([T, Hkv, D]) at ``slot_mapping`` ([T]); slots < 0 are skipped."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = _rows_contiguous(k), _rows_contiguous(v)
    stride_cb, stride_ct, stride_ch = _cache_strides(kv_cache)
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_cache[0], kv_cache[1], slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), stride_cb, stride_ct, stride_ch,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_HD=triton.next_power_of_2(num_kv_heads * head_dim), num_warps=4)


# ------------------------------------------------------------------------------------------------- decode


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, token_idx_ptr,
                   out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
                   scale_log2, window,
                   stride_qt, stride_qh, stride_ot, stride_oh,
                   stride_cb, stride_ct, stride_ch, stride_bt,
                   QH: tl.constexpr, QH_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BLOCK_N: tl.constexpr, HAS_TOKEN_IDX: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
                   PRECISION: tl.constexpr):
    req = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    num_heads = tl.num_programs(1) * QH
    if HAS_TOKEN_IDX:
        tok = tl.load(token_idx_ptr + req).to(tl.int64)
    else:
        tok = req.to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + req)

    # this split's share of the attended range [lo, seq_len); padded rows (seq_len 0) get an empty one
    lo = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)
    per_split = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, seq_len)

    heads = tl.arange(0, QH_PAD)
    head_ok = heads < QH
    q_head = kvh * QH + heads
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + tok * stride_qt + q_head[:, None] * stride_qh + d[None, :],
                mask=head_ok[:, None], other=0.0)

    m_i = tl.full([QH_PAD], _NEG_INIT, tl.float32)
    l_i = tl.zeros([QH_PAD], tl.float32)
    acc = tl.zeros([QH_PAD, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + req.to(tl.int64) * stride_bt
    head_off = kvh * stride_ch
    for start_n in range(start, end, BLOCK_N):
        offs = start_n + tl.arange(0, BLOCK_N)
        valid = offs < end
        page = tl.load(bt_row + offs // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        kv_off = page * stride_cb + (offs % BLOCK_SIZE) * stride_ct + head_off
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if SINGLE_SPLIT:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + tok * stride_ot + q_head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
    else:
        part = (req.to(tl.int64) * num_heads + q_head) * num_splits + split  # [QH_PAD]
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=head_ok[:, None])
        tl.store(part_m_ptr + part, m_i, mask=head_ok)
        tl.store(part_l_ptr + part, l_i, mask=head_ok)


@triton.jit
def _decode_reduce_kernel(part_acc_ptr, part_m_ptr, part_l_ptr, token_idx_ptr, out_ptr,
                          num_splits, stride_ot, stride_oh,
                          HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr, HAS_TOKEN_IDX: tl.constexpr):
    req = tl.program_id(0)
    head = tl.program_id(1)
    if HAS_TOKEN_IDX:
        tok = tl.load(token_idx_ptr + req).to(tl.int64)
    else:
        tok = req.to(tl.int64)
    s = tl.arange(0, SPLITS_PAD)
    s_ok = s < num_splits
    d = tl.arange(0, HEAD_DIM)
    part = (req.to(tl.int64) * tl.num_programs(1) + head) * num_splits + s
    m = tl.load(part_m_ptr + part, mask=s_ok, other=float("-inf"))
    sums = tl.load(part_l_ptr + part, mask=s_ok, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)
    w = tl.exp2(m - tl.max(m, 0))  # empty splits carry m = _NEG_INIT and sum 0: they add nothing
    denom = tl.sum(w * sums, 0)
    o = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + tok * stride_ot + head * stride_oh + d, o.to(out_ptr.dtype.element_ty))


def decode_scratch(num_requests: int, num_heads: int, num_splits: int, head_dim: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial results of the splits (fp32): accumulator, running max, running sum."""
    acc = torch.empty(num_requests, num_heads, num_splits, head_dim, dtype=torch.float32, device=device)
    m = torch.empty(num_requests, num_heads, num_splits, dtype=torch.float32, device=device)
    return acc, m, torch.empty_like(m)


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, out: torch.Tensor, *, scale: float, sliding_window: int | None,
                     num_splits: int, token_idx: torch.Tensor | None = None,
                     scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                     block_n: int | None = None) -> None:
    """Attend one query token per request over its paged context; writes ``out``.

    ``q``/``out`` are ``[T, Hq, D]``; request ``b`` reads and writes token
    ``token_idx[b]`` (token ``b`` when ``token_idx`` is None). ``block_tables``
    ``[B, max_blocks]`` int32 and ``seq_lens`` ``[B]`` int32; a row with
    ``seq_len`` 0 reads nothing and gets zeros. Launches only, no host reads.
    """
    num_requests = block_tables.shape[0]
    _, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[3]
    if num_requests == 0:
        return
    assert num_heads % num_kv_heads == 0 and head_dim >= 16 and head_dim & (head_dim - 1) == 0
    assert block_tables.stride(1) == 1 and out.stride(-1) == 1
    q = _rows_contiguous(q)
    qh = num_heads // num_kv_heads
    stride_cb, stride_ct, stride_ch = _cache_strides(kv_cache)
    if block_n is None:
        block_n = 64 if head_dim <= 128 and q.dtype != torch.float32 else 32
    single = num_splits == 1
    if single:
        part_acc = part_m = part_l = out  # unused
    else:
        if scratch is None:
            scratch = decode_scratch(num_requests, num_heads, num_splits, head_dim, q.device)
        part_acc, part_m, part_l = scratch
        assert part_acc.shape == (num_requests, num_heads, num_splits, head_dim)
    has_idx = token_idx is not None
    idx = token_idx if has_idx else seq_lens  # any int tensor when unused
    _decode_kernel[(num_requests, num_kv_heads, num_splits)](
        q, kv_cache[0], kv_cache[1], block_tables, seq_lens, idx,
        out, part_acc, part_m, part_l,
        scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        stride_cb, stride_ct, stride_ch, block_tables.stride(0),
        QH=qh, QH_PAD=max(16, triton.next_power_of_2(qh)), HEAD_DIM=head_dim, BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_N=block_n, HAS_TOKEN_IDX=has_idx, SINGLE_SPLIT=single, PRECISION=_precision(q.dtype),
        num_warps=4, num_stages=2)
    if not single:
        _decode_reduce_kernel[(num_requests, num_heads)](
            part_acc, part_m, part_l, idx, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
            HAS_TOKEN_IDX=has_idx, num_warps=4)


# ------------------------------------------------------------------------------------------------ prefill


@triton.jit
def _prefill_key_tile(acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row, head_off, d,
                      start_n, seq_len, window, scale_log2, stride_cb, stride_ct,
                      BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                      PRECISION: tl.constexpr):
    offs = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        in_seq = offs < seq_len
        page = tl.load(bt_row + offs // BLOCK_SIZE, mask=in_seq, other=0).to(tl.int64)
        kv_off = page * stride_cb + (offs % BLOCK_SIZE) * stride_ct + head_off
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=in_seq[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=in_seq[:, None], other=0.0)
    else:
        page = tl.load(bt_row + offs // BLOCK_SIZE).to(tl.int64)
        kv_off = page * stride_cb + (offs % BLOCK_SIZE) * stride_ct + head_off
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :])
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :])
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    if MASKED:
        keep = (offs[None, :] <= q_pos[:, None]) & in_seq[None, :]
        keep = keep & ((window <= 0) | (offs[None, :] > q_pos[:, None] - window))
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, query_start_ptr,
                    seq_lens_ptr, rows_ptr,
                    scale_log2, window,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_cb, stride_ct, stride_ch, stride_bt,
                    QH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    row = tl.load(rows_ptr + tl.program_id(0))
    tile_start = tl.program_id(1) * BLOCK_Q
    kvh = tl.program_id(2)
    q_start = tl.load(query_start_ptr + row)
    q_len = tl.load(query_start_ptr + row + 1) - q_start
    if tile_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + row)
    num_computed = seq_len - q_len

    r = tl.arange(0, BLOCK_M)
    tok = tile_start + r // QH
    head = kvh * QH + r % QH
    row_ok = (r < BLOCK_Q * QH) & (tok < q_len)
    q_pos = num_computed + tok  # query i of the chunk sits at position num_computed + i
    d = tl.arange(0, HEAD_DIM)
    q_tok = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)

    # key tiles start at the first key any row sees; [full_lo, full_hi) is seen by every row
    q_lo = num_computed + tile_start
    q_hi = num_computed + tl.minimum(tile_start + BLOCK_Q, q_len) - 1
    k_min = tl.where(window > 0, tl.maximum(q_lo - window + 1, 0), 0)
    full_lo = tl.where(window > 0, tl.maximum(q_hi - window + 1, 0), 0)
    full_hi = q_lo + 1
    n_low = tl.cdiv(full_lo - k_min, BLOCK_N)
    n_full = tl.maximum((full_hi - k_min) // BLOCK_N, n_low)
    n_all = tl.cdiv(q_hi + 1 - k_min, BLOCK_N)

    m_i = tl.full([BLOCK_M], _NEG_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + row.to(tl.int64) * stride_bt
    head_off = kvh * stride_ch
    for j in range(0, n_low):
        acc, l_i, m_i = _prefill_key_tile(acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row, head_off,
                                          d, k_min + j * BLOCK_N, seq_len, window, scale_log2, stride_cb,
                                          stride_ct, BLOCK_SIZE, BLOCK_N, True, PRECISION)
    for j in range(n_low, n_full):
        acc, l_i, m_i = _prefill_key_tile(acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row, head_off,
                                          d, k_min + j * BLOCK_N, seq_len, window, scale_log2, stride_cb,
                                          stride_ct, BLOCK_SIZE, BLOCK_N, False, PRECISION)
    for j in range(n_full, n_all):
        acc, l_i, m_i = _prefill_key_tile(acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row, head_off,
                                          d, k_min + j * BLOCK_N, seq_len, window, scale_log2, stride_cb,
                                          stride_ct, BLOCK_SIZE, BLOCK_N, True, PRECISION)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def prefill_tiles(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M rows of (token, head), BLOCK_N keys, num_warps) for a head size and dtype."""
    if device.type != "cuda":
        return 32, 16, 4  # the interpreter: small tiles keep the numpy work short
    if dtype == torch.float32 or head_dim > 128:
        return 64, 32, 4
    return 128, 64, 8


def prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor, rows: torch.Tensor,
                      out: torch.Tensor, *, max_query_len: int, scale: float, sliding_window: int | None,
                      block_m: int | None = None, block_n: int | None = None) -> None:
    """Causal attention of the query chunks of batch rows ``rows`` over their cached context; writes ``out``.

    Row ``b``'s queries are tokens ``query_start_loc[b]:query_start_loc[b+1]``
    of ``q``; its keys are the first ``seq_lens[b]`` tokens of its blocks (the
    chunk's own K/V must already be in the cache). ``max_query_len`` bounds the
    chunk lengths of ``rows`` and sizes the grid.
    """
    num_rows = rows.shape[0]
    _, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[3]
    if num_rows == 0 or max_query_len == 0:
        return
    assert num_heads % num_kv_heads == 0 and head_dim >= 16 and head_dim & (head_dim - 1) == 0
    assert block_tables.stride(1) == 1 and out.stride(-1) == 1
    q = _rows_contiguous(q)
    qh = num_heads // num_kv_heads
    default_m, default_n, num_warps = prefill_tiles(head_dim, q.dtype, q.device)
    block_m = max(block_m or default_m, 16, triton.next_power_of_2(qh))
    block_n = block_n or default_n
    block_q = block_m // qh
    stride_cb, stride_ct, stride_ch = _cache_strides(kv_cache)
    grid = (num_rows, math.ceil(max_query_len / block_q), num_kv_heads)
    _prefill_kernel[grid](
        q, kv_cache[0], kv_cache[1], out, block_tables, query_start_loc, seq_lens, rows,
        scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        stride_cb, stride_ct, stride_ch, block_tables.stride(0),
        QH=qh, BLOCK_M=block_m, BLOCK_Q=block_q, HEAD_DIM=head_dim, BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_N=block_n, PRECISION=_precision(q.dtype), num_warps=num_warps, num_stages=2)
