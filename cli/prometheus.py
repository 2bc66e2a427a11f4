"""A local Prometheus server process, for ``pdserve up --autoscale`` (and tests).

``LocalPrometheus(workdir, targets, file_sd=...)`` writes a config that scrapes ``targets``
(``{job: ["host:port", ...]}``) and the targets in a ``file_sd_configs`` JSON file (re-read every
second, so targets can come and go while it runs), starts the ``prometheus`` binary on a free
loopback port, and waits for ``/-/ready``. ``stop()`` ends it with SIGTERM (the TSDB closes
cleanly); ``restart()`` brings it back on the same port and data directory.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from cli.processes import ServerProcess

PROMETHEUS = "/usr/bin/prometheus"


def find_prometheus() -> str | None:
    return PROMETHEUS if Path(PROMETHEUS).exists() else shutil.which("prometheus")


class LocalPrometheus(ServerProcess):
    name = "prometheus"

    def __init__(self, workdir: Path, targets: Mapping[str, Sequence[str]] | None = None, *,
                 file_sd: Path | None = None, scrape_interval_s: float = 1.0, binary: str = PROMETHEUS) -> None:
        super().__init__(Path(workdir), Path(workdir) / "prometheus.log", binary)
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "prometheus.yml"
        self._write_config(targets or {}, file_sd, scrape_interval_s)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_config(self, targets: Mapping[str, Sequence[str]], file_sd: Path | None, interval_s: float) -> None:
        jobs: list[dict[str, Any]] = [{"job_name": name, "static_configs": [{"targets": list(addrs)}]}
                                      for name, addrs in targets.items()]
        if file_sd is not None:
            jobs.append({"job_name": "file_sd", "file_sd_configs": [{"files": [str(file_sd)], "refresh_interval": "1s"}]})
        config = {"global": {"scrape_interval": f"{interval_s:g}s", "scrape_timeout": f"{interval_s:g}s",
                             "evaluation_interval": f"{interval_s:g}s"},
                  "scrape_configs": jobs}
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML

    def command(self) -> list[str]:
        return [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.data_dir}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"]

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, promql: str) -> dict[str, Any]:
        """The ``data`` of an instant query's answer."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5.0)
        r.raise_for_status()
        return r.json()["data"]

    def value(self, promql: str) -> float:
        """The single value of an instant query; NaN when it has none."""
        data = self.query(promql)
        if data["resultType"] == "scalar":
            return float(data["result"][1])
        return float(data["result"][0]["value"][1]) if len(data["result"]) == 1 else math.nan

    def wait_for(self, promql: str, cond: Callable[[float], bool] = math.isfinite, timeout_s: float = 30.0) -> float:
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.value(promql)
            if cond(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql} = {value} after {timeout_s}s:\n{self.log_tail()}")
            time.sleep(0.2)
