"""Building blocks shared by the decoder families: RMSNorm and rotary embeddings.

Both follow Hugging Face's arithmetic step for step (norms in fp32, cos/sin
computed in fp32 then cast to the activation dtype) so that fp32 outputs agree
with ``transformers`` to rounding and greedy tokens are identical.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.models import fused
from engine.models.config import ModelConfig, RopeConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.add_rms_norm(x, None, self.weight, self.eps)[0]

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)``: the residual add fused into the norm on GPU."""
        return fused.add_rms_norm(x, residual, self.weight, self.eps)


def _inv_freq(rope: RopeConfig, dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention scaling of cos/sin for each rope type."""
    base = rope.theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    p = rope.params
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.rope_type == "llama3":
        factor = rope.factor
        low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old_len = float(p["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope.rope_type == "yarn":
        return _yarn_inv_freq(rope, dim, max_position)
    raise AssertionError(f"unhandled rope type {rope.rope_type}")  # ModelConfig rejects others


def _yarn_inv_freq(rope: RopeConfig, dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    p = rope.params
    base, factor = rope.theta, rope.factor
    orig = float(p.get("original_max_position_embeddings") or max_position)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = p.get("attention_factor")
    if attn is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attn = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attn = mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, float(attn)


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) rotary embedding over a precomputed cos/sin table."""

    def __init__(self, config: ModelConfig, max_position: int) -> None:
        super().__init__()
        inv_freq, scaling = _inv_freq(config.rope, config.head_dim, config.max_position_embeddings)
        positions = torch.arange(max_position, dtype=torch.int64).float()
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return fused.rotary(q, k, self.cos, self.sin, positions)
