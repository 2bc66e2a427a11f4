"""The router's HTTP app inside a Ray Serve replica: the wiring of ``router.server.serve`` without
its socket, uvicorn server and signal handlers (Serve's proxy owns HTTP, Serve's controller owns
the replica's lifecycle).

``await RouterApp.start(config, routing, instance=...)`` loads the tokenizer and the model's shape,
starts discovery (Redis in Ray: workers register with their node IP and port), the worker pool and
the shared state, and builds the guarded ASGI app (API keys, body limit) that the ingress
deployment hands to Serve. ``await close()`` stops them in reverse order.

This mirrors ``router/server.py`` step for step; once the router exposes that wiring as a function
of its own (see the packaging notes), this module shrinks to a call of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import RouterConfig
from common.tokenizer import Tokenizer
from router.auth import ApiKeys
from router.cluster_state import ClusterState
from router.cost_model import CostModel
from router.discovery import Discovery
from router.http_api import ApiSettings, GuardMiddleware, create_app
from router.length_predictor import PrefixHistoryPredictor
from router.routing_config import RoutingConfig
from router.server import DEFAULT_COST_MODEL, TRANSPORTS, ModelShape, make_discovery
from router.service import Router, RouterLimits
from router.workers import WorkerPool

logger = logging.getLogger(__name__)


@dataclass
class RouterApp:
    asgi: Any
    router: Router
    pool: WorkerPool
    discovery: Discovery
    shared: Any

    @classmethod
    async def start(cls, config: RouterConfig, routing: RoutingConfig, *, instance: str,
                    block_size: int = 16) -> RouterApp:
        tokenizer = Tokenizer.from_dir(config.model)
        shape = ModelShape.from_dir(config.model)
        max_model_len = min(config.max_model_len or shape.max_position_embeddings, shape.max_position_embeddings)
        served = config.served_model_name or Path(config.model).name
        cost = CostModel.load(config.cost_model or DEFAULT_COST_MODEL)
        state = ClusterState(cost=cost, block_size=block_size, kv_bytes_per_token=shape.kv_bytes_per_token)
        pool = WorkerPool(state, load_interval_ms=config.load_interval_ms)
        discovery = make_discovery(config)
        discovery.on_change(pool.update)
        await discovery.start()
        pool.update(discovery.endpoints())
        shared = None
        if config.redis_url:
            from router.shared_state import RedisState

            shared = RedisState(config.redis_url, instance)
            await shared.start()
        router = Router(
            tokenizer=tokenizer, state=state, pool=pool, cost=cost, routing=routing,
            predictor=PrefixHistoryPredictor(),
            limits=RouterLimits(max_concurrency=config.max_concurrency, max_migrations=config.max_migrations,
                                request_timeout_s=config.request_timeout_s,
                                kv_transport=TRANSPORTS[config.kv_transport], kv_num_streams=config.kv_num_streams),
            block_size=block_size, labels={"model": served, "instance": instance}, shared=shared)
        keys = ApiKeys.load(file=config.api_keys_file or None, keys=config.api_keys)
        settings = ApiSettings(served_model_name=served, max_model_len=max_model_len, max_n=config.max_n,
                               max_body_bytes=config.max_body_bytes, instance=instance)
        app = create_app(router, tokenizer, settings, keys=keys, ready=lambda: bool(pool.healthy("decode")))
        asgi = GuardMiddleware(app, keys=keys, max_body_bytes=config.max_body_bytes)
        logger.info("router %s serving %s with policy %s (discovery %s)", instance, served, routing.policy,
                    config.discovery)
        return cls(asgi=asgi, router=router, pool=pool, discovery=discovery, shared=shared)

    async def close(self) -> None:
        await self.discovery.stop()
        await self.pool.close()
        if self.shared is not None:
            await self.shared.stop()
