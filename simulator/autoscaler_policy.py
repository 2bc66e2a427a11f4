"""The autoscaler's own sizing step behind the simulator's ``Scaler`` hook.

:class:`autoscaler.service.Planner` is the I/O-free part of the deployed loop: the warm-up hold
after a gap, the forecaster, capacities from the cost model and the pure ``decide``, with its
``PoolState`` between steps. This adapter feeds it the simulated signals (mapped onto
``autoscaler.signals.ScalingSignals``) and the simulated pool sizes, and answers the replicas it
decides, so a simulation runs the autoscaler as deployed, not a copy. The simulator's signal
window is one scaling interval, which stands for Prometheus' ``rate_window_s``. The simulator has
no role flips: a flip is carried out as a drain of one role and a start of the other (slower than
the real flip, which skips the restart).
"""

from __future__ import annotations

from autoscaler.config import AutoscalerConfig, SizingConfig
from autoscaler.forecast import make_forecaster
from autoscaler.policy import ScalingDecision
from autoscaler.service import Planner
from autoscaler.signals import ScalingSignals as AutoscalerSignals
from router.cost_model import CostModel
from simulator.scaling import PoolSizes, Replicas, ScalingSignals


class AutoscalerPolicyScaler:
    def __init__(self, cost: CostModel, sizing: SizingConfig, *, interval_s: float = 30.0,
                 config: AutoscalerConfig | None = None) -> None:
        self.interval_s = interval_s
        self.config = config or AutoscalerConfig(interval_s=interval_s, rate_window_s=interval_s)
        self.planner = Planner(self.config, sizing, cost=cost, forecaster=make_forecaster(
            self.config.forecaster, alpha=self.config.holt_alpha, beta=self.config.holt_beta))
        self.decisions: list[ScalingDecision] = []

    def decide(self, signals: ScalingSignals, pools: PoolSizes, now: float) -> Replicas:
        current = {"prefill": pools.prefill.serving + pools.prefill.starting,
                   "decode": pools.decode.serving + pools.decode.starting}
        reading = AutoscalerSignals(
            time=now, request_rate=signals.request_rate_rps, prompt_tokens_mean=signals.mean_prompt_tokens,
            output_tokens_mean=signals.mean_output_tokens, prefix_hit_rate=signals.prefix_hit_rate,
            ttft_p90_s=signals.ttft_p90_s, itl_p90_s=signals.itl_p90_s,
            num_running_decode=float(signals.num_running_decode), num_waiting_decode=float(signals.num_waiting_decode),
            kv_usage_decode=signals.decode_kv_usage, num_queued_prefill_tokens=float(signals.num_queued_prefill_tokens))
        predicted = self.planner.observe(reading, now)
        decision, state, _ = self.planner.decide(predicted, current, now)
        self.decisions.append(decision)
        self.planner.settle(state, decision, now)
        return Replicas(decision.prefill, decision.decode)
