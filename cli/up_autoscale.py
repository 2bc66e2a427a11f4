"""``pdserve up --autoscale``: the embedded cluster with the autoscaler in charge of the pools.

Lifecycle: a local Prometheus (unless ``--prometheus-url`` names one) scrapes
the router and every worker (a ``file_sd`` targets file); the autoscaler's
local actuator starts the initial workers and rewrites the router's workers
file and the targets file on every start, stop and flip; the router follows
the workers file; the autoscaler loop runs in this process until Ctrl-C or
SIGTERM, then router, workers and Prometheus are stopped in that order.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from autoscaler.actuators.local import LocalActuator
from autoscaler.cli import serve as serve_autoscaler
from autoscaler.config import AutoscalerConfig, SizingConfig
from cli.processes import Proc, pdserve
from cli.prometheus import LocalPrometheus, find_prometheus
from common.config import build_config
from common.errors import PdserveError
from router.discovery import WorkerEndpoint, write_workers_file

logger = logging.getLogger(__name__)


def _write_targets(path: Path, router: str | None, autoscaler: str | None, actuator: LocalActuator) -> None:
    groups = list(actuator.metrics_targets())
    if router:
        groups.append({"targets": [router], "labels": {"job": "pdserve-router"}})
    if autoscaler:
        groups.append({"targets": [autoscaler], "labels": {"job": "pdserve-autoscaler"}})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(groups))
    os.replace(tmp, path)


async def _main(args: argparse.Namespace, log_dir: Path) -> int:
    workers_file = log_dir / "workers.json"
    targets_file = log_dir / "targets.json"
    write_workers_file(workers_file, [])
    targets_file.write_text("[]")
    prometheus = None
    prometheus_url = getattr(args, "prometheus_url", None)
    if not prometheus_url:
        binary = find_prometheus()
        if binary is None:
            print("error: --autoscale needs Prometheus: install it (apt-get install prometheus) or pass "
                  "--prometheus-url", file=sys.stderr)
            return 2
        prometheus = LocalPrometheus(log_dir / "prometheus", file_sd=targets_file, scrape_interval_s=2.0,
                                     binary=binary)
        await asyncio.to_thread(prometheus.start)
        prometheus_url = prometheus.url
    config = build_config(AutoscalerConfig, args, actuator="local", prometheus_url=prometheus_url)
    sizing = build_config(SizingConfig, args)
    router: Proc | None = None
    router_metrics: list[str | None] = [None]

    autoscaler_metrics = (f"{config.metrics_host}:{config.metrics_port}"
                          if config.metrics_port else None)

    def publish(endpoints: list[WorkerEndpoint]) -> None:
        write_workers_file(workers_file, endpoints)
        _write_targets(targets_file, router_metrics[0], autoscaler_metrics, actuator)

    actuator = LocalActuator(args.model, log_dir=log_dir, worker_args=args.worker_arg, on_change=publish,
                             num_slots=sizing.max_prefill + sizing.max_decode, drain_timeout_s=config.drain_timeout_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await actuator.start(args.prefill, args.decode)
        router = await asyncio.to_thread(
            pdserve, ["router", "--model", args.model, "--host", args.host, "--port", str(args.port), "--discovery",
                      "file", "--workers-file", str(workers_file), "--policy", args.policy, *args.router_arg],
            log_dir / "router.log")
        router_metrics[0] = router.address.removeprefix("http://")
        publish(actuator.endpoints())
        from cli.up import _wait_ready

        await asyncio.to_thread(_wait_ready, router.address, [router])

        def ready() -> None:
            print(f"pdserve is ready: {router.address}/v1 (OpenAI API; model {Path(args.model).name}; "
                  f"autoscaled, Prometheus {prometheus_url})", flush=True)

        await serve_autoscaler(config, sizing, actuator, stop=stop, on_ready=ready)
        return 0
    except PdserveError as e:
        logger.error("%s", e)
        return 1
    finally:
        if router is not None:
            await asyncio.to_thread(router.stop, 30)
        await actuator.close()
        if prometheus is not None:
            await asyncio.to_thread(prometheus.stop)


def run_autoscaled(args: argparse.Namespace, log_dir: Path) -> int:
    # the decisions are what one reads afterwards: keep them beside the router's and workers' logs
    handler = logging.FileHandler(log_dir / "autoscaler.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        return asyncio.run(_main(args, log_dir))
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
