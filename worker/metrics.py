"""Publishes a worker's engine state as Prometheus metrics, sampled on the engine thread.

Gauges (running, awaiting KV, waiting, KV usage, queued prefill tokens, step
time, role) are set from the worker's load snapshot (``AdminService.load``,
the one its load reports use) every ``interval_s``; counters
(prefix-cache queries and hits, preemptions) advance by the snapshot's deltas.
After a role flip the old role's series are removed, so a dashboard counting
workers per role sees the flip at the next scrape.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from common import metrics
from engine.core import EngineLoad
from worker.roles import RoleGate

logger = logging.getLogger(__name__)

GAUGES = (metrics.WORKER_RUNNING, metrics.WORKER_AWAITING_KV, metrics.WORKER_WAITING, metrics.WORKER_KV_USAGE,
          metrics.WORKER_QUEUED_PREFILL, metrics.WORKER_STEP_TIME, metrics.WORKER_ROLE)


async def publish_engine_metrics(load_snapshot: Callable[[], Awaitable[EngineLoad]], gate: RoleGate, *, model: str,
                                 instance: str, interval_s: float = 1.0) -> None:
    last = {"queries": 0, "hits": 0, "preemptions": 0}
    role = None
    while True:
        try:
            load = await load_snapshot()
        except Exception:  # a bad snapshot must not stop the publisher
            logger.exception("engine load snapshot failed")
            await asyncio.sleep(interval_s)
            continue
        if role is not None and role != gate.role:
            for gauge in GAUGES:
                gauge.remove(model, role, instance)
        role = gate.role
        labels = {"model": model, "role": role, "instance": instance}
        # apart: a request awaiting its KV is prefill's demand, not decode's (the autoscaler tells them apart)
        metrics.WORKER_RUNNING.labels(**labels).set(load.num_running)
        metrics.WORKER_AWAITING_KV.labels(**labels).set(load.num_awaiting_kv)
        metrics.WORKER_WAITING.labels(**labels).set(load.num_waiting)
        metrics.WORKER_KV_USAGE.labels(**labels).set(1.0 - load.num_free_blocks / max(1, load.num_total_blocks))
        metrics.WORKER_QUEUED_PREFILL.labels(**labels).set(load.num_queued_prefill_tokens)
        steps = load.recent_step_times_s
        metrics.WORKER_STEP_TIME.labels(**labels).set(sum(steps) / len(steps) if steps else 0.0)
        metrics.WORKER_ROLE.labels(**labels).set(1)
        for key, counter, value in (("queries", metrics.WORKER_PREFIX_QUERIES, load.num_prefix_cache_queries),
                                    ("hits", metrics.WORKER_PREFIX_HITS, load.num_prefix_cache_hits),
                                    ("preemptions", metrics.WORKER_PREEMPTIONS, load.num_preemptions)):
            counter.labels(**labels).inc(max(0, value - last[key]))
            last[key] = value
        await asyncio.sleep(interval_s)
