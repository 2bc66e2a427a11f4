"""Role flips without a restart: a worker drains, switches, and the router routes to its new role."""

from __future__ import annotations

import threading
import time

import grpc
import httpx
import openai
import pytest

from cli.processes import worker
from common.rpc import worker_pb2 as pb
from common.rpc import worker_pb2_grpc as pb_grpc
from tests.grpc_clients import free_port, health, load, metric_value, scrape, wait_idle
from tests.integration.test_router import start_router, wait_ready

WORKER = ["--num-blocks", "2048", "--max-num-batched-tokens", "1024"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from engine.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo") / "model")


def set_role(address: str, role: str, timeout_s: float = 10.0) -> pb.SetRoleResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.WorkerAdminStub(channel).SetRole(pb.SetRoleRequest(role=role, drain_timeout_s=timeout_s),
                                                        timeout=timeout_s + 10)


def seen(router_url: str) -> dict[str, int]:
    text = httpx.get(f"{router_url}/metrics", timeout=10).text
    return {r: int(metric_value(text, "pdserve_router_workers", role=r)) for r in ("prefill", "decode")}


def wait_for(cond, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_flip_moves_a_worker_between_pools(model_dir, tmp_path):
    metrics_port = free_port()
    prefill = worker("prefill", model_dir, tmp_path, *WORKER, "--metrics-port", str(metrics_port))
    decode = worker("decode", model_dir, tmp_path, *WORKER, "--prefill-peers", prefill.address)
    router = start_router(model_dir, tmp_path, [prefill], [decode])
    try:
        wait_ready(router.address)
        wait_for(lambda: seen(router.address) == {"prefill": 1, "decode": 1})
        client = openai.OpenAI(base_url=f"{router.address}/v1", api_key="x", max_retries=0, timeout=60)
        # a stream in flight on the decode worker while the prefill worker flips: it is untouched
        out: dict = {}
        thread = threading.Thread(target=lambda: out.update(r=client.completions.create(
            model="model", prompt="flip " * 20, max_tokens=150, temperature=0, extra_body={"ignore_eos": True})))
        thread.start()
        reply = set_role(prefill.address, "decode")
        assert reply.role == "decode" and reply.drained and reply.num_aborted == 0
        assert health(prefill.address).role == "decode"
        wait_for(lambda: seen(router.address) == {"prefill": 0, "decode": 2})
        thread.join(60)
        assert out["r"].choices[0].finish_reason == "length"
        # the flipped worker now decodes: requests reach both decode workers
        for i in range(12):
            client.completions.create(model="model", prompt=f"after the flip {i} " * 8, max_tokens=4)
        assert load(prefill.address).num_prefix_cache_queries > 0
        # its metrics say so too
        text = scrape(metrics_port)
        wait_for(lambda: metric_value(scrape(metrics_port), "pdserve_worker_role_info", role="decode") == 1)
        assert 'pdserve_worker_role_info{' in text
        # a prefill RPC to it is now refused with UNAVAILABLE, not served
        with grpc.insecure_channel(prefill.address) as channel:
            call = channel.unary_stream("/pdserve.v1.PrefillService/Prefill",
                                        request_serializer=pb.PrefillRequest.SerializeToString,
                                        response_deserializer=bytes)
            with pytest.raises(grpc.RpcError) as e:
                list(call(pb.PrefillRequest(request_id="x", prompt_token_ids=[1, 2]), timeout=10))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        for w in (prefill, decode):
            report = wait_idle(w.address)
            assert report.num_free_blocks == report.num_total_blocks
    finally:
        for p in (router, prefill, decode):
            p.stop()


def test_flip_with_requests_in_flight_aborts_them_and_the_router_migrates(model_dir, tmp_path):
    decodes = [worker("decode", model_dir, tmp_path, *WORKER, name=f"d{i}") for i in range(2)]
    router = start_router(model_dir, tmp_path, [], decodes)
    try:
        wait_ready(router.address)
        wait_for(lambda: seen(router.address)["decode"] == 2)
        client = openai.OpenAI(base_url=f"{router.address}/v1", api_key="x", max_retries=0, timeout=60)
        texts: list[str] = []
        stream = client.completions.create(model="model", prompt="migrate on flip", max_tokens=300, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        flipped = None
        for n, chunk in enumerate(stream):
            texts.append(chunk.choices[0].text)
            if n == 20:
                busy = [d for d in decodes if load(d.address).num_running > 0]
                flipped = busy[0]
                reply = set_role(flipped.address, "prefill", timeout_s=0.2)  # too short to drain: aborts it
                assert reply.num_aborted == 1 and not reply.drained
        unbroken = client.completions.create(model="model", prompt="migrate on flip", max_tokens=300,
                                             temperature=0, extra_body={"ignore_eos": True})
        assert "".join(texts) == unbroken.choices[0].text
        assert health(flipped.address).role == "prefill"
        for d in decodes:
            wait_idle(d.address)
    finally:
        for p in (router, *decodes):
            p.stop()
