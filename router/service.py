"""The router's core: admit, route, dispatch, stream, migrate. Both front ends call it.

``Router.generate(request_id, prompt, sampling)`` yields :class:`Delta` s for
one completion choice. It

1. admits the request or refuses it at once (``max_concurrency``: 429);
2. asks the routing policy for a (prefill, decode) pair over a snapshot of the
   cluster, refusing early (429 + Retry-After, or 503 with no workers) when the
   policy predicts the SLOs cannot be met;
3. streams from the decode worker, detokenizing here (the router owns the
   tokenizer), cutting text at stop strings;
4. if the decode worker fails mid-stream, re-sends prompt + the tokens so far
   to another decode worker (migration) and goes on, so the client sees
   neither a gap nor a repeat; greedy output is identical to an uninterrupted
   run;
5. on the way out (finished, failed, or the client went away) cancels the
   worker call, which aborts the request on the worker and frees its blocks.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from common import metrics
from common.block_hash import hash_blocks
from common.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    OverloadedError,
    PdserveError,
    UnavailableError,
)
from common.rpc import worker_pb2 as pb
from common.rpc_convert import sampling_to_proto
from common.sampling import SamplingParams
from common.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer
from router.cluster_state import ClusterState
from router.cost_model import CostModel
from router.length_predictor import LengthPredictor, RequestFeatures
from router.policy import route
from router.routing_config import RoutingConfig
from router.shared_state import SharedState
from router.snapshot import (
    REJECT_UNAVAILABLE,
    ClusterSnapshot,
    InstanceState,
    RoutingDecision,
    RoutingRequest,
)
from router.workers import WorkerPool

logger = logging.getLogger(__name__)

MIGRATABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
              grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED, grpc.StatusCode.DATA_LOSS}


@dataclass(slots=True)
class Delta:
    token_ids: list[int]
    text: str
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(frozen=True)
class RouterLimits:
    max_concurrency: int = 256
    max_migrations: int = 2
    request_timeout_s: float = 600.0
    kv_transport: int = pb.KV_TRANSPORT_GRPC
    kv_num_streams: int = 1


class _WorkerGone(Exception):
    """The decode worker's stream ended without finishing the request."""


