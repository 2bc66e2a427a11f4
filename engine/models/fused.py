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

import functools
import importlib.util

import torch
import torch.nn.functional as F

_HAS_TRITON = importlib.util.find_spec("triton") is not None


@functools.cache
def _kernels():
    from engine.models import fused_kernels

    return fused_kernels


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
    k = _kernels()
    k._add_rms_norm_kernel[(x2.shape[0],)](x2, res2, weight, out, x2.stride(0), res2.stride(0), out.stride(0), n, eps,
                                         HAS_RESIDUAL=residual is not None, BLOCK=k.triton.next_power_of_2(n),
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
        k_ = _kernels()
        k_._rotary_kernel[(num_tokens,)](q, k, cos, sin, positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                      cos.stride(0), NUM_Q_HEADS=num_q, NUM_K_HEADS=num_k, HALF=dim // 2,
                                      HEADS_PAD=k_.triton.next_power_of_2(max(num_q, num_k)), num_warps=4)
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
        k = _kernels()
        k._silu_mul_kernel[(x2.shape[0], k.triton.cdiv(n, block))](x2, out, x2.stride(0), out.stride(0), n, BLOCK=block,
                                                               num_warps=4)
    return out.view(*x.shape[:-1], n)
