"""One instance under the engine's batch policies: FCFS static, dynamic (SLA), shortest-first.

The comparison the engine's scheduler is built for, at a scale the CPU engine cannot run: one
colocated instance (prompt and decode on the same engine, no prefill pool) behind the router,
batched by ``common.batch_policy`` objects, the same code ``engine/scheduler.py`` runs. Each
policy runs with the true output lengths (an oracle) and with the router's length predictor,
since both memory-aware policies plan with predicted lengths.

    result = run_batching(trace, calibration, policy="shortest_first", lengths="predicted")
"""

from __future__ import annotations

import dataclasses

from common.batch_policy import BatchPolicy, DynamicBatchPolicy, make_batch_policy
from common.errors import ConfigError
from router.routing_config import RoutingConfig
from simulator.calibration import Calibration, cluster_config
from simulator.cluster import Simulation
from simulator.metrics import SimResult
from simulator.trace import Trace


def make_policy(name: str, *, tbt_target_s: float) -> BatchPolicy:
    """The engine's policy by name, the dynamic one aiming at the simulation's TBT SLO."""
    if name == "dynamic":
        return DynamicBatchPolicy(tbt_target_s=tbt_target_s)
    return make_batch_policy(name)


def run_batching(trace: Trace, calibration: Calibration, *, policy: str, lengths: str = "true",
                 max_num_requests: int = 128, max_num_batched_tokens: int = 2048, ttft_slo_s: float = 2.0,
                 tbt_slo_s: float = 0.1, kv_capacity_tokens: int | None = None,
                 predictor: str = "prefix_history") -> SimResult:
    """Replay ``trace`` on one colocated instance batched by ``policy`` with true or predicted lengths."""
    if lengths not in ("true", "predicted"):
        raise ConfigError(f"must be 'true' or 'predicted', got {lengths!r}", field="lengths")
    if kv_capacity_tokens is not None:
        calibration = dataclasses.replace(calibration, cost=dataclasses.replace(
            calibration.cost, kv_capacity_tokens=kv_capacity_tokens))
    config = cluster_config(calibration, trace.block_size, num_prefill=0, num_decode=1,
                            routing=RoutingConfig(policy="round_robin", reject=False, ttft_slo_s=ttft_slo_s,
                                                  tbt_slo_s=tbt_slo_s, chunk_tokens=max_num_batched_tokens),
                            batch_policy=policy, max_num_requests=max_num_requests,
                            max_num_batched_tokens=max_num_batched_tokens,
                            length_predictor="oracle" if lengths == "true" else predictor)
    sim = Simulation(config, calibration.cost, batch_policy=lambda role: make_policy(policy, tbt_target_s=tbt_slo_s))
    return sim.run(trace)
