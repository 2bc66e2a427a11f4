"""How long things take on one instance: prefill, a decode step, a KV transfer.

The :class:`CostModel` is a handful of coefficients (seconds per unit), frozen and saved as JSON.
Policies call it to predict TTFT and TBT; the simulator uses the same object as its clock, so a
calibrated model is what makes simulated and real routing agree.

Formulas (``n`` new and ``c`` cached prompt tokens, ``b`` requests in the decode batch)::

    prefill(n, c) = max(prefill_floor_s, prefill_base_s + prefill_per_token_s * n + prefill_attn_s * n * (n + c))
    decode_step(b, ctx) = decode_base_s + decode_per_request_s * b + decode_per_context_token_s * ctx
    transfer(bytes, link) = link.latency_s + bytes / link.bandwidth       (router.links)

The floor is the shortest forward pass (reading the weights once; launch and all-reduce overheads):
short prompts cost about as much as a few hundred tokens, which a purely linear model misses.
``transfer_overlap`` is the fraction of ``min(prefill, transfer)`` hidden by layer-wise streaming
(0 = transfer starts after prefill; 1 = fully pipelined).

Three ways to get one:

- :func:`fit_cost_model` from profile samples (:class:`PrefillSample`, :class:`DecodeSample`,
  ``TransferSample``) by non-negative least squares; :func:`fit_r2` scores a model on samples.
- :func:`cost_model_from_datasheet` from a GPU's peak FLOP/s, HBM bandwidth and the model's size
  (a roofline: compute-bound prefill, memory-bound decode).
- :func:`cost_model_from_splitwise` from the Splitwise profiling table (``perf_model.csv``: a batch of
  ``batch_size`` prompts of ``prompt_size`` tokens takes ``prompt_time`` ms; one decode step at
  ``batch_size`` takes ``token_time`` ms over a generation of ``token_size`` tokens). Prefill is
  fitted to the single-prompt rows only: the batched rows cost about what one prompt of
  ``batch_size * prompt_size`` tokens costs *without* the quadratic attention term (Splitwise's own
  simulator interpolates them on batch tokens), a regime the router never predicts; mixing them in
  drives the attention coefficient to zero and halves the predicted cost of a 100k-token prompt.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ConfigError
from router.links import (
    DEFAULT_BANDWIDTH_GBPS,
    DEFAULT_LATENCY_S,
    LinkState,
    TransferSample,
    fit_link,
)
from router.nnls import nnls

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class CostModel:
    prefill_base_s: float = 0.0
    prefill_per_token_s: float = 0.0
    prefill_attn_s: float = 0.0
    """Seconds per (new token x attended token) pair."""
    prefill_floor_s: float = 0.0
    decode_base_s: float = 0.0
    decode_per_request_s: float = 0.0
    decode_per_context_token_s: float = 0.0
    link_bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS
    """The fabric's default link (per-pair links learned online live in router.links.LinkTable)."""
    link_latency_s: float = DEFAULT_LATENCY_S
    transfer_overlap: float = 0.0
    kv_capacity_tokens: int = 0
    """KV capacity of one instance in tokens; 0 = unknown (load reports carry the real number)."""
    source: str = ""
    """Where the coefficients came from, for humans."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not (value >= 0 and np.isfinite(value)):
                raise ConfigError(f"must be a finite number >= 0, got {value}", field=f.name)
        if self.link_bandwidth_gbps <= 0:
            raise ConfigError("must be positive", field="link_bandwidth_gbps")
        if self.transfer_overlap > 1:
            raise ConfigError(f"must be in [0, 1], got {self.transfer_overlap}", field="transfer_overlap")

    # --- predictions -----------------------------------------------------------------------------

    def prefill_time(self, new_tokens: float, cached_tokens: float = 0.0) -> float:
        """Compute ``new_tokens`` prompt tokens that attend to ``cached_tokens`` already in the cache."""
        if new_tokens <= 0:
            return 0.0
        n, c = new_tokens, cached_tokens
        return max(self.prefill_floor_s,
                   self.prefill_base_s + self.prefill_per_token_s * n + self.prefill_attn_s * n * (n + c))

    def prefill_marginal_time(self, new_tokens: float, cached_tokens: float = 0.0) -> float:
        """What a prefill chunk adds to an engine step that runs anyway (a decode step it joins)."""
        if new_tokens <= 0:
            return 0.0
        return self.prefill_per_token_s * new_tokens + self.prefill_attn_s * new_tokens * (new_tokens + cached_tokens)

    def queue_time(self, num_tokens: float, num_requests: int, chunk_tokens: int | None = None) -> float:
        """Time to prefill a queue of ``num_tokens`` over ``num_requests`` requests.

        Load reports give only the totals, so the requests are taken to be of equal length (the
        attention term is then a lower bound: sum of squares >= square of sum / count). With
        ``chunk_tokens`` (the engine's token budget per step) short requests share steps and the
        per-pass cost is paid once per step; without it, once per request.
        """
        if num_tokens <= 0:
            return 0.0
        k = max(1, num_requests)
        steps = k if chunk_tokens is None else max(1, math.ceil(num_tokens / chunk_tokens))
        compute = self.prefill_per_token_s * num_tokens + self.prefill_attn_s * num_tokens * (num_tokens / k)
        return max(steps * self.prefill_floor_s, steps * self.prefill_base_s + compute)

    def decode_step_time(self, batch_size: float, context_tokens: float) -> float:
        if batch_size <= 0:
            return 0.0
        return (self.decode_base_s + self.decode_per_request_s * batch_size
                + self.decode_per_context_token_s * max(0.0, context_tokens))

    @property
    def default_link(self) -> LinkState:
        return LinkState(self.link_bandwidth_gbps, self.link_latency_s)

    def transfer_time(self, num_bytes: float, link: LinkState | None = None) -> float:
        return (link or self.default_link).transfer_time(num_bytes)

    def visible_transfer_time(self, prefill_s: float, transfer_s: float) -> float:
        """The part of a transfer that adds to TTFT after the part hidden behind prefill compute."""
        return transfer_s - self.transfer_overlap * min(prefill_s, transfer_s)

    def kv_capacity_blocks(self, block_size: int) -> int:
        return self.kv_capacity_tokens // block_size

    # --- persistence -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostModel:
        values = dict(data)
        version = values.pop("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ConfigError(f"unsupported cost model format {version}", field="version")
        known = {f.name for f in dataclasses.fields(cls)}
        for name in values:
            if name not in known:
                raise ConfigError("unknown cost model field", field=name)
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CostModel:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        return cls.from_json(Path(path).read_text())


# --- fitting ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrefillSample:
    """A prefill of ``new_tokens`` on top of ``cached_tokens`` that took ``seconds``."""

    new_tokens: int
    cached_tokens: int
    seconds: float


@dataclass(frozen=True, slots=True)
class DecodeSample:
    """One decode step of ``batch_size`` requests attending to ``context_tokens`` in total."""

    batch_size: int
    context_tokens: int
    seconds: float


Sample = PrefillSample | DecodeSample | TransferSample


def _prefill_features(samples: Sequence[PrefillSample]) -> np.ndarray:
    return np.array([[1.0, s.new_tokens, s.new_tokens * (s.new_tokens + s.cached_tokens)] for s in samples],
                    dtype=np.float64)


def _decode_features(samples: Sequence[DecodeSample]) -> np.ndarray:
    return np.array([[1.0, s.batch_size, s.context_tokens] for s in samples], dtype=np.float64)


def _weighted_nnls(a: np.ndarray, y: np.ndarray, relative: bool) -> np.ndarray:
    if not relative:
        return nnls(a, y)
    w = 1.0 / np.maximum(y, 1e-12)
    return nnls(a * w[:, None], y * w)


def fit_cost_model(samples: Iterable[Sample], *, base: CostModel | None = None, relative: bool = False,
                   fit_floor: bool = True, source: str = "fit") -> CostModel:
    """Coefficients fitted to profile samples by non-negative least squares.

    Each kind is fitted when there are enough samples of it (3 prefill, 3 decode, 2 transfer);
    the other coefficients keep ``base``'s values. ``relative`` minimises relative instead of
    absolute squared error (favours short prompts). With ``fit_floor``, the prefill floor is the
    fastest observed pass and the linear part is refitted on the samples it does not clamp (kept
    only when it clamps some sample, so data from a purely linear model fits no floor).
    """
    base = base or CostModel()
    data = list(samples)
    prefill = [s for s in data if isinstance(s, PrefillSample)]
    decode = [s for s in data if isinstance(s, DecodeSample)]
    transfer = [s for s in data if isinstance(s, TransferSample)]
    updates: dict[str, Any] = {"source": source}
    if len(prefill) >= 3:
        a = _prefill_features(prefill)
        y = np.array([s.seconds for s in prefill])
        coef = _weighted_nnls(a, y, relative)
        floor = 0.0
        if fit_floor:
            floor = float(y.min())
            for _ in range(10):
                binding = a @ coef > floor
                if binding.sum() < a.shape[1] + 1:
                    break
                new = _weighted_nnls(a[binding], y[binding], relative)
                if np.allclose(new, coef, rtol=1e-9, atol=0):
                    break
                coef = new
            if not (a @ coef < 0.95 * floor).any():  # the floor clamps no sample: leave it out
                floor = 0.0
        updates.update(prefill_base_s=float(coef[0]), prefill_per_token_s=float(coef[1]),
                       prefill_attn_s=float(coef[2]), prefill_floor_s=floor)
    if len(decode) >= 3:
        coef = _weighted_nnls(_decode_features(decode), np.array([s.seconds for s in decode]), relative)
        updates.update(decode_base_s=float(coef[0]), decode_per_request_s=float(coef[1]),
                       decode_per_context_token_s=float(coef[2]))
    if len(transfer) >= 2:
        link = fit_link(transfer)
        updates.update(link_bandwidth_gbps=link.bandwidth_gbps, link_latency_s=link.latency_s)
    return dataclasses.replace(base, **updates)


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - pred) ** 2)) / ss_tot if ss_tot > 0 else float("nan")


def fit_r2(model: CostModel, samples: Iterable[Sample]) -> dict[str, float]:
    """Coefficient of determination of the model's predictions, per kind of sample present."""
    data = list(samples)
    out: dict[str, float] = {}
    prefill = [s for s in data if isinstance(s, PrefillSample)]
    decode = [s for s in data if isinstance(s, DecodeSample)]
    transfer = [s for s in data if isinstance(s, TransferSample)]
    if prefill:
        out["prefill"] = _r2(np.array([s.seconds for s in prefill]),
                             np.array([model.prefill_time(s.new_tokens, s.cached_tokens) for s in prefill]))
    if decode:
        out["decode"] = _r2(np.array([s.seconds for s in decode]),
                            np.array([model.decode_step_time(s.batch_size, s.context_tokens) for s in decode]))
    if transfer:
        out["transfer"] = _r2(np.array([s.seconds for s in transfer]),
                              np.array([model.transfer_time(s.num_bytes) for s in transfer]))
    return out


# --- constructors ----------------------------------------------------------------------------------


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """K and V of one token across all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def kv_capacity_tokens(*, hbm_gb: float, num_gpus: int, num_params: float, kv_bytes: int,
                       bytes_per_param: float = 2.0, memory_utilization: float = 0.9,
                       field: str = "memory_utilization") -> int:
    """Tokens of KV that fit next to the weights in ``memory_utilization`` of an instance's HBM."""
    free = hbm_gb * 1e9 * num_gpus * memory_utilization - num_params * bytes_per_param
    if free <= 0:
        raise ConfigError("the weights do not fit in HBM", field=field)
    return int(free // kv_bytes)


def cost_model_from_datasheet(*, peak_flops: float, hbm_bandwidth_gbps: float, num_params: float,
                              num_layers: int, hidden_size: int, kv_bytes_per_token: int,
                              bytes_per_param: float = 2.0, num_gpus: int = 1, mfu: float = 0.5,
                              mbu: float = 0.7, hbm_capacity_gb: float | None = None,
                              memory_utilization: float = 0.9,
                              link_bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS,
                              link_latency_s: float = DEFAULT_LATENCY_S) -> CostModel:
    """A roofline model from datasheet rates (per GPU; ``num_gpus`` GPUs per instance, tensor parallel).

    Prefill is compute-bound: 2 FLOPs per parameter per token, plus attention at 4 * layers *
    hidden FLOPs per (query, key) pair, of which a fresh prompt has n^2 / 2; its floor is one read of
    the weights. Decode is memory-bound: each step reads the weights once and every context token's
    KV once. ``mfu`` and ``mbu`` are the achievable fractions of peak FLOP/s and bandwidth.
    """
    if min(peak_flops, hbm_bandwidth_gbps, num_params, num_layers, hidden_size, num_gpus) <= 0:
        raise ConfigError("datasheet rates and model sizes must be positive", field="datasheet")
    if not (0 < mfu <= 1 and 0 < mbu <= 1):
        raise ConfigError("must be in (0, 1]", field="mfu" if not 0 < mfu <= 1 else "mbu")
    flops = peak_flops * num_gpus * mfu
    bandwidth = hbm_bandwidth_gbps * 1e9 * num_gpus * mbu
    weight_bytes = num_params * bytes_per_param
    capacity = 0
    if hbm_capacity_gb is not None:
        capacity = kv_capacity_tokens(hbm_gb=hbm_capacity_gb, num_gpus=num_gpus, num_params=num_params,
                                      kv_bytes=kv_bytes_per_token, bytes_per_param=bytes_per_param,
                                      memory_utilization=memory_utilization, field="hbm_capacity_gb")
    return CostModel(
        prefill_per_token_s=2 * num_params / flops,
        prefill_attn_s=2 * num_layers * hidden_size / flops,
        prefill_floor_s=weight_bytes / bandwidth,
        decode_base_s=weight_bytes / bandwidth,
        decode_per_request_s=2 * num_params / flops,
        decode_per_context_token_s=kv_bytes_per_token / bandwidth,
        link_bandwidth_gbps=link_bandwidth_gbps, link_latency_s=link_latency_s,
        kv_capacity_tokens=capacity, source=f"datasheet:{num_params:.3g} params x{num_gpus} GPUs")


# KV bytes per token of the Splitwise table's models (fp16): Llama-2-70B has 80 layers of 8 KV heads
# of 128; BLOOM-176B has 70 layers of multi-head attention over 14336 dims.
SPLITWISE_KV_BYTES_PER_TOKEN = {"llama2-70b": kv_bytes_per_token(80, 8, 128), "bloom-176b": 2 * 70 * 14336 * 2}


def load_splitwise_samples(path: str | Path, *, model: str, hardware: str,
                           tensor_parallel: int) -> list[Sample]:
    """Prefill and decode samples from the Splitwise ``perf_model.csv`` rows of one configuration.

    A row's ``prompt_time`` is one pass over ``batch_size`` prompts of ``prompt_size`` tokens; only
    rows with one prompt become prefill samples (see the module docstring). Its ``token_time`` is
    the mean decode step at ``batch_size`` over ``token_size`` generated tokens, so the mean context
    per request is ``prompt_size + token_size / 2``: every row is a decode sample.
    """
    out: list[Sample] = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if (row["model"], row["hardware"], int(row["tensor_parallel"])) != (model, hardware, tensor_parallel):
                continue
            prompt, batch, tokens = int(row["prompt_size"]), int(row["batch_size"]), int(row["token_size"])
            if batch == 1:
                out.append(PrefillSample(prompt, 0, float(row["prompt_time"]) / 1000))
            out.append(DecodeSample(batch, int(batch * (prompt + tokens / 2)), float(row["token_time"]) / 1000))
    if not out:
        raise ConfigError(f"no rows for {model} on {hardware} with tensor_parallel={tensor_parallel}",
                          field="model")
    return out


def cost_model_from_splitwise(path: str | Path, *, model: str = "llama2-70b", hardware: str = "h100-80gb",
                              tensor_parallel: int = 4, relative: bool = False) -> CostModel:
    """A cost model fitted to one (model, hardware, tensor parallel) row set of the Splitwise table."""
    samples = load_splitwise_samples(path, model=model, hardware=hardware, tensor_parallel=tensor_parallel)
    return fit_cost_model(samples, relative=relative, source=f"splitwise:{model}/{hardware}/tp{tensor_parallel}")
