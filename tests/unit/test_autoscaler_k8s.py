"""The Kubernetes actuator, through the official client, against a strict stand-in of the scale subresource.

:class:`FakeScaleApi` implements exactly ``GET`` and ``PATCH`` of
``/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`` as the API server answers them: bearer
token (401), namespace and per-Deployment, per-verb RBAC (403 with the API server's message),
Accept (406), no query parameters (400), ``Content-Type: application/merge-patch+json`` only (415),
a body of exactly ``{"metadata": {"resourceVersion"}, "spec": {"replicas"}}`` (422), and
optimistic concurrency: a stale resourceVersion gets 409 Conflict. Anything else is 404 or 405.
Every request is recorded, so the tests check what was sent and how often.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from autoscaler.actuators.base import ActuatorError
from autoscaler.actuators.kubernetes import KubernetesActuator, from_config
from autoscaler.config import AutoscalerConfig, SizingConfig
from autoscaler.forecast import LastValueForecaster
from autoscaler.service import Autoscaler
from autoscaler.signals import ScalingSignals
from common.errors import PermissionDeniedError
from router.cost_model import CostModel
from router.discovery_k8s import default_namespace
from tests.k8s_stand_in import NS, TOKEN, StandInApiServer, send_json, status

SA = "system:serviceaccount:serving:pdserve-autoscaler"
DEPLOYMENTS = {"prefill": "pdserve-prefill", "decode": "pdserve-decode"}
_PATH = re.compile(r"/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)/scale")
MERGE_PATCH = "application/merge-patch+json"


class FakeScaleApi(StandInApiServer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rv = 1000
        self.deployments: dict[str, dict[str, int]] = {}
        self.forbidden: set[tuple[str, str]] = set()  # (deployment, verb): RBAC denies it
        self.interfere = 0  # the next N PATCHes race with another writer, which gets there first
        self.requests: list[dict[str, Any]] = []
        super().__init__()

    def add(self, name: str, replicas: int) -> None:
        with self.lock:
            self.rv += 1
            self.deployments[name] = {"replicas": replicas, "rv": self.rv}

    def replicas(self, name: str) -> int:
        return self.deployments[name]["replicas"]

    def calls(self, name: str | None = None) -> list[tuple[str, int]]:
        """(verb, answer) of each request, in order (for one Deployment when named)."""
        return [(r["method"], r["answer"]) for r in self.requests if name is None or r["name"] == name]

    def _scale(self, name: str) -> dict[str, Any]:
        d = self.deployments[name]
        spec = {"replicas": d["replicas"]} if d["replicas"] else {}  # omitempty, as the API server answers
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "resourceVersion": str(d["rv"]),
                             "creationTimestamp": "2026-11-20T08:00:00Z"},
                "spec": spec, "status": {"replicas": d["replicas"], "selector": f"app={name}"}}

    # --- request handling (handler threads) ---

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        m = _PATH.fullmatch(url.path)
        record: dict[str, Any] = {"method": h.command, "path": url.path, "query": url.query,
                                  "content_type": h.headers.get("Content-Type"), "body": raw,
                                  "name": m.group(2) if m else None, "answer": None}
        with self.lock:
            self.requests.append(record)
            code, body = self._answer(h, record, m, raw)
            record["answer"] = code
        send_json(h, code, body)

    def _answer(self, h: BaseHTTPRequestHandler, record: dict[str, Any], m: re.Match | None, raw: bytes
                ) -> tuple[int, dict[str, Any]]:
        accept = [a.split(";")[0].strip() for a in h.headers.get("Accept", "").split(",")]
        if h.headers.get("Authorization") != f"Bearer {TOKEN}":
            return 401, status(401, "Unauthorized", "Unauthorized")
        if m is None:
            return 404, status(404, "NotFound", "the server could not find the requested resource")
        namespace, name = m.groups()
        verb = {"GET": "get", "PATCH": "patch"}.get(h.command)
        if verb is None:
            return 405, status(405, "MethodNotAllowed", f"{h.command} is not supported on deployments/scale")
        if namespace != NS or (name, verb) in self.forbidden:
            return 403, status(403, "Forbidden", f'deployments.apps "{name}" is forbidden: User "{SA}" cannot '
                                f'{verb} resource "deployments/scale" in API group "apps" in the namespace "{namespace}"',
                                name=name, group="apps", kind="deployments")
        if "application/json" not in accept:
            return 406, status(406, "NotAcceptable", "only application/json is served here")
        if record["query"]:
            return 400, status(400, "BadRequest", f"unexpected query {record['query']}")
        if name not in self.deployments:
            return 404, status(404, "NotFound", f'deployments.apps "{name}" not found')
        if verb == "get":
            return 200, self._scale(name)
        content_type = (h.headers.get("Content-Type") or "").split(";")[0].strip()
        if content_type != MERGE_PATCH:
            return 415, status(415, "UnsupportedMediaType", f"the stand-in takes only {MERGE_PATCH}, got {content_type}")
        try:
            patch = json.loads(raw)
        except ValueError:
            return 400, status(400, "BadRequest", "the body is not JSON")
        record["body"] = patch
        replicas = (patch.get("spec") or {}).get("replicas") if isinstance(patch, dict) else None
        sent_rv = (patch.get("metadata") or {}).get("resourceVersion") if isinstance(patch, dict) else None
        if (not isinstance(patch, dict) or set(patch) != {"metadata", "spec"} or set(patch["metadata"]) != {"resourceVersion"}
                or set(patch["spec"]) != {"replicas"} or not isinstance(sent_rv, str)
                or not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0):
            return 422, status(422, "Invalid", f"the stand-in wants exactly metadata.resourceVersion and "
                                f"spec.replicas, got {patch!r}")
        d = self.deployments[name]
        if self.interfere > 0:  # someone else's write lands first
            self.interfere -= 1
            self.rv += 1
            d["rv"] = self.rv
            d["replicas"] += 1
        if sent_rv != str(d["rv"]):
            return 409, status(409, "Conflict", f'Operation cannot be fulfilled on deployments.apps "{name}": the '
                                "object has been modified; please apply your changes to the latest version and try again",
                                name=name, group="apps", kind="deployments")
        self.rv += 1
        d["rv"], d["replicas"] = self.rv, replicas
        return 200, self._scale(name)


@pytest.fixture
def api() -> Iterator[FakeScaleApi]:
    server = FakeScaleApi()
    server.add("pdserve-prefill", 2)
    server.add("pdserve-decode", 3)
    yield server
    server.close()


def actuator(api: FakeScaleApi, **kwargs: Any) -> KubernetesActuator:
    return KubernetesActuator(NS, DEPLOYMENTS, api_client=kwargs.pop("api_client", None) or api.api_client(), **kwargs)


def test_current_reads_both_scales(api: FakeScaleApi) -> None:
    assert asyncio.run(actuator(api).current()) == {"prefill": 2, "decode": 3}
    assert sorted((r["method"], r["path"]) for r in api.requests) == [
        ("GET", f"/apis/apps/v1/namespaces/{NS}/deployments/pdserve-decode/scale"),
        ("GET", f"/apis/apps/v1/namespaces/{NS}/deployments/pdserve-prefill/scale")]


def test_scale_patches_with_the_resource_version_read(api: FakeScaleApi) -> None:
    a = actuator(api)
    rv = api.deployments["pdserve-prefill"]["rv"]
    asyncio.run(a.scale("prefill", 5))
    assert api.replicas("pdserve-prefill") == 5 and api.replicas("pdserve-decode") == 3
    get, patch = api.requests
    assert (get["method"], patch["method"]) == ("GET", "PATCH")
    assert patch["path"] == f"/apis/apps/v1/namespaces/{NS}/deployments/pdserve-prefill/scale"
    assert patch["content_type"] == MERGE_PATCH and patch["answer"] == 200
    assert patch["body"] == {"metadata": {"resourceVersion": str(rv)}, "spec": {"replicas": 5}}
    # asking for what is already there writes nothing
    api.requests.clear()
    asyncio.run(a.scale("prefill", 5))
    assert api.calls() == [("GET", 200)]
    # zero replicas: the API server leaves spec.replicas out of the Scale, which reads as 0
    asyncio.run(a.scale("prefill", 0))
    assert asyncio.run(a.current())["prefill"] == 0


def test_conflict_is_reread_and_retried(api: FakeScaleApi) -> None:
    api.interfere = 1  # another writer bumps the Deployment (3 -> 4) between our read and our patch
    asyncio.run(actuator(api).scale("decode", 6))
    assert api.calls("pdserve-decode") == [("GET", 200), ("PATCH", 409), ("GET", 200), ("PATCH", 200)]
    first, second = (r["body"]["metadata"]["resourceVersion"] for r in api.requests if r["method"] == "PATCH")
    assert int(second) > int(first)  # the retry sent the resourceVersion it re-read
    assert api.replicas("pdserve-decode") == 6


def test_conflicts_are_retried_a_bounded_number_of_times(api: FakeScaleApi) -> None:
    api.interfere = 100
    with pytest.raises(ActuatorError, match="kept changing under us"):
        asyncio.run(actuator(api, conflict_retries=2).scale("decode", 6))
    assert [v for v, _ in api.calls("pdserve-decode")].count("PATCH") == 3
    assert api.interfere == 97


def test_forbidden_patch_is_a_clear_error_without_retries(api: FakeScaleApi) -> None:
    api.forbidden.add(("pdserve-decode", "patch"))
    with pytest.raises(PermissionDeniedError) as e:
        asyncio.run(actuator(api).scale("decode", 1))
    message = str(e.value)
    assert "refused to patch deployments/scale 'pdserve-decode' in namespace 'serving'" in message
    assert 'resources: ["deployments/scale"], verbs: ["get", "patch"]' in message
    assert f'User "{SA}" cannot patch resource' in message  # the API server's own words
    assert api.calls("pdserve-decode") == [("GET", 200), ("PATCH", 403)]
    assert api.replicas("pdserve-decode") == 3


def test_forbidden_read_is_a_clear_error_without_retries(api: FakeScaleApi) -> None:
    api.forbidden.add(("pdserve-prefill", "get"))
    with pytest.raises(PermissionDeniedError, match="refused to get deployments/scale 'pdserve-prefill'"):
        asyncio.run(actuator(api).current())
    assert api.calls("pdserve-prefill") == [("GET", 403)]


def test_other_failures(api: FakeScaleApi) -> None:
    with pytest.raises(ActuatorError, match="credentials"):
        asyncio.run(actuator(api, api_client=api.api_client("wrong")).current())
    missing = KubernetesActuator(NS, {"prefill": "nope", "decode": "pdserve-decode"}, api_client=api.api_client())
    with pytest.raises(ActuatorError, match="no such Deployment"):
        asyncio.run(missing.scale("prefill", 1))
    api.close()
    with pytest.raises(ActuatorError, match="unreachable"):
        asyncio.run(actuator(api, request_timeout_s=2.0).current())


def test_no_in_place_flips(api: FakeScaleApi) -> None:
    assert asyncio.run(actuator(api).flip("prefill")) is None
    assert api.requests == []


def test_kubeconfig_credentials_and_namespace(api: FakeScaleApi, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
        "users": [{"name": "u", "user": {"token": TOKEN}}],
        "contexts": [{"name": "test", "context": {"cluster": "fake", "user": "u", "namespace": NS}}]}))
    assert default_namespace(str(kubeconfig)) == NS
    a = from_config(AutoscalerConfig(kubeconfig=str(kubeconfig), k8s_conflict_retries=1))
    assert a.namespace == NS and a.deployments == DEPLOYMENTS
    asyncio.run(a.scale("decode", 4))
    assert api.replicas("pdserve-decode") == 4
    a.close()


def test_the_stand_in_is_strict(api: FakeScaleApi) -> None:
    base = f"{api.url}/apis/apps/v1/namespaces/{NS}/deployments/pdserve-prefill/scale"
    auth = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"}
    rv = str(api.deployments["pdserve-prefill"]["rv"])
    good = {"metadata": {"resourceVersion": rv}, "spec": {"replicas": 1}}

    def patch(body: Any, content_type: str = MERGE_PATCH, **headers: str) -> int:
        return httpx.patch(base, content=json.dumps(body), headers={**auth, "Content-Type": content_type, **headers}
                           ).status_code

    assert httpx.get(base, headers=auth).status_code == 200
    assert httpx.get(base, headers={**auth, "Authorization": "Bearer x"}).status_code == 401
    assert httpx.get(base, headers={**auth, "Accept": "application/yaml"}).status_code == 406
    assert httpx.get(base + "?pretty=true", headers=auth).status_code == 400
    assert httpx.put(base, headers=auth, json=good).status_code == 405
    assert httpx.get(base.replace(NS, "kube-system"), headers=auth).status_code == 403
    assert httpx.get(base.replace("/scale", ""), headers=auth).status_code == 404
    assert patch(good, "application/json-patch+json") == 415
    assert patch({"spec": {"replicas": 1}}) == 422  # no resourceVersion: an unconditional write
    assert patch({**good, "status": {"replicas": 1}}) == 422
    assert patch({"metadata": {"resourceVersion": "1"}, "spec": {"replicas": 1}}) == 409
    assert patch(good) == 200 and api.replicas("pdserve-prefill") == 1


class FixedSource:
    def __init__(self, signals: ScalingSignals) -> None:
        self.signals = signals

    async def read(self) -> ScalingSignals:
        return self.signals


def test_the_loop_scales_deployments(api: FakeScaleApi) -> None:
    # 20/s x 1000 tokens over 8,000 tokens/s per prefill replica -> 3; decode 20 x 50 x 0.05 / 160 -> 1
    cost = CostModel(prefill_per_token_s=1e-4, decode_base_s=0.01, decode_per_request_s=2e-4)
    sizing = SizingConfig(ttft_slo_s=1.0, itl_slo_s=0.05, decode_max_batch_size=256, scale_up_cooldown_s=0,
                          scale_down_cooldown_s=0)
    config = AutoscalerConfig(rate_window_s=1.0, metrics_port=None)
    source = FixedSource(ScalingSignals(time=0.0, request_rate=20.0, prompt_tokens_mean=1000.0,
                                        output_tokens_mean=50.0))
    clock = iter(range(0, 1000, 10))
    loop = Autoscaler(config, sizing, source=source, forecaster=LastValueForecaster(), actuator=actuator(api),
                      cost=cost, clock=lambda: float(next(clock)))

    async def body() -> None:
        assert (await loop.step()).cause == "no_signal"  # warming up: the first reading is held back
        api.forbidden.add(("pdserve-decode", "patch"))
        d = await loop.step()  # decode 3 -> 1 is refused: nothing grows after a failed shrink
        assert (d.prefill, d.decode) == (3, 1)
        assert (api.replicas("pdserve-prefill"), api.replicas("pdserve-decode")) == (2, 3)
        api.forbidden.clear()
        await loop.step()
        assert (api.replicas("pdserve-prefill"), api.replicas("pdserve-decode")) == (3, 1)
        assert loop.state is not None and (loop.state.prefill, loop.state.decode) == (3, 1)

    asyncio.run(body())
