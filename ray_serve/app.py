"""pdserve as a Ray Serve application: a router ingress and prefill and decode worker deployments.

    serve run ray_serve.app:build_app model=/models/m redis_url=redis://redis:6379/0

or, declaratively (KubeRay's RayService ``serveConfigV2``, ``serve deploy``), an application with
``import_path: ray_serve.app:build_app`` and ``args`` of this shape::

    model: /models/model               # checkpoint directory, present on every node
    redis_url: redis://host:6379/0     # the worker registry and the routers' shared state
    engine: {dtype: bfloat16}          # EngineConfig fields, both pools
    worker: {drain_timeout_s: 60}      # WorkerConfig fields, both pools
    prefill: {engine: {}, worker: {}}  # per-pool overrides
    decode: {engine: {}, worker: {}}
    router: {max_concurrency: 256}     # RouterConfig fields
    routing: {policy: transfer_aware}  # RoutingConfig fields
    ready_timeout_s: 600               # how long a worker may take to load the model

Deployments (names fixed: the autoscaler's Ray Serve actuator scales them by name, its
``--ray-prefill-deployment`` / ``--ray-decode-deployment`` defaults):

- ``PrefillWorker`` / ``DecodeWorker``: each replica runs one pdserve worker process (ray_serve.worker_process)
  on the replica's node IP and a free port, registered in Redis under the replica's id; Serve's
  health check calls the worker's WorkerAdmin.Health; a replica stopping drains its worker. They
  take no Serve traffic: the router talks to workers over gRPC, as in Kubernetes.
- ``RouterIngress``: the ingress, the router's OpenAI HTTP app behind Serve's HTTP proxy, with Redis
  discovery (it sees exactly the workers registered there, so a scaled pool shows up within a
  registry poll).

Replica counts come from the Serve config's ``deployments`` section; the application sets
``external_scaler_enabled`` so that the autoscaler may change them (Serve's own autoscaling stays off).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from common.config import EngineConfig, RouterConfig, WorkerConfig, build_config, config_flags
from common.errors import ConfigError
from common.tls import load_tls
from ray_serve.worker_process import WorkerProcess
from router.routing_config import RoutingConfig
from router.server import RouterApp

logger = logging.getLogger(__name__)

APP_NAME = "pdserve"
DEPLOYMENTS = {"prefill": "PrefillWorker", "decode": "DecodeWorker", "router": "RouterIngress"}
# fields the application sets itself
WORKER_OWNED = ("host", "port", "instance_id", "redis_url", "advertise_address")
ROUTER_OWNED = ("host", "port", "model", "discovery", "redis_url", "router_id", "workers")


@dataclass(frozen=True)
class AppArgs:
    """The application's ``args``, checked against the config tree before anything starts."""

    model: str
    redis_url: str
    engine: dict[str, Any] = field(default_factory=dict)
    worker: dict[str, Any] = field(default_factory=dict)
    prefill: dict[str, dict[str, Any]] = field(default_factory=dict)
    decode: dict[str, dict[str, Any]] = field(default_factory=dict)
    router: dict[str, Any] = field(default_factory=dict)
    routing: dict[str, Any] = field(default_factory=dict)
    ready_timeout_s: float = 600.0

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> AppArgs:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ConfigError(f"unknown application argument (expected {sorted(known)})", field=unknown[0])
        out = cls(**args)
        if not out.model:
            raise ConfigError("must name the checkpoint directory", field="model")
        if not out.redis_url:
            raise ConfigError("required: workers register there and the router discovers them there",
                              field="redis_url")
        for role in ("prefill", "decode"):
            extra = sorted(set(getattr(out, role)) - {"engine", "worker"})
            if extra:
                raise ConfigError(f"{role} takes only engine and worker overrides", field=f"{role}.{extra[0]}")
            out.engine_options(role)  # validate now: a bad field fails the deploy, named
            out.worker_options(role)
        owned = sorted(set(out.router) & set(ROUTER_OWNED))
        if owned:
            raise ConfigError("set by the application", field=f"router.{owned[0]}")
        build_config(RouterConfig, **out.router_options("validation"))
        build_config(RoutingConfig, **out.routing)
        return out

    def engine_options(self, role: str) -> dict[str, Any]:
        options = {**self.engine, **getattr(self, role).get("engine", {}), "model": self.model}
        build_config(EngineConfig, **options)
        return options

    def worker_options(self, role: str) -> dict[str, Any]:
        options = {**self.worker, **getattr(self, role).get("worker", {})}
        owned = sorted(set(options) & set(WORKER_OWNED))
        if owned:
            raise ConfigError("set by the application", field=f"{role}.worker.{owned[0]}")
        build_config(WorkerConfig, **options)
        return options

    def router_options(self, instance: str) -> dict[str, Any]:
        return {**self.router, "model": self.model, "discovery": "redis", "redis_url": self.redis_url,
                "router_id": instance}


