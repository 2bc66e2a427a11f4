"""The simulated instances of both pools: their lifecycle, load reports and GPU accounting.

Lifecycle of an instance (``Lifecycle``)::

    STARTING ──startup delay──► ACTIVE ──scale down──► DRAINING ──idle──► STOPPED
                                   ▲────── scale up (undrain) ──┘

A STARTING instance is provisioned (its GPUs count) but unknown to the router; it joins the
router's view with its first load report and a KV-event reset. A DRAINING instance reports
``draining`` (every routing policy skips it), finishes what it holds, then stops and is
unregistered. GPU-hours integrate provisioned instances (STARTING, ACTIVE, DRAINING) x GPUs
per instance over simulated time.

Load reports are periodic (``report_period_s``, phases spread across instances) but built
lazily: :meth:`Pools.flush` applies an instance's latest due report just before anything changes
that instance and before every routing decision, computed from the engine's state at the
report's own time (the engine interpolates inside a decode segment). The router thus sees
exactly what periodic reports would have shown, without an event per report.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

from common.batch_policy import BatchPolicy
from router.cluster_state import ClusterState
from router.cost_model import CostModel
from router.prefix_index import KVEventBatch
from router.snapshot import DECODE, PREFILL
from simulator.config import SimConfig
from simulator.engine import SimEngine


class Lifecycle(enum.IntEnum):
    STARTING = 0
    ACTIVE = 1
    DRAINING = 2
    STOPPED = 3


@dataclass(slots=True, eq=False)
class SimInstance:
    instance_id: str
    role: str
    engine: SimEngine
    lifecycle: Lifecycle
    phase_s: float
    last_report_s: float = -math.inf
    plan_pending: bool = False
    num_pending: int = 0
    """Requests routed here that have not reached the engine yet (a prefill waiting for its
    decode side's reservation): a draining instance waits for them too."""


class Pools:
    def __init__(self, config: SimConfig, cost: CostModel, state: ClusterState,
                 make_policy: Callable[[str], BatchPolicy]) -> None:
        self.config = config
        self.cost = cost
        self.state = state
        self.make_policy = make_policy
        self.instances: dict[str, SimInstance] = {}
        self.active: dict[str, SimInstance] = {}  # reporting to the router (ACTIVE or DRAINING)
        self.retired: list[SimEngine] = []  # engines of stopped instances (their statistics count)
        self._counters = {PREFILL: 0, DECODE: 0}
        self._gpu_s = 0.0
        self._last_t = 0.0
        self.timeline: list[tuple[float, int, int, int, int]] = []
        """(time, provisioned prefill, provisioned decode, serving prefill, serving decode) at each change."""

    # --- membership -----------------------------------------------------------------------------

    def create(self, role: str, now: float, *, ready: bool) -> SimInstance:
        """Provision an instance; ``ready`` makes it ACTIVE at once (the initial pools)."""
        n = self._counters[role]
        self._counters[role] = n + 1
        instance_id = f"{role[0]}{n}"
        spec = self.config.prefill_engine if role == PREFILL else self.config.decode_engine
        engine = SimEngine(instance_id, role, spec, self.cost, self.make_policy(role))
        period = self.config.report_period_s
        phase = (n * 0.618034 * period + (0.5 * period if role == DECODE else 0.0)) % period
        inst = SimInstance(instance_id, role, engine, Lifecycle.STARTING, phase)
        self._account(now)
        self.instances[instance_id] = inst
        if ready:
            self.activate(inst, now)
        self._mark(now)
        return inst

    def activate(self, inst: SimInstance, now: float) -> None:
        """The instance is up: it joins the router's view (first report, KV-event reset)."""
        inst.lifecycle = Lifecycle.ACTIVE
        self.active[inst.instance_id] = inst
        self.state.apply_kv_events(KVEventBatch(inst.instance_id, self.config.block_size, reset=True), now)
        self._report(inst, now)
        self._mark(now)

    def drain(self, inst: SimInstance, now: float) -> None:
        self.flush(inst, now)
        inst.lifecycle = Lifecycle.DRAINING
        inst.engine.draining = True
        self._report(inst, now)
        self._mark(now)

    def undrain(self, inst: SimInstance, now: float) -> None:
        self.flush(inst, now)
        inst.lifecycle = Lifecycle.ACTIVE
        inst.engine.draining = False
        self._report(inst, now)
        self._mark(now)

    def maybe_stop(self, inst: SimInstance, now: float) -> bool:
        """Stop a draining instance once it holds nothing; True if it stopped."""
        if inst.lifecycle != Lifecycle.DRAINING or inst.num_pending or not inst.engine.idle():
            return False
        self._account(now)
        inst.lifecycle = Lifecycle.STOPPED
        del self.active[inst.instance_id]
        del self.instances[inst.instance_id]
        self.retired.append(inst.engine)
        self.state.unregister(inst.instance_id)
        self._mark(now)
        return True

    def cancel(self, inst: SimInstance, now: float) -> None:
        """Give back an instance that is still starting (it never served)."""
        assert inst.lifecycle == Lifecycle.STARTING
        self._account(now)
        inst.lifecycle = Lifecycle.STOPPED
        del self.instances[inst.instance_id]
        self._mark(now)

    def of_role(self, role: str, *lifecycles: Lifecycle) -> list[SimInstance]:
        return [i for i in self.instances.values() if i.role == role and (not lifecycles or i.lifecycle in lifecycles)]

    # --- load reports ---------------------------------------------------------------------------

    def _report(self, inst: SimInstance, at: float) -> None:
        self.state.apply_load_report(inst.engine.load(at), at)
        inst.last_report_s = at

    def flush(self, inst: SimInstance, now: float) -> None:
        """Apply the instance's latest report due at or before ``now``, if not applied yet."""
        period = self.config.report_period_s
        due = inst.phase_s + math.floor((now - inst.phase_s) / period) * period
        if due > inst.last_report_s and inst.instance_id in self.active:
            self._report(inst, due)

    def flush_all(self, now: float) -> None:
        for inst in self.active.values():
            self.flush(inst, now)

    # --- GPU accounting -------------------------------------------------------------------------

    def _provisioned(self) -> int:
        return len(self.instances)

    def _account(self, now: float) -> None:
        self._gpu_s += (now - self._last_t) * self._provisioned() * self.config.gpus_per_instance
        self._last_t = now

    def _mark(self, now: float) -> None:
        counts = [0, 0, 0, 0]
        for i in self.instances.values():
            counts[i.role == DECODE] += 1
            if i.lifecycle == Lifecycle.ACTIVE:
                counts[2 + (i.role == DECODE)] += 1
        row = (now, *counts)
        if self.timeline and self.timeline[-1][0] == now:
            self.timeline[-1] = row
        else:
            self.timeline.append(row)

    def gpu_hours(self, now: float) -> float:
        self._account(now)
        return self._gpu_s / 3600.0
