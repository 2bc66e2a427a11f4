"""The numbers a scaler reads, gathered from the simulated cluster over each scaling interval.

What the autoscaler would query from Prometheus (``pdserve_*`` metrics): arrivals and their
prompt lengths, output lengths and TPOT of finished requests, TTFTs, rejections, the prefix-cache
counters, per-role busy time and the decode instances' KV usage. :class:`SignalWindow` counts
them as the cluster runs and turns them into one :class:`~simulator.scaling.ScalingSignals` per
tick (kept in ``history`` for plots and results).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from router.snapshot import DECODE, PREFILL
from simulator.metrics import RequestRecord
from simulator.pools import Lifecycle, Pools
from simulator.scaling import PoolSizes, RoleCount, ScalingSignals


class SignalWindow:
    def __init__(self, pools: Pools) -> None:
        self.pools = pools
        self.history: list[dict[str, Any]] = []
        self._reset()
        self._busy: dict[str, float] = {}
        self._prefix = (0, 0)

    def _reset(self) -> None:
        self._arrivals = 0
        self._prompt_tokens = 0
        self._ttfts: list[float] = []
        self._tpots: list[float] = []
        self._output_tokens = 0
        self._finished = 0
        self._rejections = 0

    # --- counting (called by the cluster) ---------------------------------------------------------

    def arrival(self, record: RequestRecord) -> None:
        self._arrivals += 1
        self._prompt_tokens += record.num_prompt_tokens

    def first_token(self, record: RequestRecord) -> None:
        self._ttfts.append(record.ttft_s)

    def finished(self, record: RequestRecord) -> None:
        self._finished += 1
        self._output_tokens += record.num_output_tokens
        if record.num_output_tokens > 1:
            self._tpots.append(record.tpot_s)

    def rejection(self) -> None:
        self._rejections += 1

    # --- one tick ---------------------------------------------------------------------------------

    def pool_sizes(self) -> PoolSizes:
        def count(role: str) -> RoleCount:
            insts = self.pools.of_role(role)
            return RoleCount(sum(i.lifecycle == Lifecycle.ACTIVE for i in insts),
                             sum(i.lifecycle == Lifecycle.STARTING for i in insts),
                             sum(i.lifecycle == Lifecycle.DRAINING for i in insts))
        return PoolSizes(count(PREFILL), count(DECODE))

    def _utilization(self, role: str, interval: float) -> float:
        serving = self.pools.of_role(role, Lifecycle.ACTIVE)
        if not serving:
            return 0.0
        total = 0.0
        for inst in serving:
            busy = inst.engine.busy_s
            total += min(1.0, (busy - self._busy.get(inst.instance_id, 0.0)) / interval)
            self._busy[inst.instance_id] = busy
        return total / len(serving)

    def signals(self, now: float, interval: float) -> ScalingSignals:
        pools = self.pools
        queried = hits = 0
        for inst in pools.instances.values():
            queried += inst.engine.ledger.num_queried_tokens
            hits += inst.engine.ledger.num_hit_tokens
        for engine in pools.retired:
            queried += engine.ledger.num_queried_tokens
            hits += engine.ledger.num_hit_tokens
        d_queried, d_hits = queried - self._prefix[0], hits - self._prefix[1]
        self._prefix = (queried, hits)
        decodes = pools.of_role(DECODE, Lifecycle.ACTIVE)
        loads = [d.engine.load(now) for d in decodes]
        kv = [1.0 - load.num_free_blocks / load.num_total_blocks for load in loads]
        slots = [load.num_running / d.engine.spec.max_num_requests for load, d in zip(loads, decodes)]
        ttft = np.array(self._ttfts) if self._ttfts else np.zeros(1)
        tpot = np.array(self._tpots) if self._tpots else np.zeros(1)
        signals = ScalingSignals(
            now_s=now, interval_s=interval, request_rate_rps=self._arrivals / interval,
            mean_prompt_tokens=self._prompt_tokens / self._arrivals if self._arrivals else 0.0,
            mean_output_tokens=self._output_tokens / self._finished if self._finished else 0.0,
            prefix_hit_rate=d_hits / d_queried if d_queried else 0.0,
            ttft_mean_s=float(ttft.mean()), ttft_p90_s=float(np.percentile(ttft, 90)),
            itl_mean_s=float(tpot.mean()), itl_p90_s=float(np.percentile(tpot, 90)),
            prefill_utilization=self._utilization(PREFILL, interval),
            decode_utilization=self._utilization(DECODE, interval),
            decode_kv_usage=float(np.mean(kv)) if kv else 0.0,
            decode_batch_usage=float(np.mean(slots)) if slots else 0.0,
            num_waiting=sum(len(i.engine.waiting) for i in pools.instances.values()),
            # as the workers export it: requests awaiting their KV are prefill's backlog, not decoding
            num_running_decode=sum(load.num_running - len(d.engine.awaiting) for load, d in zip(loads, decodes)),
            num_waiting_decode=sum(load.num_waiting for load in loads),
            num_queued_prefill_tokens=sum(p.engine.load(now).num_queued_prefill_tokens
                                          for p in pools.of_role(PREFILL, Lifecycle.ACTIVE)),
            rejection_rate_rps=self._rejections / interval)
        sizes = self.pool_sizes()
        self.history.append({"t_s": now, "prefill": sizes.prefill.provisioned, "decode": sizes.decode.provisioned,
                             "request_rate_rps": round(signals.request_rate_rps, 3),
                             "prefill_utilization": round(signals.prefill_utilization, 3),
                             "decode_kv_usage": round(signals.decode_kv_usage, 3),
                             "decode_batch_usage": round(signals.decode_batch_usage, 3),
                             "ttft_p90_s": round(signals.ttft_p90_s, 3), "itl_p90_s": round(signals.itl_p90_s, 4)})
        self._reset()
        return signals
