"""The simulator's configuration: one engine's spec and the whole simulated cluster.

Frozen dataclasses validated on construction (a wrong value raises ``ConfigError`` naming the
field), as everywhere in pdserve. The router's own knobs stay in ``router.routing_config.
RoutingConfig``; the simulator takes one and hands it to the policy unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from common.errors import ConfigError
from router.links import LinkTable
from router.routing_config import RoutingConfig

REJECTION_MODES = ("policy", "early")


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ConfigError(message, field=name)


@dataclass(frozen=True)
class EngineSpec:
    """One simulated instance's engine (the parts of ``EngineConfig`` that shape its timing)."""

    num_blocks: int
    block_size: int
    max_num_batched_tokens: int = 2048
    """Token budget per step: decode tokens first, then prompt chunks (chunked prefill)."""
    max_num_requests: int = 128
    batch_policy: str = "static"
    """A name in ``common.batch_policy.POLICIES``."""
    enable_prefix_caching: bool = True
    recheck_steps: int = 16
    """While requests wait, a decode instance asks its batch policy again after at most this many
    steps (the engine asks every step; the simulator moves a whole segment of steps at a time)."""

    def __post_init__(self) -> None:
        _check(self.num_blocks >= 1, "num_blocks", f"must be >= 1, got {self.num_blocks}")
        _check(self.block_size >= 1, "block_size", f"must be >= 1, got {self.block_size}")
        _check(self.max_num_requests >= 1, "max_num_requests", f"must be >= 1, got {self.max_num_requests}")
        _check(self.max_num_batched_tokens >= self.max_num_requests, "max_num_batched_tokens",
               "must be >= max_num_requests (every decoding request gets its token each step)")
        _check(self.recheck_steps >= 1, "recheck_steps", f"must be >= 1, got {self.recheck_steps}")


@dataclass(frozen=True)
class SimConfig:
    """A simulated cluster: pools, engines, the router's configuration, the clocks."""

    num_prefill: int
    num_decode: int
    prefill_engine: EngineSpec
    decode_engine: EngineSpec
    kv_bytes_per_token: int
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    rejection: str = "policy"
    """"policy": whatever the routing policy decides (transfer_aware rejects by prediction when
    ``routing.reject``); "early": the early-rejection baseline (simulator.rejection) on top."""
    links: LinkTable | None = None
    """The true network (per-pair links); None: every pair uses the cost model's default link."""
    report_period_s: float = 0.1
    """Every instance sends a load report this often (simulated time)."""
    length_predictor: str = "prefix_history"
    """A name for router.length_predictor.make_predictor, or "oracle" (the true output length)."""
    gpus_per_instance: int = 1
    seed: int = 0
    router_ack_delay_s: float = 0.25
    router_report_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        _check(self.num_prefill >= 0, "num_prefill", f"must be >= 0, got {self.num_prefill}")
        _check(self.num_decode >= 1, "num_decode", f"must be >= 1, got {self.num_decode}")
        _check(self.kv_bytes_per_token > 0, "kv_bytes_per_token", "must be positive")
        _check(self.rejection in REJECTION_MODES, "rejection",
               f"must be 'policy' or 'early', got {self.rejection!r}")
        _check(self.report_period_s > 0 and math.isfinite(self.report_period_s), "report_period_s",
               f"must be a positive number, got {self.report_period_s}")
        _check(self.gpus_per_instance >= 1, "gpus_per_instance", "must be >= 1")
        _check(self.prefill_engine.block_size == self.decode_engine.block_size, "block_size",
               "prefill and decode engines must use one block size (the router hashes at one)")

    @property
    def block_size(self) -> int:
        return self.decode_engine.block_size
