"""Fused GPU kernels for the elementwise parts of a decoder layer (Triton), with torch references.

A decode step of an 8B model spends most of its time reading weights; what
is left is dozens of tiny elementwise kernels per layer (RMSNorm alone is
eight in plain torch). These kernels do each job in one pass:

* ``add_rms_norm``: ``residual += x`` then RMSNorm of the sum, one kernel;
* ``rotary``: rotate q and k (neox style) in place from the cos/sin table;
* ``silu_and_mul``: ``silu(gate) * up`` of the fused gate/up projection.

Each has a torch reference doing the same arithmetic as Hugging Face (the CPU
path, and what the GPU tests compare against). ``enabled(x)`` says whether
the fused path applies: a CUDA tensor and Triton importable.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

_HAS_TRITON = importlib.util.find_spec("triton") is not None

if _HAS_TRITON:
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


def enabled(x: torch.Tensor) -> bool:
    return _HAS_TRITON and x.is_cuda


# --- RMSNorm with an optional fused residual add -----------------------------------------------------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual), x + residual)``; with no residual, ``(norm(x), x)``. Updates ``residual`` in place."""
    if not enabled(x):
        if residual is not None:
            x = x + residual
        return rms_norm_ref(x, weight, eps), x
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    out = torch.empty_like(x2)
    res2 = residual.reshape(-1, shape[-1]) if residual is not None else x2
    n = shape[-1]
    _add_rms_norm_kernel[(x2.shape[0],)](x2, res2, weight, out, x2.stride(0), res2.stride(0), out.stride(0), n, eps,
                                         HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n),
                                         num_warps=8 if n >= 4096 else 4)
    return out.view(shape), (residual if residual is not None else x)


# --- rotary -------------------------------------------------------------------------------------------


def rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` [T, Hq, D] and ``k`` [T, Hk, D] by their positions (neox layout)."""
    half = q.shape[-1] // 2
    if not enabled(q) or half & (half - 1):
        return rotary_ref(q, k, cos, sin, positions)
    q, k = q.contiguous(), k.contiguous()
    num_tokens, num_q, dim = q.shape
    num_k = k.shape[1]
    if num_tokens:
        _rotary_kernel[(num_tokens,)](q, k, cos, sin, positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                      cos.stride(0), NUM_Q_HEADS=num_q, NUM_K_HEADS=num_k, HALF=dim // 2,
                                      HEADS_PAD=triton.next_power_of_2(max(num_q, num_k)), num_warps=4)
    return q, k


# --- SiLU and multiply ----------------------------------------------------------------------------------


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``x = cat(gate, up)`` on the last dimension."""
    if not enabled(x):
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    block = 1024
    if x2.shape[0]:
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, out, x2.stride(0), out.stride(0), n, BLOCK=block,
                                                               num_warps=4)
    return out.view(*x.shape[:-1], n)
