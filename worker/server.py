"""Worker process lifecycle: engine thread, gRPC server, signals, drain.

``serve(role, engine_config, worker_config)`` builds the engine and the role's
services, serves until SIGTERM or SIGINT, then drains: it stops taking new
requests, lets in-flight ones finish (up to ``drain_timeout_s``), and stops.
Once listening it prints one line, ``PDSERVE_READY role=<role> address=<host:port>``,
which launchers and tests wait for (the port may have been picked by the OS).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import grpc

from common.config import EngineConfig, WorkerConfig
from common.errors import PdserveError
from common.tls import TlsConfig, add_port
from engine.async_engine import AsyncEngine
from engine.core import EngineCore
from kvtransfer.host_memory import keep_transfer_buffers
from kvtransfer.packer import set_switch_interval

logger = logging.getLogger(__name__)


async def serve(role: str, engine_config: EngineConfig, worker_config: WorkerConfig, tls: TlsConfig | None = None
                ) -> None:
    tls = tls or TlsConfig()
    from common.rpc import worker_pb2_grpc as pb_grpc
    from decode_worker.service import DecodeWorker
    from prefill_worker.service import PrefillWorker
    from worker.admin import AdminService
    from worker.metrics import publish_engine_metrics
    from worker.roles import RoleGate, RoleSwitcher

    core = EngineCore(engine_config, record_kv_events=True)
    engine = AsyncEngine(core)
    await engine.start()
    max_bytes = worker_config.max_message_mib * 2**20
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_bytes),
                                      ("grpc.max_send_message_length", max_bytes),
                                      ("grpc.so_reuseport", 0)])
    port = add_port(server, worker_config.address, tls)
    address = worker_config.advertise_address or f"{worker_config.host}:{port}"
    instance_id = worker_config.instance_id or address
    model_name = Path(engine_config.model).name
    # both roles live in every worker; the gate says which one takes new work (role flips need no restart)
    gate = RoleGate(role)
    prefill = PrefillWorker(engine, worker_config, instance_id=instance_id, model=model_name)
    decode = DecodeWorker(engine, worker_config, instance_id=instance_id, model=model_name, tls=tls)
    services: dict[str, Any] = {"prefill": prefill, "decode": decode}
    registration = None

    async def switched(new_role: str) -> None:
        if registration is not None:
            await registration.set_role(new_role)

    switcher = RoleSwitcher(gate, services, on_switched=switched)
    admin = AdminService(engine, gate=gate, switcher=switcher, instance_id=instance_id, model=model_name,
                         in_flight=lambda: prefill.num_in_flight() + decode.num_in_flight(),
                         transfers_in_flight=lambda: prefill.num_transfers_in_flight()
                         + decode.num_transfers_in_flight())
    for service in services.values():
        service.gate = gate
        service.register(server)
        await service.start()
    pb_grpc.add_WorkerAdminServicer_to_server(admin, server)
    metrics_task = None
    if worker_config.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(worker_config.metrics_port, addr=worker_config.host)
        metrics_task = asyncio.create_task(publish_engine_metrics(admin.load, gate, model=model_name,
                                                                  instance=instance_id))
    await server.start()
    if worker_config.redis_url:
        from router.discovery import WorkerEndpoint
        from worker.registration import RedisRegistration

        registration = RedisRegistration(worker_config.redis_url, WorkerEndpoint(instance_id, role, address),
                                         ttl_s=worker_config.registry_ttl_s)
        await registration.start()
    print(f"PDSERVE_READY role={role} address={address}", flush=True)
    logger.info("%s worker %s serving %s", role, instance_id, engine_config.model)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if registration is not None:  # first, so routers stop sending new work
        await registration.stop()
    logger.info("draining (up to %.0fs)", worker_config.drain_timeout_s)
    remaining = await admin.drain(worker_config.drain_timeout_s)
    if remaining:
        logger.warning("stopping with %d requests still in flight", remaining)
    if metrics_task is not None:
        metrics_task.cancel()
    await server.stop(grace=1.0)
    for service in services.values():
        await service.close()
    await engine.stop()


def run(role: str, engine_config: EngineConfig, worker_config: WorkerConfig, tls: TlsConfig | None = None) -> int:
    keep_transfer_buffers()
    set_switch_interval()  # the engine thread and the KV packer get the GIL from a busy event loop promptly
    try:
        asyncio.run(serve(role, engine_config, worker_config, tls))
    except PdserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

