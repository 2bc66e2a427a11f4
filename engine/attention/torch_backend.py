"""Reference attention backend in plain PyTorch (``scaled_dot_product_attention``).

Runs on CPU and GPU and is what CI tests and what the fast backends are checked
against. Requests are split into two groups per step: decode tokens (query
length 1) are attended together as one padded batch gathered from the paged
cache; prompt chunks are attended one request at a time, straight from the new
K/V when nothing is cached before them, otherwise over their gathered context
with a causal mask offset by the tokens already computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBatch, write_kv


@dataclass(slots=True)
class _Prefill:
    start: int
    end: int
    num_computed: int
    seq_len: int
    slots: torch.Tensor | None  # [seq_len] flat cache slots; None when num_computed == 0


@dataclass(slots=True)
class TorchMetadata:
    slot_mapping: torch.Tensor
    decode_token_idx: torch.Tensor | None  # [Bd] flat token index of each decode
    decode_slots: torch.Tensor | None  # [Bd, L]
    decode_key_pos: torch.Tensor | None  # [Bd, L]
    decode_q_pos: torch.Tensor | None  # [Bd, 1]
    decode_valid: torch.Tensor | None  # [Bd, L] bool
    prefills: list[_Prefill]
    _masks: dict[tuple[str, int, int | None], torch.Tensor] = field(default_factory=dict)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        key = ("decode", 0, window)
        mask = self._masks.get(key)
        if mask is None:
            mask = self.decode_valid
            if window is not None:
                mask = mask & (self.decode_key_pos > self.decode_q_pos - window)
            mask = mask[:, None, None, :]  # [Bd, 1, 1, L]
            self._masks[key] = mask
        return mask

    def prefill_mask(self, i: int, window: int | None, device: torch.device) -> torch.Tensor:
        key = ("prefill", i, window)
        mask = self._masks.get(key)
        if mask is None:
            p = self.prefills[i]
            q_pos = torch.arange(p.num_computed, p.seq_len, device=device)[:, None]
            k_pos = torch.arange(p.seq_len, device=device)[None, :]
            mask = k_pos <= q_pos
            if window is not None:
                mask = mask & (k_pos > q_pos - window)
            self._masks[key] = mask
        return mask


class TorchAttentionBackend:
    name = "torch"

    def build_metadata(self, batch: AttentionBatch) -> TorchMetadata:
        device = batch.slot_mapping.device
        bs = batch.block_size
        starts = [0]
        for n in batch.query_lens_host:
            starts.append(starts[-1] + n)
        decode_rows = [i for i, n in enumerate(batch.query_lens_host) if n == 1]
        prefills: list[_Prefill] = []
        for i, n in enumerate(batch.query_lens_host):
            if n == 1:
                continue
            seq_len = batch.seq_lens_host[i]
            num_computed = seq_len - n
            slots = None
            if num_computed > 0:
                pos = torch.arange(seq_len, device=device)
                slots = batch.block_tables[i, pos // bs].long() * bs + pos % bs
            prefills.append(_Prefill(starts[i], starts[i + 1], num_computed, seq_len, slots))
        if not decode_rows:
            return TorchMetadata(batch.slot_mapping, None, None, None, None, None, prefills)
        rows = torch.tensor(decode_rows, device=device)
        seq_lens = batch.seq_lens[rows].long()
        max_len = max(batch.seq_lens_host[i] for i in decode_rows)
        key_pos = torch.arange(max_len, device=device)[None, :].expand(len(decode_rows), -1)
        tables = batch.block_tables[rows].long()
        block_idx = torch.clamp(key_pos // bs, max=tables.shape[1] - 1)
        slots = torch.gather(tables, 1, block_idx) * bs + key_pos % bs
        valid = key_pos < seq_lens[:, None]
        slots = torch.where(valid, slots, torch.zeros_like(slots))
        token_idx = torch.tensor([starts[i] for i in decode_rows], device=device)
        return TorchMetadata(batch.slot_mapping, token_idx, slots, key_pos, (seq_lens - 1)[:, None],
                             valid, prefills)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: TorchMetadata, *, scale: float, sliding_window: int | None) -> torch.Tensor:
        write_kv(kv_cache, k, v, metadata.slot_mapping)
        _, num_blocks, block_size, heads, dim = kv_cache.shape
        k_flat = kv_cache[0].view(num_blocks * block_size, heads, dim)
        v_flat = kv_cache[1].view(num_blocks * block_size, heads, dim)
        out = torch.empty_like(q)
        if metadata.decode_token_idx is not None:
            idx = metadata.decode_token_idx
            qd = q[idx].unsqueeze(2)  # [Bd, Hq, 1, D]
            kd = k_flat[metadata.decode_slots].transpose(1, 2)  # [Bd, Hkv, L, D]
            vd = v_flat[metadata.decode_slots].transpose(1, 2)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=metadata.decode_mask(sliding_window),
                                                scale=scale, enable_gqa=True)
            out[idx] = od.squeeze(2)
        for i, p in enumerate(metadata.prefills):
            qp = q[p.start:p.end].transpose(0, 1)  # [Hq, n, D]
            if p.slots is None and sliding_window is None:
                kp, vp = k[p.start:p.end].transpose(0, 1), v[p.start:p.end].transpose(0, 1)
                op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
            else:
                if p.slots is None:
                    kp, vp = k[p.start:p.end].transpose(0, 1), v[p.start:p.end].transpose(0, 1)
                else:
                    kp, vp = k_flat[p.slots].transpose(0, 1), v_flat[p.slots].transpose(0, 1)
                mask = metadata.prefill_mask(i, sliding_window, q.device)
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
            out[p.start:p.end] = op.transpose(0, 1)
        return out
