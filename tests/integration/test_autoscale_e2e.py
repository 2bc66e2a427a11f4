"""`pdserve up --autoscale` against a real Prometheus: the prefill:decode ratio follows the load.

A prompt-heavy phase should leave 2 prefill + 1 decode workers, an output-heavy phase 1 + 2, all
with a fixed budget of 3 (so by role flips). With Prometheus down the layout holds, and it moves
again once Prometheus is back, and every dashboard query has data. No request fails on the way (the router may still reject early,
with 429, while a pool is overloaded: that is the SLO guard working, not a lost request).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from cli.prometheus import LocalPrometheus, find_prometheus
from tests.dashboard_queries import DASHBOARDS, dashboard_queries, empty_queries
from tests.grpc_clients import free_port, metric_value

INTERVAL_S = 2
FLAGS = ["--prefill", "1", "--decode", "2", "--gpu-budget", "3", "--min-prefill", "1", "--max-prefill", "2",
         "--min-decode", "1", "--max-decode", "2", "--interval-s", str(INTERVAL_S), "--rate-window-s", "8",
         "--horizon-s", "2", "--scale-up-cooldown-s", "4", "--scale-down-cooldown-s", "4", "--max-step", "1",
         "--ttft-slo-s", "2.0", "--itl-slo-s", "0.01", "--slo-correction-max", "1", "--hysteresis", "0.1",
         "--worker-arg=--num-blocks=2048", "--worker-arg=--max-num-batched-tokens=2048"]
SETTLE_INTERVALS = 15  # how many autoscaler intervals a move may take, at most


class Load:
    """A steady stream of requests in a background thread; counts failures."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.failures: list[str] = []
        self.rejected = 0  # 429 from the router's early rejection: by design under overload, not a failure
        self.done = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self, rate: float, prompt_tokens: int, max_tokens: int) -> None:
        self.stop()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._loop(rate, prompt_tokens, max_tokens)),
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(120)

    async def _loop(self, rate: float, prompt_tokens: int, max_tokens: int) -> None:
        async with httpx.AsyncClient(timeout=300) as http:
            tasks = []
            i = 0
            while not self._stop.is_set():
                i += 1
                prompt = [(i * 7919 + j * 104729) % 1900 + 50 for j in range(prompt_tokens)]  # distinct: no cache
                tasks.append(asyncio.create_task(self._one(http, prompt, max_tokens)))
                await asyncio.sleep(1 / rate)
            await asyncio.gather(*tasks)

    async def _one(self, http: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> None:
        try:
            r = await http.post(f"{self.url}/v1/completions", json={
                "model": "demo-model", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True})
            if r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error":
                self.rejected += 1
            elif r.status_code != 200:
                self.failures.append(f"{r.status_code} {r.text[:200]}")
            else:
                self.done += 1
        except httpx.HTTPError as e:
            self.failures.append(repr(e))


def layout(autoscaler_metrics: str) -> tuple[int, int]:
    text = httpx.get(autoscaler_metrics, timeout=5).text
    return (int(metric_value(text, "pdserve_autoscaler_actual_replicas", role="prefill")),
            int(metric_value(text, "pdserve_autoscaler_actual_replicas", role="decode")))


def router_layout(url: str) -> tuple[int, int]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return (int(metric_value(text, "pdserve_router_workers", role="prefill")),
            int(metric_value(text, "pdserve_router_workers", role="decode")))


def wait_layout(autoscaler_metrics: str, url: str, want: tuple[int, int]) -> float:
    start = time.monotonic()
    while time.monotonic() - start < SETTLE_INTERVALS * INTERVAL_S + 20:
        if layout(autoscaler_metrics) == want and router_layout(url) == want:
            return time.monotonic() - start
        time.sleep(0.5)
    raise AssertionError(f"layout {layout(autoscaler_metrics)} (router sees {router_layout(url)}), wanted {want}")


@pytest.mark.skipif(find_prometheus() is None, reason="prometheus is not installed (scripts/test installs it)")
def test_autoscaler_follows_the_load_and_holds_without_prometheus(tmp_path):
    from engine.demo_model import write_demo_model

    model = write_demo_model(tmp_path / "demo-model")
    log_dir = tmp_path / "up"
    log_dir.mkdir()
    (log_dir / "targets.json").write_text("[]")
    prometheus = LocalPrometheus(tmp_path / "prometheus", file_sd=log_dir / "targets.json", scrape_interval_s=1.0,
                                 binary=find_prometheus())
    prometheus.start()
    port, metrics_port = free_port(), free_port()
    up = subprocess.Popen([sys.executable, "-m", "cli.main", "up", "--autoscale", "--model", str(model), "--port",
                           str(port), "--log-dir", str(log_dir), "--prometheus-url", prometheus.url, "--metrics-port",
                           str(metrics_port), *FLAGS], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          cwd=Path(__file__).resolve().parents[2], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    load = Load(f"http://127.0.0.1:{port}")
    autoscaler_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    url = f"http://127.0.0.1:{port}"
    try:
        assert up.stdout.readline().startswith("pdserve is ready")
        assert layout(autoscaler_metrics) == (1, 2)
        # prompt-heavy: long prompts, one token out -> more prefill
        load.run(rate=2.0, prompt_tokens=1500, max_tokens=1)
        took = wait_layout(autoscaler_metrics, url, (2, 1))
        print(f"prompt-heavy: 2P+1D after {took:.0f}s")
        # output-heavy: short prompts, long outputs -> more decode
        load.run(rate=1.0, prompt_tokens=16, max_tokens=300)
        took = wait_layout(autoscaler_metrics, url, (1, 2))
        print(f"output-heavy: 1P+2D after {took:.0f}s")
        # Prometheus gone: the autoscaler holds, whatever the load does
        prometheus.stop()
        load.run(rate=2.0, prompt_tokens=1500, max_tokens=1)
        errors_before = metric_value(httpx.get(autoscaler_metrics).text, "pdserve_autoscaler_signal_errors_total")
        for _ in range(6 * INTERVAL_S):
            assert layout(autoscaler_metrics) == (1, 2)
            time.sleep(1)
        errors = metric_value(httpx.get(autoscaler_metrics).text, "pdserve_autoscaler_signal_errors_total")
        assert errors >= errors_before + 3
        # ... and resumes once it is back
        prometheus.start()
        took = wait_layout(autoscaler_metrics, url, (2, 1))
        print(f"after Prometheus returned: 2P+1D after {took:.0f}s")
        # every query of every dashboard returns data from this Prometheus, under a mixed load (rates
        # over an idle window are 0/0: the panels are meant to be read while traffic flows)
        load.run(rate=1.5, prompt_tokens=1500, max_tokens=16)
        groups = json.loads((log_dir / "targets.json").read_text())
        autoscaler_target = next(g["targets"][0] for g in groups if g["labels"]["job"] == "pdserve-autoscaler")
        queries = dashboard_queries(DASHBOARDS, autoscaler_target, model.name)
        deadline = time.monotonic() + 90
        while (empty := empty_queries(prometheus, queries)) and time.monotonic() < deadline:
            time.sleep(2)
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
        load.stop()
        assert not load.failures, load.failures[:5]
        assert load.done > 20
        print(f"{load.done} requests served, {load.rejected} rejected early (429), none failed")
    finally:
        load.stop()
        up.terminate()
        try:
            up.wait(90)
        except subprocess.TimeoutExpired:
            up.kill()
        prometheus.stop()
