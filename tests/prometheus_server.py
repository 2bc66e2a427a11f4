"""A real Prometheus for tests: ``/usr/bin/prometheus`` on a free loopback port, scraping every second.

``PrometheusServer(workdir, targets)`` writes a config scraping ``targets`` (``host:port`` of
``/metrics`` endpoints, one job per name: ``{"pdserve": ["127.0.0.1:9100"]}``) and, when
``file_sd`` is given, the targets listed in that ``file_sd_configs`` JSON file (re-read every
second: tests can add targets while it runs). ``start()`` returns once ``/-/ready`` answers 200;
``stop()`` ends it (SIGTERM, so the TSDB is closed cleanly); ``restart()`` brings it back on the
same port and data directory, so what it scraped before is still there (what a Prometheus pod
restart looks like to its clients). ``query(promql)`` runs an instant query; ``wait_for(promql)``
polls until it returns a finite value.

A test module asks for the ``prometheus_factory`` fixture (import it with
``from tests.prometheus_server import prometheus_factory_fixture  # noqa: F401``); tests are skipped
only when the binary is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from cli.processes import free_port  # noqa: F401 (re-exported for tests)
from cli.prometheus import PROMETHEUS, LocalPrometheus, find_prometheus

PrometheusServer = LocalPrometheus


@pytest.fixture(name="prometheus_factory")
def prometheus_factory_fixture(tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    """``make(targets, file_sd=None, scrape_interval_s=1.0)``: a started PrometheusServer, stopped after the test."""
    binary = find_prometheus()
    if binary is None:
        pytest.skip(f"prometheus not found at {PROMETHEUS} or on PATH (apt-get install prometheus)")
    servers: list[PrometheusServer] = []

    def make(targets: Mapping[str, Sequence[str]] | None = None, **kwargs: Any) -> PrometheusServer:
        server = PrometheusServer(tmp_path / f"prometheus-{len(servers)}", targets, binary=binary, **kwargs)
        servers.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()
