"""pdserve's cluster simulator: real traces through the real routing policy, on modelled engines.

A discrete-event simulation of N prefill and M decode instances. The router's own code decides
(``router.cluster_state.ClusterState``, ``router.policy.route``, the length predictor, the prefix
index fed by KV events); the engines are models timed by the router's ``CostModel`` and batched
by the engine's own batch policies (``common.batch_policy``). No torch.

| module | owns |
|---|---|
| ``trace`` | Mooncake JSONL / Azure CSV readers, time scaling, caps |
| ``calibration`` | cost model + KV capacity from a profile, the Splitwise table or a datasheet |
| ``config`` | ``EngineSpec`` (one engine), ``SimConfig`` (the cluster) |
| ``job`` | a request's life inside one simulated engine |
| ``kv_blocks`` | one instance's KV blocks: prefix cache (LRU), accounting, KV events |
| ``decode_batch`` | the decode batch advanced a segment of steps at a time |
| ``engine`` | one instance: continuous batching, chunked prefill, preemption, the step clock |
| ``admission`` | one instance's admission of waiting requests through the engine's batch policy |
| ``pools`` | instances' lifecycle (start, drain, stop), load reports, GPU-hours |
| ``cluster`` | the event loop and a request's path through router, prefill, transfer, decode |
| ``rejection`` | BASELINE: early rejection on current load, around the real policy |
| ``scaling`` / ``signals`` | the ``Scaler`` hook, its signals, a reactive scaler |
| ``autoscaler_policy`` | the autoscaler's own sizing policy behind the ``Scaler`` hook |
| ``metrics`` / ``plots`` | records, summary (TTFT, TBT, SLO attainment, goodput, GPU-hours), PNGs |
| ``batching`` | one instance under the engine's batch policies (true vs predicted lengths) |
| ``cli`` | ``pdserve simulate`` (``add_arguments`` / ``run``) |

Typical use::

    from simulator import Simulation, cluster_config, from_splitwise, read_mooncake
    trace = read_mooncake(path, rate_scale=2.0)
    cal = from_splitwise()                      # Llama2-70B on 4 x H100
    config = cluster_config(cal, trace.block_size, num_prefill=8, num_decode=8,
                            routing=RoutingConfig(policy="transfer_aware"))
    print(Simulation(config, cal.cost).run(trace).summary())
"""

from simulator.calibration import (
    Calibration,
    cluster_config,
    engine_spec,
    from_datasheet,
    from_profile,
    from_splitwise,
)
from simulator.cluster import Simulation
from simulator.config import EngineSpec, SimConfig
from simulator.metrics import RequestRecord, SimResult
from simulator.scaling import ReactiveScaler, Replicas, Scaler, ScalingConfig, ScalingSignals
from simulator.trace import Trace, TraceRequest, read_azure, read_mooncake, read_trace, scaled

__all__ = [
    "Calibration", "EngineSpec", "ReactiveScaler", "Replicas", "RequestRecord", "Scaler", "ScalingConfig",
    "ScalingSignals", "SimConfig", "SimResult", "Simulation", "Trace", "TraceRequest", "cluster_config",
    "engine_spec", "from_datasheet", "from_profile", "from_splitwise", "read_azure", "read_mooncake", "read_trace",
    "scaled",
]