class Router:
    def __init__(self, *, tokenizer: Tokenizer, state: ClusterState, pool: WorkerPool, cost: CostModel,
                 routing: RoutingConfig, predictor: LengthPredictor, limits: RouterLimits,
                 block_size: int, labels: dict[str, str] | None = None, shared: SharedState | None = None,
                 prefix_ttl_s: float = 120.0) -> None:
        self.tokenizer = tokenizer
        self.state = state
        self.pool = pool
        self.cost = cost
        self.routing = routing
        self.predictor = predictor
        self.limits = limits
        self.block_size = block_size
        self.num_active = 0
        self.labels = labels or {"model": "", "instance": ""}
        self.shared = shared  # None: a single router, whose ClusterState already knows everything
        self.prefix_ttl_s = prefix_ttl_s
        self._own_in_flight: dict[str, tuple[int, int]] = {}

    # --- routing --------------------------------------------------------------------------------

    async def _decide(self, request: RoutingRequest, exclude: set[str]) -> RoutingDecision:
        snapshot = self.state.snapshot_for(request, time.monotonic())
        healthy = {c.instance_id for c in self.pool.clients.values() if c.healthy}
        snapshot = dataclasses.replace(
            snapshot,
            decode=tuple(i for i in snapshot.decode if i.instance_id in healthy and i.instance_id not in exclude),
            prefill=tuple(i for i in snapshot.prefill if i.instance_id in healthy))
        if self.shared is not None:
            snapshot = await self._with_shared(request, snapshot)
        if not snapshot.decode:
            raise UnavailableError("no decode workers are available")
        decision = route(request, snapshot, self.cost, self.routing)
        if decision.rejected:
            metrics.ROUTER_REJECTIONS.labels(**self.labels, reason=decision.reject_reason).inc()
            if decision.reject_reason == REJECT_UNAVAILABLE:
                raise UnavailableError(decision.explain or "no workers are available")
            raise OverloadedError(f"the cluster cannot meet the SLO now ({decision.reject_reason})",
                                  retry_after_s=decision.retry_after_s, code=decision.reject_reason)
        logger.debug("route %s: %s", request.request_id, decision.explain)
        placement = "local" if decision.prefill_id is None else "remote"
        metrics.ROUTER_ROUTING_DECISIONS.labels(**self.labels, policy=decision.policy, placement=placement).inc()
        return decision

    async def _with_shared(self, request: RoutingRequest, snapshot: ClusterSnapshot) -> ClusterSnapshot:
        """Fold in what other router replicas know: prefixes they placed, work they have in flight."""
        owners = await self.shared.lookup_prefix(list(request.block_hashes))
        cached = dict(snapshot.cached_tokens)
        for instance_id, blocks in owners.items():
            cached[instance_id] = max(cached.get(instance_id, 0), blocks * self.block_size)
        others: dict[str, tuple[int, int]] = {}
        for instance_id, (req, tokens) in self.shared.in_flight().items():
            own_req, own_tokens = self._own_in_flight.get(instance_id, (0, 0))
            if req - own_req > 0 or tokens - own_tokens > 0:
                others[instance_id] = (max(0, req - own_req), max(0, tokens - own_tokens))

        def plus(inst: InstanceState) -> InstanceState:
            extra = others.get(inst.instance_id)
            if extra is None:
                return inst
            return dataclasses.replace(inst, num_inflight_requests=inst.num_inflight_requests + extra[0],
                                       num_inflight_tokens=inst.num_inflight_tokens + extra[1])

        return dataclasses.replace(snapshot, cached_tokens=cached,
                                   prefill=tuple(plus(i) for i in snapshot.prefill),
                                   decode=tuple(plus(i) for i in snapshot.decode))

    async def _share_routed(self, request: RoutingRequest, decision: RoutingDecision, sign: int) -> None:
        """Publish (sign 1) or retire (sign -1) a routed request's in-flight work; record its prefix."""
        if self.shared is None:
            return
        target = decision.prefill_id or decision.decode_id
        tokens = request.num_prompt_tokens - decision.num_cached_tokens
        req, tok = self._own_in_flight.get(target, (0, 0))
        self._own_in_flight[target] = (req + sign, tok + sign * tokens)
        await self.shared.add_in_flight(target, sign, sign * tokens)
        if sign > 0:
            for instance_id in {target, decision.decode_id}:
                await self.shared.record_prefix(instance_id, list(request.block_hashes), self.prefix_ttl_s)

    def check_admission(self, num_choices: int = 1) -> None:
        if self.num_active + num_choices > self.limits.max_concurrency:
            metrics.ROUTER_REJECTIONS.labels(**self.labels, reason="concurrency").inc()
            raise OverloadedError("too many requests in flight", retry_after_s=1.0, code="concurrency")

    # --- one choice -----------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt: list[int], sampling: SamplingParams) -> AsyncIterator[Delta]:
        # admission check and count happen together, with no await between: concurrent arrivals
        # cannot all slip under the limit
        self.check_admission()
        self.num_active += 1
        output: list[int] = []
        features = RequestFeatures(num_prompt_tokens=len(prompt), max_tokens=sampling.max_tokens,
                                   block_hashes=tuple(hash_blocks(prompt, self.block_size)))
        detok = IncrementalDetokenizer(self.tokenizer, prompt, skip_special_tokens=sampling.skip_special_tokens)
        matcher = StopStringMatcher(sampling.stop, sampling.include_stop_str_in_output) if sampling.stop else None
        exclude: set[str] = set()
        queued_at = time.monotonic()
        finished = False  # ran to its end: only such outputs teach the length predictor
        try:
            for attempt in range(self.limits.max_migrations + 1):
                attempt_id = request_id if attempt == 0 else f"{request_id}.m{attempt}"
                continuation = prompt + output
                remaining = sampling.max_tokens - len(output)
                routing_request = RoutingRequest(
                    attempt_id, len(continuation), tuple(hash_blocks(continuation, self.block_size)),
                    predicted_output_tokens=min(remaining, self.predictor.predict(features)))
                decision = await self._decide(routing_request, exclude)
                self.state.on_routed(routing_request, decision, time.monotonic())
                await self._share_routed(routing_request, decision, 1)
                started = [False]
                try:
                    async for delta in self._stream(attempt_id, continuation, dataclasses.replace(
                            sampling, max_tokens=remaining), decision, detok, matcher, output, queued_at,
                            routing_request.predicted_output_tokens):
                        if not started[0]:
                            started[0] = True
                            await self._share_routed(routing_request, decision, -1)
                        yield delta
                        if delta.finish_reason is not None:
                            finished = True
                            return
                    return
                except (_WorkerGone, grpc.aio.AioRpcError) as e:
                    if isinstance(e, grpc.aio.AioRpcError) and e.code() not in MIGRATABLE:
                        raise _map_rpc_error(e) from e
                    exclude.add(decision.decode_id)
                    metrics.ROUTER_MIGRATIONS.labels(**self.labels).inc()
                    logger.warning("decode worker %s failed during %s after %d tokens (%s); migrating",
                                   decision.decode_id, request_id, len(output), e)
                finally:
                    self.state.on_finished(attempt_id)
                    if not started[0]:
                        await self._share_routed(routing_request, decision, -1)
            raise UnavailableError(f"decode workers failed {self.limits.max_migrations + 1} times")
        finally:
            self.num_active -= 1
            if finished:  # not rejected, failed or cut off by the client: those lengths say nothing
                self.predictor.observe(features, len(output))

    async def _stream(self, attempt_id: str, prompt: list[int], sampling: SamplingParams, decision: RoutingDecision,
                      detok: IncrementalDetokenizer, matcher: StopStringMatcher | None, output: list[int],
                      queued_at: float, predicted_output_tokens: int = 0) -> AsyncIterator[Delta]:
        client = self.pool.get(decision.decode_id)
        if client is None:
            raise _WorkerGone(f"{decision.decode_id} left")
        request = pb.GenerateRequest(request_id=attempt_id, prompt_token_ids=prompt,
                                     sampling=sampling_to_proto(sampling),
                                     predicted_output_tokens=predicted_output_tokens)
        if decision.prefill_id is not None:
            request.prefill.address = self.pool.address(decision.prefill_id)
            request.prefill.transport = self.limits.kv_transport
            request.prefill.num_streams = self.limits.kv_num_streams
        call = client.decode.Generate(request, timeout=self.limits.request_timeout_s)
        metrics.REQUEST_PHASE.labels(self.labels["model"], self.labels["instance"], "router_queue").observe(
            time.monotonic() - queued_at)
        first = True
        try:
            async for msg in call:
                if first:
                    info = msg.prefill_info
                    remote = info.mode == pb.PrefillInfo.MODE_REMOTE
                    self.state.on_prefill_done(attempt_id, time.monotonic(),
                                               num_decode_cached_tokens=info.num_cached_tokens,
                                               kv_transfer_s=info.kv_transfer_s if remote else None,
                                               prefill_queue_s=info.prefill_queue_s,
                                               prefill_compute_s=info.prefill_compute_s)
                    first = False
                output.extend(msg.token_ids)
                self.state.on_tokens(attempt_id, len(msg.token_ids))
                text = detok.add(list(msg.token_ids))
                if msg.finished:
                    text += detok.flush()
                stopped = False
                if matcher is not None:
                    text, stopped, _ = matcher.feed(text)
                    if msg.finished and not stopped:
                        text += matcher.flush()
                finish = "stop" if stopped else (msg.finish_reason or "stop") if msg.finished else None
                yield Delta(list(msg.token_ids), text, list(msg.logprobs), finish)
                if finish is not None:
                    return
        finally:
            call.cancel()
        raise _WorkerGone("the stream ended before the request finished")


def _map_rpc_error(error: grpc.aio.AioRpcError) -> PdserveError:
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return OverloadedError(details, retry_after_s=1.0)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError(details)
    return UnavailableError(f"decode worker error: {code.name} {details}")
