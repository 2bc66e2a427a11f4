"""The model runner: owns the weights and the KV cache tensors, executes one step.

``execute(SchedulerOutput) -> RunnerOutput``: lays the scheduled tokens out as
one flat batch (token ids, positions, slot mapping, block tables), runs the
model, computes logits only for the tokens that sample, and samples them.
Decode-only steps on GPU replay a CUDA graph (``engine.cuda_graphs``).
Host-side inputs are built in NumPy into pinned buffers and copied once,
non-blocking; the one device-to-host sync of a step is reading the sampled
tokens (plus the logprobs, when a request asks for them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from common.config import EngineConfig
from common.errors import ConfigError
from engine.attention import AttentionBatch, kv_cache_shape, select_backend
from engine.cuda_graphs import DecodeGraphs
from engine.models import ForwardContext, ModelConfig, load_model
from engine.sampler import Sampler
from engine.scheduler import RunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

GRAPH_MAX_CONTEXT = 16384  # decode steps with longer contexts run eagerly
GIB = 2**30


def kv_block_bytes(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers, K and V."""
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * dtype.itemsize


class _Staging:
    """Host buffers for one step's inputs; pinned on GPU so each copy is one async transfer."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._buffers: dict[str, torch.Tensor] = {}

    def put(self, name: str, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if not self.pinned:
            return tensor
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < tensor.numel() or buf.dtype != tensor.dtype:
            buf = self._buffers[name] = torch.empty(max(tensor.numel(), 1024), dtype=tensor.dtype, pin_memory=True)
        host = buf[:tensor.numel()].view(tensor.shape)
        host.copy_(tensor)
        return host.to(self.device, non_blocking=True)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, *, device: torch.device,
                 dtype: torch.dtype, max_model_len: int) -> None:
        self.config = config
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.model = load_model(config.model, model_config, dtype=dtype, device=device, max_position=max_model_len,
                                load_format=config.load_format)
        self.backend = select_backend(config.attention_backend, device, block_size=config.block_size)
        self._staging = _Staging(device)
        self.sampler = Sampler(config.seed, device, self._staging.put)
        self.kv_caches: list[torch.Tensor] = []
        self.graphs: DecodeGraphs | None = None

    # --- memory ---------------------------------------------------------------------------------

    def plan_num_blocks(self) -> int:
        """KV blocks that fit the configured memory (called once the weights are loaded)."""
        cfg = self.config
        if cfg.num_blocks is not None:
            return cfg.num_blocks
        block_bytes = kv_block_bytes(self.model_config, cfg.block_size, self.dtype)
        if cfg.kv_cache_memory_gib is not None:
            budget = cfg.kv_cache_memory_gib * GIB
        elif self.device.type == "cuda":
            budget = self._profile_gpu_budget(block_bytes)
        else:
            budget = 2**28  # 256 MiB on CPU
        num_blocks = int(budget // block_bytes)
        if num_blocks < 1:
            raise ConfigError("no memory left for the KV cache", field="gpu_memory_utilization")
        return num_blocks

    @torch.inference_mode()
    def _profile_gpu_budget(self, block_bytes: int) -> float:
        """Run one step of ``max_num_batched_tokens`` on a scratch cache; the KV gets what remains."""
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        others = total - free - torch.cuda.memory_reserved(self.device)  # other processes on this GPU
        n = self.config.max_num_batched_tokens
        scratch_blocks = -(-n // self.block_size) + 1
        self.allocate_kv_cache(scratch_blocks, log=False)
        torch.cuda.reset_peak_memory_stats(self.device)
        ids = np.zeros(n, dtype=np.int64)
        batch = self._attention_batch(ids.size, [n], [n], [list(range(scratch_blocks))], np.arange(n))
        hidden = self.model(self._staging.put("ids", ids), self._staging.put("pos", np.arange(n)),
                            ForwardContext(self.backend, self.backend.build_metadata(batch), self.kv_caches))
        self.model.compute_logits(hidden[-min(n, self.config.max_num_requests):])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - scratch_blocks * block_bytes
        self.kv_caches = []
        torch.cuda.empty_cache()
        graphs = 0 if self.config.enforce_eager else GIB // 2  # the decode graphs' pool
        budget = total * self.config.gpu_memory_utilization - others - peak - graphs
        logger.info("GPU memory: %.1f GiB total, %.1f GiB peak at a %d-token step, %.1f GiB for the KV cache",
                    total / GIB, peak / GIB, n, budget / GIB)
        return budget

    def allocate_kv_cache(self, num_blocks: int, *, log: bool = True) -> None:
        mc = self.model_config
        shape = kv_cache_shape(num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(mc.num_layers)]
        if log:
            logger.info("runner ready: %s on %s, %s, %d KV blocks of %d tokens, attention=%s",
                        mc.architecture, self.device, self.dtype, num_blocks, self.block_size, self.backend.name)

    def capture_graphs(self) -> None:
        """Capture decode graphs, where the device and the attention backend allow it."""
        if (self.device.type != "cuda" or self.config.enforce_eager
                or not hasattr(self.backend, "build_decode_metadata")):
            return
        max_blocks = -(-min(self.max_model_len, GRAPH_MAX_CONTEXT) // self.block_size)
        self.graphs = DecodeGraphs(self.model, self.backend, self.kv_caches, device=self.device,
                                   max_batch=min(self.config.max_graph_batch_size, self.config.max_num_requests),
                                   max_blocks=max_blocks)
        self.graphs.capture()

    # --- a step ---------------------------------------------------------------------------------

    def _attention_batch(self, num_tokens: int, query_lens: list[int], seq_lens: list[int],
                         tables: list[list[int]], slots: np.ndarray) -> AttentionBatch:
        max_blocks = max(len(t) for t in tables)
        block_tables = np.zeros((len(tables), max_blocks), dtype=np.int32)
        for i, t in enumerate(tables):
            block_tables[i, :len(t)] = t
        query_start = np.zeros(len(query_lens) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=query_start[1:])
        put = self._staging.put
        return AttentionBatch(
            query_start_loc=put("qsl", query_start), seq_lens=put("seq_lens", np.asarray(seq_lens, dtype=np.int32)),
            block_tables=put("tables", block_tables), slot_mapping=put("slots", slots.astype(np.int64)),
            query_lens_host=query_lens, seq_lens_host=seq_lens, block_size=self.block_size)

    def _flatten(self, out: SchedulerOutput) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        bs = self.block_size
        input_ids = np.empty(out.num_tokens, dtype=np.int64)
        positions = np.empty(out.num_tokens, dtype=np.int64)
        slots = np.empty(out.num_tokens, dtype=np.int64)
        sample_idx = []
        t = 0
        for s in out.scheduled:
            n = len(s.token_ids)
            table = np.asarray(s.block_ids, dtype=np.int64)
            pos = np.arange(s.start_pos, s.start_pos + n)
            input_ids[t:t + n] = s.token_ids
            positions[t:t + n] = pos
            slots[t:t + n] = table[pos // bs] * bs + pos % bs
            t += n
            if s.sample:
                sample_idx.append(t - 1)
        return input_ids, positions, slots, sample_idx

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, on_layer_done: Callable[[int], None] | None = None) -> RunnerOutput:
        input_ids, positions, slots, sample_idx = self._flatten(out)
        scheduled = out.scheduled
        graphs = self.graphs
        if (graphs is not None and on_layer_done is None and len(sample_idx) == len(scheduled) == out.num_tokens
                and graphs.fits(len(scheduled), (s.block_ids for s in scheduled))):
            logits = graphs.run(input_ids, positions, [s.block_ids for s in scheduled], slots)
        else:
            batch = self._attention_batch(out.num_tokens, [len(s.token_ids) for s in scheduled],
                                          [s.start_pos + len(s.token_ids) for s in scheduled],
                                          [s.block_ids for s in scheduled], slots)
            ctx = ForwardContext(self.backend, self.backend.build_metadata(batch), self.kv_caches, on_layer_done)
            hidden = self.model(self._staging.put("ids", input_ids), self._staging.put("pos", positions), ctx)
            logits = None
            if sample_idx:
                idx = self._staging.put("sample_idx", np.asarray(sample_idx, dtype=np.int64))
                logits = self.model.compute_logits(hidden[idx])
        sampled: list[int | None] = [None] * len(scheduled)
        logprobs: list = [None] * len(scheduled)
        if logits is None:
            if self._staging.pinned:  # nothing to read back: still wait, the next step reuses the pinned inputs
                torch.cuda.current_stream(self.device).synchronize()
        else:
            sampling = [s for s in scheduled if s.sample]
            result = self.sampler(logits, [s.sampling for s in sampling], [s.generator for s in sampling],
                                  [s.output_token_ids for s in sampling])
            j = 0
            for i, s in enumerate(scheduled):
                if s.sample:
                    sampled[i], logprobs[i] = result.token_ids[j], result.logprobs[j]
                    j += 1
        return RunnerOutput(sampled, logprobs)
