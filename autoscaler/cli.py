"""``pdserve autoscaler``: size the prefill and decode pools from Prometheus until SIGTERM.

``add_arguments(parser)`` adds one flag per field of AutoscalerConfig and SizingConfig;
``run(args)`` builds the configs (defaults < environment < flags), the Prometheus source, the
forecaster, the actuator (``--actuator kubernetes`` or ``ray``) and the loop, serves /metrics, and
runs until SIGTERM or SIGINT. ``serve(config, sizing, actuator=...)`` is the same loop for callers
that bring their own actuator (``pdserve up --autoscale`` with a LocalActuator). Exit status: 0 on
a signal, 2 on a configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from autoscaler.actuators.base import Actuator, make_actuator
from autoscaler.config import AutoscalerConfig, SizingConfig
from autoscaler.forecast import make_forecaster
from autoscaler.service import Autoscaler
from autoscaler.signals import PrometheusSource
from common.config import add_config_args, build_config
from common.errors import ConfigError, PdserveError
from router.cost_model import CostModel

logger = logging.getLogger(__name__)


def default_cost_model_path() -> Path:
    import router

    return Path(router.__file__).parent / "cost_models" / "demo_cpu.json"


def load_cost_model(path: str) -> CostModel:
    target = Path(path) if path else default_cost_model_path()
    try:
        return CostModel.load(target)
    except OSError as e:
        raise ConfigError(f"cannot read {target}: {e}", field="cost_model") from e
    except ValueError as e:  # bad JSON
        raise ConfigError(f"{target} is not a cost model: {e}", field="cost_model") from e


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, AutoscalerConfig)
    add_config_args(parser, SizingConfig)


def build_autoscaler(config: AutoscalerConfig, sizing: SizingConfig, actuator: Actuator) -> Autoscaler:
    """The loop with the Prometheus source and the configured forecaster (the caller owns ``actuator``)."""
    source = PrometheusSource(config.prometheus_url, timeout_s=config.prometheus_timeout_s,
                              window_s=config.rate_window_s, served_model_name=config.served_model_name)
    forecaster = make_forecaster(config.forecaster, alpha=config.holt_alpha, beta=config.holt_beta)
    return Autoscaler(config, sizing, source=source, forecaster=forecaster, actuator=actuator,
                      cost=load_cost_model(config.cost_model))


async def serve(config: AutoscalerConfig, sizing: SizingConfig, actuator: Actuator | None = None, *,
                stop: asyncio.Event | None = None, on_ready: Callable[[], None] | None = None) -> None:
    """Run the loop until ``stop`` is set (default: until SIGTERM or SIGINT).

    ``on_ready`` is called once /metrics answers and shows the current pool sizes, before the
    first step.
    """
    own_actuator = actuator is None
    actuator = actuator or make_actuator(config)
    autoscaler = build_autoscaler(config, sizing, actuator)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    server = None
    if config.metrics_port is not None:
        from prometheus_client import start_http_server

        server, _ = start_http_server(config.metrics_port, addr=config.metrics_host)
        logger.info("metrics on http://%s:%d/metrics", config.metrics_host, server.server_port)
    try:
        await autoscaler.export_current()
        if on_ready is not None:
            on_ready()
        await autoscaler.run(stop)
    finally:
        if isinstance(autoscaler.source, PrometheusSource):
            await autoscaler.source.aclose()
        if server is not None:
            server.shutdown()
            server.server_close()
        close = getattr(actuator, "close", None)
        if own_actuator and close is not None:
            result = close()
            if asyncio.iscoroutine(result):
                await result


def run(args: argparse.Namespace) -> int:
    try:
        config = build_config(AutoscalerConfig, args)
        sizing = build_config(SizingConfig, args)
        if config.actuator == "local":
            raise ConfigError("the local actuator runs inside `pdserve up --autoscale`", field="actuator")
        asyncio.run(serve(config, sizing))
    except PdserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
