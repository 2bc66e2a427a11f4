"""pdserve as a Ray Serve application on a local Ray (CPU, demo model), scaled by the Ray Serve actuator.

Deploys the way KubeRay's RayService does: the Serve config (``import_path: ray_serve.app:build_app``,
``external_scaler_enabled``) is PUT to the dashboard's REST API, with Ray's token authentication on.
Then the official ``openai`` client talks to the router ingress through Serve's HTTP proxy, and the
autoscaler's RayServeActuator scales the decode deployment 1 -> 2 -> 1 while the router's
``pdserve_router_workers{role="decode"}`` follows. Skipped only when ray is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")
from ray import serve  # noqa: E402

from autoscaler.actuators.ray_serve import RayServeActuator  # noqa: E402
from cli.processes import free_port  # noqa: E402
from common.errors import PermissionDeniedError  # noqa: E402
from tests.grpc_clients import metric_value  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
APP = "pdserve"
API_KEY = "sk-ray-test-key"
DEPLOYMENTS = {"prefill": "PrefillWorker", "decode": "DecodeWorker"}

pytestmark = pytest.mark.timeout(300)


def _reload_ray_auth() -> None:
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _dashboard(method: str, url: str, token: str | None, payload: dict | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _wait(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 (still starting: retry until the deadline)
            last = e
        time.sleep(interval_s)
    raise AssertionError(f"{what} not reached within {timeout_s}s (last: {last!r})")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    redis = RedisServer(tmp_path_factory.mktemp("redis"))
    if not Path(redis.binary).exists():
        pytest.skip("redis-server is not installed (scripts/test installs it)")
    redis.start()
    from engine.demo_model import write_demo_model

    model = write_demo_model(tmp_path_factory.mktemp("demo") / "model")
    token = secrets.token_hex(24)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    _reload_ray_auth()  # `import ray` cached the mode and token it found at import time
    dashboard_port, http_port = free_port(), free_port()
    ray.init(num_cpus=8, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
             logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        yield {"redis": redis, "model": model, "token": token, "dashboard": f"http://127.0.0.1:{dashboard_port}",
               "http": f"http://127.0.0.1:{http_port}", "http_port": http_port}
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        redis.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reload_ray_auth()


def serve_config(cluster: dict) -> dict:
    """The shape of deploy/ray/rayservice.yaml's serveConfigV2, sized for a 2-CPU machine."""
    engine = {"device": "cpu", "num_blocks": 1024, "max_num_batched_tokens": 512}
    return {
        "http_options": {"host": "127.0.0.1", "port": cluster["http_port"]},
        "applications": [{
            "name": APP,
            "route_prefix": "/",
            "import_path": "ray_serve.app:build_app",
            "external_scaler_enabled": True,
            "runtime_env": {"env_vars": {"PYTHONPATH": str(ROOT), "PDSERVE_ROUTER_API_KEYS": API_KEY,
                                         "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}},
            "args": {"model": str(cluster["model"]), "redis_url": cluster["redis"].url, "engine": engine,
                     "worker": {"registry_ttl_s": 3.0, "drain_timeout_s": 10.0},
                     "router": {"request_timeout_s": 60.0}, "ready_timeout_s": 120.0},
            "deployments": [
                {"name": "PrefillWorker", "num_replicas": 1, "ray_actor_options": {"num_cpus": 1}},
                {"name": "DecodeWorker", "num_replicas": 1, "ray_actor_options": {"num_cpus": 1}},
                {"name": "RouterIngress", "num_replicas": 1, "ray_actor_options": {"num_cpus": 1}},
            ],
        }],
    }


def router_workers(base: str) -> dict[str, int]:
    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).text
    return {role: int(metric_value(text, "pdserve_router_workers", role=role)) for role in ("prefill", "decode")}


def test_ray_serve_app_answers_openai_and_scales_decode(cluster):
    from openai import AuthenticationError, OpenAI

    applications = f"{cluster['dashboard']}/api/serve/applications/"
    # Ray's token authentication is on: the REST API refuses a caller without the token
    status, _ = _dashboard("GET", applications, None)
    assert status == 401, f"dashboard answered {status} without a token"
    status, body = _dashboard("PUT", applications, cluster["token"], serve_config(cluster))
    assert status == 200, body

    def running():
        _, text = _dashboard("GET", applications, cluster["token"])
        app = json.loads(text).get("applications", {}).get(APP, {})
        if app.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise AssertionError(f"application {app.get('status')}: {app.get('message')}")
        return app.get("status") == "RUNNING"

    _wait(running, 150, "application RUNNING", interval_s=1.0)
    base = cluster["http"]
    _wait(lambda: httpx.get(f"{base}/ready", timeout=5).status_code == 200, 60, "router ready")
    _wait(lambda: router_workers(base) == {"prefill": 1, "decode": 1}, 30, "router sees both workers")

    client = OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    completion = client.completions.create(model="model", prompt="Hello, my name is", max_tokens=8, temperature=0)
    assert completion.choices[0].finish_reason in ("length", "stop") and completion.usage.completion_tokens >= 1
    chat = client.chat.completions.create(model="model", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.choices[0].message.role == "assistant"
    stream = client.completions.create(model="model", prompt="Once upon a time", max_tokens=6, stream=True)
    assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].text) >= 1
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()

    actuator = RayServeActuator(cluster["dashboard"], APP, DEPLOYMENTS, token=cluster["token"])
    with pytest.raises(PermissionDeniedError):
        asyncio.run(RayServeActuator(cluster["dashboard"], APP, DEPLOYMENTS, token=None).current())
    assert asyncio.run(actuator.current()) == {"prefill": 1, "decode": 1}
    assert asyncio.run(actuator.flip("decode")) is None

    asyncio.run(actuator.scale("decode", 2))
    assert asyncio.run(actuator.current()) == {"prefill": 1, "decode": 2}
    _wait(lambda: router_workers(base)["decode"] == 2, 90, "router sees 2 decode workers")
    landed = set()
    for i in range(8):  # both decode workers serve (the policy spreads an idle cluster's requests)
        out = client.completions.create(model="model", prompt=f"request {i}: the weather", max_tokens=2)
        assert out.choices[0].text is not None
        landed.add(out.id)
    assert len(landed) == 8

    asyncio.run(actuator.scale("decode", 1))  # the removed replica drains its worker and leaves the registry
    _wait(lambda: router_workers(base)["decode"] == 1, 60, "router back to 1 decode worker")
    assert client.completions.create(model="model", prompt="after scale-down", max_tokens=2).choices
