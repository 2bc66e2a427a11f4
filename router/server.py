"""The router process: wire tokenizer, discovery, worker pool, policy and front ends; serve.

``serve(config, routing)`` loads the tokenizer and the model's shape from the
checkpoint directory, starts discovery and the worker pool, serves the HTTP
API (and the gRPC API when ``grpc_port`` is set), prints
``PDSERVE_READY role=router address=http://HOST:PORT`` once listening, and on
SIGTERM/SIGINT stops taking requests, lets in-flight ones finish and exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import uvicorn

from common.config import RouterConfig
from common.errors import ConfigError, PdserveError
from common.rpc import api_pb2_grpc as api_grpc
from common.rpc import worker_pb2 as pb
from common.tls import TlsConfig
from common.tokenizer import Tokenizer
from router.auth import ApiKeys
from router.cluster_state import ClusterState
from router.cost_model import CostModel
from router.discovery import Discovery, FileDiscovery, RedisDiscovery, StaticDiscovery, parse_static
from router.grpc_api import CompletionsService
from router.http_api import ApiSettings, GuardMiddleware, create_app
from router.length_predictor import PrefixHistoryPredictor
from router.routing_config import RoutingConfig
from router.service import Router, RouterLimits
from router.workers import WorkerPool

logger = logging.getLogger(__name__)

TRANSPORTS = {"grpc": pb.KV_TRANSPORT_GRPC, "local": pb.KV_TRANSPORT_LOCAL, "nccl": pb.KV_TRANSPORT_NCCL}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEFAULT_COST_MODEL = Path(__file__).parent / "cost_models" / "demo_cpu.json"


@dataclass(frozen=True)
class ModelShape:
    """What the router needs of the model: context length and KV bytes per token (no torch)."""

    max_position_embeddings: int
    kv_bytes_per_token: int
    vocab_size: int

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelShape:
        path = Path(model_dir) / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}", field="model") from e
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        kv_heads = cfg.get("num_key_value_heads") or heads
        dtype = DTYPE_BYTES.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"), 2)
        return cls(int(cfg.get("max_position_embeddings", 4096)),
                   2 * cfg["num_hidden_layers"] * kv_heads * head_dim * dtype, int(cfg["vocab_size"]))


def make_discovery(config: RouterConfig) -> Discovery:
    if config.discovery == "static":
        return StaticDiscovery(parse_static(config.workers))
    if config.discovery == "redis":
        return RedisDiscovery(config.redis_url)
    if config.discovery == "file":
        return FileDiscovery(config.workers_file)
    from router.discovery_k8s import KubernetesDiscovery, default_namespace

    return KubernetesDiscovery(config.k8s_namespace or default_namespace(), prefill_selector=config.k8s_prefill_selector,
                               decode_selector=config.k8s_decode_selector, port_name=config.k8s_port_name)


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


@dataclass
class RouterApp:
    """A router's parts and its guarded ASGI app, without a socket or signal handlers: :func:`serve` runs it
    under uvicorn, a Ray Serve ingress replica hands ``asgi`` to Serve's proxy (``ray_serve/app.py``)."""

    asgi: Any
    router: Router
    settings: ApiSettings
    keys: ApiKeys
    pool: WorkerPool
    discovery: Discovery
    shared: Any

    @classmethod
    async def start(cls, config: RouterConfig, routing: RoutingConfig, *, instance: str, block_size: int = 16,
                    tls: TlsConfig | None = None) -> RouterApp:
        """Load the tokenizer and the model's shape, start discovery, the worker pool and the shared state,
        and build the app (API keys, body limit)."""
        tokenizer = Tokenizer.from_dir(config.model)
        shape = ModelShape.from_dir(config.model)
        max_model_len = min(config.max_model_len or shape.max_position_embeddings, shape.max_position_embeddings)
        vocab_size = max(shape.vocab_size, tokenizer.vocab_size)
        served = config.served_model_name or Path(config.model).name
        if config.cost_model:
            cost = CostModel.load(config.cost_model)
        else:
            cost = CostModel.load(DEFAULT_COST_MODEL)
            logger.warning("no --cost-model: using %s (%s); run `pdserve profile` against your workers",
                           DEFAULT_COST_MODEL.name, cost.source)
        state = ClusterState(cost=cost, block_size=block_size, kv_bytes_per_token=shape.kv_bytes_per_token)
        pool = WorkerPool(state, load_interval_ms=config.load_interval_ms, tls=tls)
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
                               max_body_bytes=config.max_body_bytes, instance=instance, vocab_size=vocab_size)
        app = create_app(router, tokenizer, settings, keys=keys, ready=lambda: bool(pool.healthy("decode")))
        asgi = GuardMiddleware(app, keys=keys, max_body_bytes=config.max_body_bytes)
        logger.info("router %s serving %s with policy %s", instance, served, routing.policy)
        return cls(asgi=asgi, router=router, settings=settings, keys=keys, pool=pool, discovery=discovery,
                   shared=shared)

    async def close(self) -> None:
        await self.discovery.stop()
        await self.pool.close()
        if self.shared is not None:
            await self.shared.stop()


async def serve(config: RouterConfig, routing: RoutingConfig, *, block_size: int = 16,
                tls: TlsConfig | None = None) -> None:
    sock = _bind(config.host, config.port)
    port = sock.getsockname()[1]
    instance = config.router_id or f"{config.host}:{port}"
    parts = await RouterApp.start(config, routing, instance=instance, block_size=block_size, tls=tls)
    settings = parts.settings
    server = uvicorn.Server(uvicorn.Config(parts.asgi, log_level="warning", access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=30, timeout_keep_alive=config.keep_alive_s))
    grpc_server = None
    if config.grpc_port is not None:
        grpc_server = grpc.aio.server()
        api_grpc.add_CompletionsServicer_to_server(CompletionsService(
            parts.router, parts.router.tokenizer, served_model_name=settings.served_model_name,
            max_model_len=settings.max_model_len, max_n=settings.max_n, keys=parts.keys,
            vocab_size=settings.vocab_size), grpc_server)
        grpc_port = grpc_server.add_insecure_port(f"{config.host}:{config.grpc_port}")
        await grpc_server.start()
        logger.info("gRPC API on %s:%d", config.host, grpc_port)
    serve_task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serve_task.done():
            serve_task.result()
        await asyncio.sleep(0.01)
    print(f"PDSERVE_READY role=router address=http://{config.host}:{port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await asyncio.wait([serve_task, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    await serve_task
    if grpc_server is not None:
        await grpc_server.stop(grace=5)
    await parts.close()


def run(config: RouterConfig, routing: RoutingConfig, tls: TlsConfig | None = None) -> int:
    try:
        asyncio.run(serve(config, routing, tls=tls))
    except PdserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
