"""The router's gRPC API has the HTTP API's semantics; `pdserve profile` fits a usable cost model."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import httpx
import pytest

from cli.processes import worker
from common.rpc import api_pb2 as api
from common.rpc import api_pb2_grpc as api_grpc
from router.cost_model import CostModel
from tests.grpc_clients import free_port
from tests.integration.test_router import API_KEY, start_router, wait_ready

AUTH = (("authorization", f"Bearer {API_KEY}"),)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from engine.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    prefill = worker("prefill", model_dir, logs, "--num-blocks", "2048")
    decode = worker("decode", model_dir, logs, "--num-blocks", "2048", "--prefill-peers", prefill.address)
    grpc_port = free_port()
    router = start_router(model_dir, logs, [prefill], [decode], "--grpc-port", str(grpc_port),
                          env={"PDSERVE_ROUTER_API_KEYS": API_KEY})
    wait_ready(router.address)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        yield router, prefill, decode, api_grpc.CompletionsStub(channel)
    for p in (router, prefill, decode):
        p.stop()


def _complete(stub, request) -> tuple[dict[int, str], dict[int, str], api.Usage]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in stub.Complete(request, metadata=AUTH, timeout=60):
        if chunk.HasField("usage"):
            usage = chunk.usage
            continue
        texts[chunk.index] = texts.get(chunk.index, "") + chunk.text
        if chunk.finish_reason:
            finish[chunk.index] = chunk.finish_reason
    return texts, finish, usage


def test_grpc_matches_http(cluster):
    router, _, _, stub = cluster
    texts, finish, usage = _complete(stub, api.CompletionRequest(model="model", text="gRPC and HTTP agree",
                                                                 max_tokens=12, temperature=0, n=2))
    http = httpx.post(f"{router.address}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, json={
        "model": "model", "prompt": "gRPC and HTTP agree", "max_tokens": 12, "temperature": 0, "n": 2}).json()
    assert texts == {c["index"]: c["text"] for c in http["choices"]}
    assert finish == {c["index"]: c["finish_reason"] for c in http["choices"]}
    assert (usage.prompt_tokens, usage.completion_tokens) == (http["usage"]["prompt_tokens"],
                                                              http["usage"]["completion_tokens"])
    chat = api.CompletionRequest(model="model", max_tokens=6, temperature=0)
    chat.chat.messages.add(role="user", content="hello")
    texts, _, usage = _complete(stub, chat)
    assert usage.completion_tokens > 0 and texts[0]
    assert [m.id for m in stub.ListModels(api.ListModelsRequest(), metadata=AUTH).models] == ["model"]


def test_grpc_penalties_and_logit_bias_match_http(cluster):
    router, _, _, stub = cluster
    settings = {"presence_penalty": 0.5, "frequency_penalty": 1.25, "logit_bias": {17: 4.0, 30: -100.0}}
    texts, _, _ = _complete(stub, api.CompletionRequest(model="model", text="the cache, the cache, the cache",
                                                        max_tokens=16, temperature=0, **settings))
    body = {"model": "model", "prompt": "the cache, the cache, the cache", "max_tokens": 16, "temperature": 0}
    http = [httpx.post(f"{router.address}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={**body, **extra}, timeout=60).json()["choices"][0]["text"]
            for extra in ({**settings, "logit_bias": {str(k): v for k, v in settings["logit_bias"].items()}}, {})]
    assert texts[0] == http[0] != http[1]


@pytest.mark.parametrize("request_, code", [
    (api.CompletionRequest(model="model", text="x", temperature=-1), grpc.StatusCode.INVALID_ARGUMENT),
    (api.CompletionRequest(model="model", text="x", max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT),
    (api.CompletionRequest(model="model", text="x", n=99), grpc.StatusCode.INVALID_ARGUMENT),
    (api.CompletionRequest(model="model"), grpc.StatusCode.INVALID_ARGUMENT),
    (api.CompletionRequest(model="model", text="x", presence_penalty=2.5), grpc.StatusCode.INVALID_ARGUMENT),
    (api.CompletionRequest(model="model", text="x", logit_bias={5: 101.0}), grpc.StatusCode.INVALID_ARGUMENT),
    (api.CompletionRequest(model="model", text="x", logit_bias={10**6: 1.0}), grpc.StatusCode.INVALID_ARGUMENT),
    (api.CompletionRequest(model="nope", text="x"), grpc.StatusCode.NOT_FOUND),
])
def test_grpc_errors(cluster, request_, code):
    *_, stub = cluster
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Complete(request_, metadata=AUTH, timeout=30))
    assert e.value.code() == code


def test_grpc_needs_the_api_key(cluster):
    *_, stub = cluster
    for metadata in [(), (("authorization", "Bearer wrong"),)]:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Complete(api.CompletionRequest(model="model", text="x"), metadata=metadata, timeout=30))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_profile_fits_a_cost_model(cluster, tmp_path):
    _, prefill, decode, _ = cluster
    out = tmp_path / "cost.json"
    done = subprocess.run([sys.executable, "-m", "cli.main", "profile", "--decode-worker", decode.address,
                           "--prefill-worker", prefill.address, "--out", str(out), "--max-prompt-tokens", "1024",
                           "--max-batch-log2", "3", "--repeats", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "R² prefill" in done.stdout
    model = CostModel.load(out)
    assert json.loads(out.read_text())["source"].startswith("pdserve profile")
    assert model.prefill_time(1024, 0) > model.prefill_time(64, 0) > 0
    assert model.prefill_time(1024, 0) > model.prefill_time(64, 960)  # cached tokens are cheaper
    assert model.decode_step_time(8, 8 * 1024) > model.decode_step_time(1, 128) > 0
