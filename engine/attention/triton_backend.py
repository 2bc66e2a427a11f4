"""Attention backend on the Triton kernels of ``triton_kernels`` (CUDA; the interpreter runs it on CPU in tests).

``build_metadata`` runs once per step: it splits the batch's rows into decode
rows (query length 1) and prefill rows (longer chunks) from the host lists and
gathers the decode rows' block tables and lengths on the device. ``forward``
runs once per layer: it stores the new K/V at ``slot_mapping``, then launches
the split-K decode kernel over the decode rows and the prefill kernel over the
prefill rows, both writing into one output tensor.

``build_decode_metadata`` is the CUDA-graph path: a decode-only batch described
by static device tensors alone (``block_tables [B, max_blocks]``, ``seq_lens
[B]``, ``slot_mapping [B]``, request ``b`` = token ``b``). It reads nothing
from the host, and the split count depends only on ``B`` and ``max_blocks``;
the split scratch buffers are allocated on the first forward and reused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.attention.base import AttentionBatch
from engine.attention.triton_kernels import (
    decode_attention,
    decode_scratch,
    num_decode_splits,
    num_sms,
    prefill_attention,
    write_kv_cache,
)

_CPU_SMS = 8  # the interpreter has no SMs; any small number exercises the split path


@dataclass(slots=True)
class DecodePlan:
    block_tables: torch.Tensor  # [Bd, max_blocks] int32
    seq_lens: torch.Tensor  # [Bd] int32; 0 for padded rows
    token_idx: torch.Tensor | None  # [Bd] flat token of each decode row; None when row b is token b
    splits: dict[tuple[int, int, int], tuple[int, tuple | None]] = field(default_factory=dict)
    """(num_heads, num_kv_heads, head_dim) -> (num_splits, partial buffers), filled by the first layer."""


@dataclass(slots=True)
class PrefillPlan:
    rows: torch.Tensor  # [Bp] int32 batch rows with query length > 1
    query_start_loc: torch.Tensor  # [B + 1] int32 (the batch's)
    seq_lens: torch.Tensor  # [B] int32 (the batch's)
    block_tables: torch.Tensor  # [B, max_blocks] int32 (the batch's)
    max_query_len: int


@dataclass(slots=True)
class TritonMetadata:
    slot_mapping: torch.Tensor
    decode: DecodePlan | None
    prefill: PrefillPlan | None


def _index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.int32)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


class TritonAttentionBackend:
    name = "triton"

    def __init__(self, *, sms: int | None = None, min_split_tokens: int = 256, max_splits: int = 64) -> None:
        """``sms`` overrides the device's multiprocessor count in the split choice (tests, tuning)."""
        self._sms = sms
        self._min_split_tokens = min_split_tokens
        self._max_splits = max_splits

    def build_metadata(self, batch: AttentionBatch) -> TritonMetadata:
        """Called by the runner once per step, before the first layer."""
        device = batch.slot_mapping.device
        lens = batch.query_lens_host
        decode_rows = [i for i, n in enumerate(lens) if n == 1]
        prefill_rows = [i for i, n in enumerate(lens) if n != 1]
        decode = prefill = None
        if len(decode_rows) == len(lens):
            decode = DecodePlan(batch.block_tables, batch.seq_lens, None)  # row b is token b
        elif decode_rows:
            rows = _index_tensor(decode_rows, device)
            starts = [0]
            for n in lens:
                starts.append(starts[-1] + n)
            decode = DecodePlan(batch.block_tables.index_select(0, rows), batch.seq_lens.index_select(0, rows),
                                _index_tensor([starts[i] for i in decode_rows], device))
        if prefill_rows:
            prefill = PrefillPlan(_index_tensor(prefill_rows, device), batch.query_start_loc, batch.seq_lens,
                                  batch.block_tables, max(lens[i] for i in prefill_rows))
        return TritonMetadata(batch.slot_mapping, decode, prefill)

    def build_decode_metadata(self, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                              slot_mapping: torch.Tensor) -> TritonMetadata:
        """Decode-only metadata from static device tensors (CUDA-graph capture and replay).

        Row ``b`` is token ``b``; padded rows have ``seq_len`` 0 and
        ``slot_mapping`` -1 (their K/V are not stored; their output is zeros).
        Keep the returned object for every replay: the graph holds its buffers.
        """
        return TritonMetadata(slot_mapping, DecodePlan(block_tables, seq_lens, None), None)

    def _splits(self, plan: DecodePlan, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                device: torch.device) -> tuple[int, tuple | None]:
        key = (num_heads, num_kv_heads, head_dim)
        hit = plan.splits.get(key)
        if hit is None:
            sms = self._sms or (num_sms(device.index if device.index is not None else torch.cuda.current_device())
                                if device.type == "cuda" else _CPU_SMS)
            num_requests, max_blocks = plan.block_tables.shape
            n = num_decode_splits(num_requests, num_kv_heads, max_blocks * block_size, sms,
                                  min_split_tokens=self._min_split_tokens, max_splits=self._max_splits)
            scratch = decode_scratch(num_requests, num_heads, n, head_dim, device) if n > 1 else None
            hit = plan.splits[key] = (n, scratch)
        return hit

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: TritonMetadata, *, scale: float, sliding_window: int | None) -> torch.Tensor:
        """Called by every attention layer with the step's metadata."""
        write_kv_cache(kv_cache, k, v, metadata.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        plan = metadata.decode
        if plan is not None:
            _, num_heads, head_dim = q.shape
            num_splits, scratch = self._splits(plan, num_heads, kv_cache.shape[3], head_dim, kv_cache.shape[2],
                                               q.device)
            decode_attention(q, kv_cache, plan.block_tables, plan.seq_lens, out, scale=scale,
                             sliding_window=sliding_window, num_splits=num_splits, token_idx=plan.token_idx,
                             scratch=scratch)
        pre = metadata.prefill
        if pre is not None:
            prefill_attention(q, kv_cache, pre.block_tables, pre.query_start_loc, pre.seq_lens, pre.rows, out,
                              max_query_len=pre.max_query_len, scale=scale, sliding_window=sliding_window)
        return out
