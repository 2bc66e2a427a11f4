"""Two router replicas sharing a real Redis: workers found through the registry, prefixes routed home."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from cli.processes import pdserve, worker
from tests.grpc_clients import load, metric_value, wait_idle
from tests.hf_reference import random_prompts
from tests.integration.test_router import wait_ready
from tests.redis_server import RedisServer

WORKER = ["--num-blocks", "2048", "--max-num-batched-tokens", "1024", "--registry-ttl-s", "3"]


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    if not Path(server.binary).exists():
        pytest.skip("redis-server is not installed (scripts/test installs it)")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from engine.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo") / "model")


def _hits(*procs) -> int:
    return sum(load(p.address).num_prefix_cache_hits for p in procs)


def test_two_routers_route_a_repeated_prefix_to_its_holder(redis, model_dir, tmp_path):
    reg = ["--redis-url", redis.url]
    prefills = [worker("prefill", model_dir, tmp_path, *WORKER, *reg, name=f"p{i}") for i in range(2)]
    decodes = [worker("decode", model_dir, tmp_path, *WORKER, *reg, name=f"d{i}") for i in range(2)]
    routers = [pdserve(["router", "--model", str(model_dir), "--port", "0", "--discovery", "redis", *reg,
                        "--router-id", f"r{i}"], tmp_path / f"router{i}.log") for i in range(2)]
    workers = prefills + decodes
    try:
        for r in routers:
            wait_ready(r.address)
        deadline = time.monotonic() + 10  # both routers see all four workers
        while any(_seen(r.address) != {"prefill": 2, "decode": 2} for r in routers):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        prefixes = random_prompts([1200] * 6, 2048, seed=77)
        tails = random_prompts([40] * 12, 2048, seed=78)
        for k, prefix in enumerate(prefixes):
            first = httpx.post(f"{routers[0].address}/v1/completions", timeout=60, json={
                "model": "model", "prompt": prefix + tails[2 * k], "max_tokens": 4, "temperature": 0})
            assert first.status_code == 200, first.text
            before = _hits(*workers)
            second = httpx.post(f"{routers[1].address}/v1/completions", timeout=60, json={
                "model": "model", "prompt": prefix + tails[2 * k + 1], "max_tokens": 4, "temperature": 0})
            assert second.status_code == 200, second.text
            gained = _hits(*workers) - before
            assert gained >= 1200 - 16, f"prefix {k}: the second router found only {gained} cached tokens"
        for w in workers:
            report = wait_idle(w.address)
            assert report.num_free_blocks == report.num_total_blocks
    finally:
        for p in (*routers, *workers):
            p.stop()


def _seen(router_url: str) -> dict[str, int]:
    metrics = httpx.get(f"{router_url}/metrics", timeout=10).text
    return {role: int(metric_value(metrics, "pdserve_router_workers", role=role)) for role in ("prefill", "decode")}
