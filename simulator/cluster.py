"""The simulated cluster: a trace through the router's real policy into simulated engines.

Per request, exactly what the router server does (router/service.py): predict the output length
(``router.length_predictor``), build a ``RoutingRequest`` from the prompt's block hashes,
``snapshot = ClusterState.snapshot_for(request, now)``, ``route(...)`` (``router.policy``),
``ClusterState.on_routed``; then, as the simulated workers progress, ``on_prefill_done`` (first
token), ``on_tokens`` (once per engine segment, like once per streamed message), ``on_finished``.
Instances feed the same ``ClusterState`` with periodic load reports (``simulator.pools``) and
with KV events from their simulated prefix caches. So what the simulator shows is what the
router does; only the workers are models.

The data path of a request routed to (P, D), as in pdserve::

    arrival ─route─► D reserves blocks ─► P prefills (chunked, prefix-cached) ─► KV P→D over the link
            ─► first token at D ─► D decodes in its continuous batch ─► finished
    (local prefill: D computes the prompt itself; global_cache_aware may first fetch a cached
     prefix from another instance to P)

The KV transfer takes ``latency + bytes / bandwidth`` of the true link (``SimConfig.links``),
one transfer at a time per (P, D) pair; ``CostModel.transfer_overlap`` of it hides behind the
prefill compute. The router's link table starts from the cost model's default and learns from
the transfer times reported back, as in production.

Events run in time order; at equal times: step boundaries, transfers, instance start-ups,
arrivals, scaling ticks, then step planning, so a step starting at ``t`` sees all work that
arrived at ``t``. No randomness besides the policy's own seed: a run is a function of its
inputs.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass

from common.batch_policy import BatchPolicy, make_batch_policy
from common.errors import ConfigError
from router.cluster_state import ClusterState
from router.cost_model import CostModel
from router.length_predictor import LengthPredictor, RequestFeatures, make_predictor
from router.links import LinkTable
from router.policy import route
from router.prefix_index import KVEventBatch
from router.snapshot import DECODE, PREFILL, RoutingDecision, RoutingRequest
from simulator.config import SimConfig
from simulator.job import Job, JobMode
from simulator.metrics import RequestRecord, SimResult
from simulator.pools import Lifecycle, Pools, SimInstance
from simulator.rejection import early_rejection_route
from simulator.scaling import Scaler, ScalingConfig
from simulator.signals import SignalWindow
from simulator.trace import Trace, TraceRequest

BOUNDARY, TRANSFER, FETCH, READY, SCALE, PLAN = 0, 1, 2, 3, 5, 9  # also the order at equal times
ARRIVAL = 4


@dataclass(slots=True, eq=False)
class _Flight:
    """A routed request on its way through the cluster."""

    record: RequestRecord
    features: RequestFeatures
    decision: RoutingDecision
    decode: SimInstance
    prefill: SimInstance | None
    decode_job: Job
    prefill_job: Job | None = None


class Simulation:
    """One run of a trace through a simulated cluster (see the module docstring)."""

    def __init__(self, config: SimConfig, cost: CostModel, *, scaler: Scaler | None = None,
                 scaling: ScalingConfig | None = None,
                 batch_policy: Callable[[str], BatchPolicy] | None = None) -> None:
        self.config = config
        self.cost = cost
        self.scaler = scaler
        self.scaling = scaling or ScalingConfig()
        self.batch_policy = batch_policy or (lambda role: make_batch_policy(
            (config.prefill_engine if role == PREFILL else config.decode_engine).batch_policy))
        self.links = config.links if config.links is not None else LinkTable(cost.default_link)
        self._route = early_rejection_route if config.rejection == "early" else route

    # --- set-up and the loop ----------------------------------------------------------------------

    def run(self, trace: Trace) -> SimResult:
        config = self.config
        if trace.block_size != config.block_size:
            raise ConfigError(f"the trace's block size is {trace.block_size}, the cluster's {config.block_size}",
                              field="block_size")
        wall = time.perf_counter()
        self.state = ClusterState(cost=self.cost, block_size=config.block_size,
                                  kv_bytes_per_token=config.kv_bytes_per_token, links=LinkTable(self.cost.default_link),
                                  ack_delay_s=config.router_ack_delay_s,
                                  report_timeout_s=config.router_report_timeout_s, seed=config.seed)
        self.predictor: LengthPredictor | None = (None if config.length_predictor == "oracle"
                                                  else make_predictor(config.length_predictor))
        self.pools = Pools(config, self.cost, self.state, self.batch_policy)
        for _ in range(config.num_prefill):
            self.pools.create(PREFILL, 0.0, ready=True)
        for _ in range(config.num_decode):
            self.pools.create(DECODE, 0.0, ready=True)
        self.records: list[RequestRecord] = []
        self.flights: dict[str, _Flight] = {}
        self._heap: list[tuple] = []
        self._seq = 0
        self._link_free: dict[tuple[str, str], float] = {}
        self.window = SignalWindow(self.pools)
        if self.scaler is not None:
            self._push(self.scaler.interval_s, SCALE, None)
        arrivals = trace.requests
        i, n = 0, len(arrivals)
        heap = self._heap
        now = 0.0
        while i < n or heap:
            if i < n and (not heap or (arrivals[i].arrival_s, ARRIVAL) < heap[0][:2]):
                now = arrivals[i].arrival_s
                self._arrive(arrivals[i], now)
                i += 1
                continue
            now, kind, _, a, b = heapq.heappop(heap)
            if kind == BOUNDARY:
                self._boundary(a, b, now)
            elif kind == PLAN:
                self._plan(a, now)
            elif kind == TRANSFER:
                self._transfer_done(a, now)
            elif kind == FETCH:
                self._fetch_done(a, now)
            elif kind == READY:
                if a.lifecycle == Lifecycle.STARTING and a.instance_id in self.pools.instances:
                    self.pools.activate(a, now)
            elif kind == SCALE:
                self._scale(now, more=i < n or bool(self.flights))
        end = max((r.finish_s for r in self.records), default=now)
        engines = [inst.engine for inst in self.pools.instances.values()] + self.pools.retired
        return SimResult(
            records=self.records, ttft_slo_s=config.routing.ttft_slo_s, tbt_slo_s=config.routing.tbt_slo_s,
            gpu_hours=self.pools.gpu_hours(max(end, now)), end_s=end, timeline=list(self.pools.timeline),
            gaps=[g for e in engines for g in e.gaps], num_preemptions=sum(e.num_preemptions for e in engines),
            prefix_queried_tokens=sum(e.ledger.num_queried_tokens for e in engines),
            prefix_hit_tokens=sum(e.ledger.num_hit_tokens for e in engines), wall_s=time.perf_counter() - wall,
            extra={"scaling": self.window.history})

    def _push(self, t: float, kind: int, a: object, b: object = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, kind, self._seq, a, b))

    # --- engines ----------------------------------------------------------------------------------

    def _poke(self, inst: SimInstance, now: float) -> None:
        """New work reached the instance: end its decode segment early, or plan a step if idle."""
        end = inst.engine.interrupt(now)
        if end is not None:
            self._push(end, BOUNDARY, inst, inst.engine.version)
        elif not inst.engine.busy and not inst.plan_pending:
            inst.plan_pending = True
            self._push(now, PLAN, inst)

    def _add(self, inst: SimInstance, job: Job, now: float) -> None:
        self.pools.flush(inst, now)
        inst.engine.add(job)
        self._poke(inst, now)

    def _boundary(self, inst: SimInstance, version: int, now: float) -> None:
        engine = inst.engine
        if version != engine.version or not engine.busy or inst.lifecycle == Lifecycle.STOPPED:
            return
        self.pools.flush(inst, now)
        engine.complete(now)
        self._outputs(inst, now)
        if not inst.plan_pending:
            inst.plan_pending = True
            self._push(now, PLAN, inst)

    def _plan(self, inst: SimInstance, now: float) -> None:
        inst.plan_pending = False
        if inst.engine.busy or inst.lifecycle == Lifecycle.STOPPED:
            return
        self.pools.flush(inst, now)
        end = inst.engine.plan(now)
        self._outputs(inst, now)
        if end is not None:
            self._push(end, BOUNDARY, inst, inst.engine.version)

    def _outputs(self, inst: SimInstance, now: float) -> None:
        """Act on what the engine produced: the router hears of it, the data path moves on."""
        engine, state = inst.engine, self.state
        out = engine.take_output()
        for job in out.reserved:
            flight = job.owner
            flight.record.num_decode_cached_tokens = job.num_cached_now
            self._start_prefill(flight, now)
        for job in out.prefilled:
            self._start_transfer(job.owner, now)
        for job in out.first_tokens:
            record = job.owner.record
            record.first_token_s = now
            record.num_cached_tokens = job.num_cached_now
            state.on_prefill_done(job.request_id, now)
            self.window.first_token(record)
        for job, n in out.progress:
            state.on_tokens(job.request_id, n)
        for job in out.finished:
            self._finish(job.owner, now)
        stored, removed = engine.ledger.take_events()
        if stored or removed:
            state.apply_kv_events(KVEventBatch(inst.instance_id, self.config.block_size,
                                               stored_hashes=tuple(stored), removed_hashes=tuple(removed)), now)
        self.pools.maybe_stop(inst, now)

    # --- the request's path -----------------------------------------------------------------------

    def _arrive(self, request: TraceRequest, now: float) -> None:
        record = RequestRecord(request.request_id, now, request.num_prompt_tokens, request.num_output_tokens)
        self.records.append(record)
        self.window.arrival(record)
        features = RequestFeatures(request.num_prompt_tokens, request.block_hashes)
        predicted = (request.num_output_tokens if self.predictor is None
                     else self.predictor.predict(features))
        record.predicted_output_tokens = predicted
        routing = RoutingRequest(request.request_id, request.num_prompt_tokens, request.block_hashes,
                                 predicted_output_tokens=predicted)
        self.pools.flush_all(now)
        snapshot = self.state.snapshot_for(routing, now)
        decision = self._route(routing, snapshot, self.cost, self.config.routing)
        self.state.on_routed(routing, decision, now)
        record.predicted_ttft_s = decision.predicted_ttft_s
        if decision.rejected:
            record.rejected = True
            record.reject_reason = decision.reject_reason
            record.num_outcomes += 1
            self.window.rejection()
            return  # the router does not learn output lengths from refused requests
        decode = self.pools.instances[decision.decode_id]
        prefill = self.pools.instances[decision.prefill_id] if decision.prefill_id is not None else None
        record.decode_id, record.prefill_id = decode.instance_id, decision.prefill_id
        mode = JobMode.COLOCATED if prefill is None else JobMode.REMOTE_KV
        job = Job(request.request_id, mode, request.num_prompt_tokens, request.num_output_tokens, predicted,
                  request.block_hashes, now)
        flight = _Flight(record, features, decision, decode, prefill, job)
        job.owner = flight
        self.flights[request.request_id] = flight
        if prefill is not None:
            prefill.num_pending += 1
        self._add(decode, job, now)

    def _start_prefill(self, flight: _Flight, now: float) -> None:
        """The decode side reserved blocks: the prefill instance computes the prompt."""
        prefill, record = flight.prefill, flight.record
        job = Job(record.request_id, JobMode.PREFILL_ONLY, record.num_prompt_tokens, 1, 1,
                  flight.decode_job.block_hashes, now, owner=flight)
        flight.prefill_job = job
        decision, bs = flight.decision, self.config.block_size
        source = decision.prefix_source_id
        if source is not None and decision.num_cached_tokens > 0 and source in self.pools.instances:
            own = prefill.engine.ledger.lookup(job.block_hashes, (record.num_prompt_tokens - 1) // bs)[0] * bs
            missing = decision.num_cached_tokens - own
            if missing > 0:
                job.num_fetched_blocks = decision.num_cached_tokens // bs
                seconds = self.links.get(source, prefill.instance_id).transfer_time(
                    missing * self.config.kv_bytes_per_token)
                self._push(now + seconds, FETCH, flight)
                return
        prefill.num_pending -= 1
        self._add(prefill, job, now)

    def _fetch_done(self, flight: _Flight, now: float) -> None:
        flight.prefill.num_pending -= 1
        self._add(flight.prefill, flight.prefill_job, now)

    def _start_transfer(self, flight: _Flight, now: float) -> None:
        """The prompt is done on the prefill instance: its KV moves to the decode instance."""
        record, job = flight.record, flight.prefill_job
        record.num_cached_tokens = job.num_cached_now
        src, dst = flight.prefill.instance_id, flight.decode.instance_id
        num_bytes = (record.num_prompt_tokens - record.num_decode_cached_tokens) * self.config.kv_bytes_per_token
        seconds = self.links.get(src, dst).transfer_time(num_bytes)
        hidden = self.cost.transfer_overlap * min(now - job.prefill_started_s, seconds)
        start = max(now - hidden, self._link_free.get((src, dst), float("-inf")))
        end = max(start + seconds, now)
        self._link_free[(src, dst)] = end
        record.transfer_s = seconds
        self._push(end, TRANSFER, flight)

    def _transfer_done(self, flight: _Flight, now: float) -> None:
        prefill, decode, record = flight.prefill, flight.decode, flight.record
        self.pools.flush(prefill, now)
        prefill.engine.release(flight.prefill_job)
        self._poke(prefill, now)  # freed blocks may admit waiting prompts
        self._outputs(prefill, now)
        self.pools.flush(decode, now)
        decode.engine.kv_landed(flight.decode_job)
        self._poke(decode, now)
        record.first_token_s = now
        self.state.on_prefill_done(record.request_id, now, num_decode_cached_tokens=record.num_decode_cached_tokens,
                                   kv_transfer_s=record.transfer_s)
        self.window.first_token(record)
        self._outputs(decode, now)

    def _finish(self, flight: _Flight, now: float) -> None:
        record = flight.record
        record.finish_s = now
        record.num_outcomes += 1
        self.state.on_finished(record.request_id)
        if self.predictor is not None:
            self.predictor.observe(flight.features, record.num_output_tokens)
        del self.flights[record.request_id]
        self.window.finished(record)

    # --- scaling ----------------------------------------------------------------------------------

    def _scale(self, now: float, *, more: bool) -> None:
        scaler = self.scaler
        assert scaler is not None
        signals = self.window.signals(now, scaler.interval_s)
        want = scaler.decide(signals, self.window.pool_sizes(), now)
        for role, target in ((PREFILL, want.prefill), (DECODE, want.decode)):
            self._resize(role, max(0 if role == PREFILL else 1, target), now)
        if more:
            self._push(now + scaler.interval_s, SCALE, None)

    def _resize(self, role: str, target: int, now: float) -> None:
        pools = self.pools
        serving = pools.of_role(role, Lifecycle.ACTIVE, Lifecycle.STARTING)
        draining = pools.of_role(role, Lifecycle.DRAINING)
        while len(serving) < target and draining:
            inst = draining.pop()
            pools.undrain(inst, now)
            serving.append(inst)
        while len(serving) < target:
            inst = pools.create(role, now, ready=False)
            self._push(now + self.scaling.startup_delay_s, READY, inst)
            serving.append(inst)
        if len(serving) > target:
            # cancel instances still starting first (newest first), then drain the least loaded
            order = sorted(serving, key=lambda i: (i.lifecycle != Lifecycle.STARTING,
                                                   i.engine.num_running + len(i.engine.waiting) + i.num_pending,
                                                   -int(i.instance_id[1:])))
            for inst in order[:len(serving) - target]:
                if inst.lifecycle == Lifecycle.STARTING:
                    pools.cancel(inst, now)
                else:
                    pools.drain(inst, now)
                    pools.maybe_stop(inst, now)
