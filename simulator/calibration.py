"""Where a simulated engine's numbers come from: a profile, the Splitwise table, or a datasheet.

A :class:`Calibration` is a ``CostModel`` (the router's own, used as the simulator's clock) with
its KV capacity filled in, plus the model's KV bytes per token and the GPUs behind one instance.
Three sources, as the issue asks:

- :func:`from_profile`: the JSON ``pdserve profile`` writes (``CostModel.save``); KV size and
  capacity from the worker's layout (pass them; the profile does not record them);
- :func:`from_splitwise`: ``router.cost_model.cost_model_from_splitwise`` on ``perf_model.csv``
  (Llama2-70B / BLOOM-176B on A100 / H100), KV capacity from the GPUs' HBM less the weights;
- :func:`from_datasheet`: ``router.cost_model.cost_model_from_datasheet`` from peak FLOP/s and
  HBM bandwidth (:data:`HARDWARE`) and a model shape (:data:`MODELS`).

:func:`engine_spec` turns a calibration into the per-instance ``EngineSpec`` at a block size, and
:func:`cluster_config` into a whole ``SimConfig``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError
from router.cost_model import (
    SPLITWISE_KV_BYTES_PER_TOKEN,
    CostModel,
    cost_model_from_datasheet,
    cost_model_from_splitwise,
    kv_bytes_per_token,
    kv_capacity_tokens,
)
from router.routing_config import RoutingConfig
from simulator.config import EngineSpec, SimConfig

DEFAULT_SPLITWISE = Path(__file__).resolve().parents[2] / "shared/traces/splitwise_sim_perf_model/perf_model.csv"
# The fits of that table for the configurations the benchmarks and tests use, saved by ``CostModel.save``,
# so the simulator works where the shared table is not checked out (a CI clone, an installed package).
# tests/unit/test_simulator.py checks they still equal a fresh fit of the table when it is present.
PACKAGED_FITS = Path(__file__).resolve().parent / "cost_models"


def packaged_fit(model: str, hardware: str, tensor_parallel: int) -> Path:
    return PACKAGED_FITS / f"splitwise_{model}_{hardware}_tp{tensor_parallel}.json"


@dataclass(frozen=True, slots=True)
class Hardware:
    peak_flops: float  # dense fp16/bf16 FLOP/s per GPU
    hbm_bandwidth_gbps: float
    hbm_gb: float


@dataclass(frozen=True, slots=True)
class ModelShape:
    num_params: float
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim)


HARDWARE = {
    "h100-80gb": Hardware(989e12, 3350.0, 80.0),
    "a100-80gb": Hardware(312e12, 2039.0, 80.0),
    "h200-141gb": Hardware(989e12, 4800.0, 141.0),
}
MODELS = {
    "llama2-70b": ModelShape(69e9, 80, 8192, 8, 128),
    "llama3-8b": ModelShape(8.0e9, 32, 4096, 8, 128),
}


@dataclass(frozen=True, slots=True)
class Calibration:
    cost: CostModel
    """With ``kv_capacity_tokens`` set: the KV one instance holds."""
    kv_bytes_per_token: int
    gpus_per_instance: int
    source: str


def from_profile(path: str | Path, *, kv_bytes: int, kv_capacity_tokens: int, gpus_per_instance: int = 1
                 ) -> Calibration:
    cost = CostModel.load(path)
    if kv_capacity_tokens > 0:
        cost = dataclasses.replace(cost, kv_capacity_tokens=kv_capacity_tokens)
    if cost.kv_capacity_tokens <= 0:
        raise ConfigError("the profile has no KV capacity: pass kv_capacity_tokens", field="kv_capacity_tokens")
    return Calibration(cost, kv_bytes, gpus_per_instance, f"profile:{path}")


def from_splitwise(path: str | Path | None = None, *, model: str = "llama2-70b",
                   hardware: str = "h100-80gb", tensor_parallel: int = 4, memory_utilization: float = 0.9,
                   transfer_overlap: float = 0.0, link_bandwidth_gbps: float | None = None) -> Calibration:
    """The Splitwise table's (model, hardware, TP) fit, with KV capacity from the datasheet HBM.

    ``path=None``: the shared table if it is checked out beside the repository, else the packaged fit
    of the same table (only the configurations in ``cost_models/``)."""
    if path is None and not DEFAULT_SPLITWISE.exists():
        fit = packaged_fit(model, hardware, tensor_parallel)
        if not fit.exists():
            raise ConfigError(f"no packaged fit for {model}/{hardware}/tp{tensor_parallel} and no Splitwise table "
                              f"at {DEFAULT_SPLITWISE}: pass the table's path", field="splitwise")
        cost = CostModel.load(fit)
    else:
        cost = cost_model_from_splitwise(path or DEFAULT_SPLITWISE, model=model, hardware=hardware,
                                         tensor_parallel=tensor_parallel)
    kv = SPLITWISE_KV_BYTES_PER_TOKEN[model]
    shape, hw = MODELS.get(model), HARDWARE[hardware]
    params = shape.num_params if shape is not None else 176e9
    capacity = kv_capacity_tokens(hbm_gb=hw.hbm_gb, num_gpus=tensor_parallel, num_params=params, kv_bytes=kv,
                                  memory_utilization=memory_utilization)
    updates = {"kv_capacity_tokens": capacity, "transfer_overlap": transfer_overlap}
    if link_bandwidth_gbps is not None:
        updates["link_bandwidth_gbps"] = link_bandwidth_gbps
    return Calibration(dataclasses.replace(cost, **updates), kv, tensor_parallel, cost.source)


def from_datasheet(*, hardware: str = "h100-80gb", model: str = "llama2-70b", num_gpus: int = 4,
                   mfu: float = 0.5, mbu: float = 0.7, memory_utilization: float = 0.9) -> Calibration:
    if hardware not in HARDWARE:
        raise ConfigError(f"unknown hardware {hardware!r} (known: {sorted(HARDWARE)})", field="hardware")
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r} (known: {sorted(MODELS)})", field="model")
    hw, shape = HARDWARE[hardware], MODELS[model]
    cost = cost_model_from_datasheet(
        peak_flops=hw.peak_flops, hbm_bandwidth_gbps=hw.hbm_bandwidth_gbps, num_params=shape.num_params,
        num_layers=shape.num_layers, hidden_size=shape.hidden_size, kv_bytes_per_token=shape.kv_bytes_per_token,
        num_gpus=num_gpus, mfu=mfu, mbu=mbu, hbm_capacity_gb=hw.hbm_gb, memory_utilization=memory_utilization)
    return Calibration(cost, shape.kv_bytes_per_token, num_gpus, f"datasheet:{model}/{hardware}x{num_gpus}")


def engine_spec(calibration: Calibration, block_size: int, **overrides) -> EngineSpec:
    """One instance's engine at ``block_size``: KV blocks from the calibration's capacity."""
    capacity = calibration.cost.kv_capacity_tokens
    if capacity <= 0:
        raise ConfigError("the calibration has no KV capacity", field="kv_capacity_tokens")
    return EngineSpec(num_blocks=max(1, capacity // block_size), block_size=block_size, **overrides)


def cluster_config(calibration: Calibration, block_size: int, *, num_prefill: int, num_decode: int,
                   routing: RoutingConfig | None = None, batch_policy: str = "static",
                   max_num_requests: int = 128, max_num_batched_tokens: int = 2048, **options) -> SimConfig:
    """A ``SimConfig`` whose engines and KV size come from ``calibration`` (options: other SimConfig fields)."""
    spec = engine_spec(calibration, block_size, batch_policy=batch_policy, max_num_requests=max_num_requests,
                       max_num_batched_tokens=max_num_batched_tokens)
    return SimConfig(num_prefill=num_prefill, num_decode=num_decode, prefill_engine=spec, decode_engine=spec,
                     kv_bytes_per_token=calibration.kv_bytes_per_token, routing=routing or RoutingConfig(),
                     gpus_per_instance=calibration.gpus_per_instance, **options)
