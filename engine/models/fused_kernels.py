"""Triton kernels behind ``engine.models.fused`` (imported only when a CUDA tensor takes the fused path).

Kept apart so a CPU process never imports Triton for them: Triton decorates
kernels once, at import, in compiled or interpreter mode, and an early import
here would fix the mode for every later kernel module in the process.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, n, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)).to(x_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / n
    normed = (xf * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, pos_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_c, NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
                   HEADS_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF)
    cos1 = tl.load(cos_ptr + pos * stride_c + i).to(tl.float32)
    sin1 = tl.load(sin_ptr + pos * stride_c + i).to(tl.float32)
    cos2 = tl.load(cos_ptr + pos * stride_c + HALF + i).to(tl.float32)  # equal to the first halves for
    sin2 = tl.load(sin_ptr + pos * stride_c + HALF + i).to(tl.float32)  # rope tables; read all the same
    h = tl.arange(0, HEADS_PAD)
    qmask = (h < NUM_Q_HEADS)[:, None]
    qp = q_ptr + t * stride_qt + h[:, None] * stride_qh + i[None, :]
    q1 = tl.load(qp, mask=qmask, other=0.0).to(tl.float32)
    q2 = tl.load(qp + HALF, mask=qmask, other=0.0).to(tl.float32)
    tl.store(qp, (q1 * cos1 - q2 * sin1).to(q_ptr.dtype.element_ty), mask=qmask)
    tl.store(qp + HALF, (q2 * cos2 + q1 * sin2).to(q_ptr.dtype.element_ty), mask=qmask)
    kmask = (h < NUM_K_HEADS)[:, None]
    kp = k_ptr + t * stride_kt + h[:, None] * stride_kh + i[None, :]
    k1 = tl.load(kp, mask=kmask, other=0.0).to(tl.float32)
    k2 = tl.load(kp + HALF, mask=kmask, other=0.0).to(tl.float32)
    tl.store(kp, (k1 * cos1 - k2 * sin1).to(k_ptr.dtype.element_ty), mask=kmask)
    tl.store(kp + HALF, (k2 * cos2 + k1 * sin2).to(k_ptr.dtype.element_ty), mask=kmask)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)