class _WorkerReplica:
    """A replica owning one worker process of ``role``."""

    role = ""

    async def __init__(self, args: dict[str, Any]) -> None:
        parsed = AppArgs.parse(args)
        context = serve.get_replica_context()
        self.instance_id = f"{context.deployment}-{context.replica_tag}"
        host = ray.util.get_node_ip_address()
        worker = {**parsed.worker_options(self.role), "host": host, "port": 0, "instance_id": self.instance_id,
                  "redis_url": parsed.redis_url}
        self._drain_timeout_s = build_config(WorkerConfig, **worker).drain_timeout_s
        flags = config_flags(parsed.engine_options(self.role)) + config_flags(worker)
        self._process = await WorkerProcess.start(self.role, flags, ready_timeout_s=parsed.ready_timeout_s)

    async def check_health(self) -> None:
        """Called by Serve every health_check_period_s; raising marks the replica unhealthy."""
        await self._process.check()

    async def address(self) -> str:
        return self._process.address

    async def __del__(self) -> None:
        """Serve's graceful shutdown (scale-down, redeploy): leave the registry, drain, stop."""
        process = getattr(self, "_process", None)
        if process is not None:
            code = await process.stop(self._drain_timeout_s + 10)
            logger.info("%s worker %s stopped (exit %s)", self.role, self.instance_id, code)


@serve.deployment(name=DEPLOYMENTS["prefill"], health_check_period_s=10, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=75)
class PrefillWorker(_WorkerReplica):
    role = "prefill"


@serve.deployment(name=DEPLOYMENTS["decode"], health_check_period_s=10, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=75)
class DecodeWorker(_WorkerReplica):
    role = "decode"


@serve.deployment(name=DEPLOYMENTS["router"], max_ongoing_requests=1024, graceful_shutdown_timeout_s=35,
                  ray_actor_options={"num_cpus": 1})
@serve.ingress()
class RouterIngress:
    """The OpenAI HTTP API; holds handles to the worker deployments so that they belong to the app."""

    async def __init__(self, prefill: Any, decode: Any, args: dict[str, Any]) -> None:
        parsed = AppArgs.parse(args)
        context = serve.get_replica_context()
        instance = f"{context.deployment}-{context.replica_tag}"
        config = build_config(RouterConfig, **parsed.router_options(instance))
        self._pools = {"prefill": prefill, "decode": decode}
        self._app = await RouterApp.start(config, build_config(RoutingConfig, **parsed.routing), instance=instance,
                                          tls=load_tls())  # PDSERVE_TLS_*, as the workers get them

    def __serve_build_asgi_app__(self) -> Any:
        return self._app.asgi

    async def __del__(self) -> None:
        app = getattr(self, "_app", None)
        if app is not None:
            await app.close()


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder (``import_path: ray_serve.app:build_app``)."""
    parsed = AppArgs.parse(args)
    shutdown = {role: float(parsed.worker_options(role).get("drain_timeout_s", 60.0)) + 15
                for role in ("prefill", "decode")}
    prefill = PrefillWorker.options(graceful_shutdown_timeout_s=shutdown["prefill"]).bind(dict(args))
    decode = DecodeWorker.options(graceful_shutdown_timeout_s=shutdown["decode"]).bind(dict(args))
    return RouterIngress.bind(prefill, decode, dict(args))
