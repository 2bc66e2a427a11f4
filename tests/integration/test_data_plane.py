"""Prefill worker → KV transfer → decode worker, as real processes over loopback gRPC."""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from cli.processes import Proc, worker
from common.rpc import worker_pb2 as pb
from common.rpc import worker_pb2_grpc as pb_grpc
from common.rpc_convert import sampling_to_proto
from engine import LLM
from tests.grpc_clients import GREEDY, free_port, generate, health, load, metric_value, scrape, wait_idle
from tests.hf_reference import random_prompts

PROMPT_LENGTHS = [1, 2, 15, 16, 17, 31, 100, 257, 500, 777, 1000, 1234, 1500, 1777, 1999, 2000]
ENGINE = ["--num-blocks", "1024", "--max-num-batched-tokens", "512"]
REMOTE_ONLY = ["--local-prefill-max-tokens", "0", "--local-prefill-min-cached-ratio", "1.0"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from engine.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="module")
def reference(model_dir):
    """Colocated greedy outputs, computed in this process by the same engine."""
    llm = LLM(str(model_dir), max_num_batched_tokens=512)
    cache: dict[tuple[int, ...], list[int]] = {}

    def run(prompts: list[list[int]], sampling=GREEDY) -> list[list[int]]:
        missing = [p for p in prompts if tuple(p) not in cache]
        if missing:
            for p, out in zip(missing, llm.generate(prompt_token_ids=missing, sampling=sampling)):
                cache[tuple(p)] = out.token_ids
        return [cache[tuple(p)] for p in prompts]

    return run


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    """One prefill worker and two decode workers that may pull from it."""
    logs = tmp_path_factory.mktemp("logs")
    prefill = worker("prefill", model_dir, logs, *ENGINE)
    decodes = [worker("decode", model_dir, logs, *ENGINE, *REMOTE_ONLY, "--prefill-peers", prefill.address,
                      "--metrics-port", str(free_port()), name=f"decode{i}") for i in range(2)]
    yield prefill, decodes
    for p in [prefill, *decodes]:
        p.stop()


def _assert_idle(*addresses: str) -> None:
    for address in addresses:
        report = wait_idle(address)
        assert report.num_free_blocks == report.num_total_blocks, (address, report)
        assert report.num_running == report.num_waiting == report.num_transfers_in_flight == 0, report


@pytest.mark.parametrize("transport,streams", [(pb.KV_TRANSPORT_GRPC, 1), (pb.KV_TRANSPORT_GRPC, 3),
                                               (pb.KV_TRANSPORT_LOCAL, 2)])
def test_disaggregated_equals_colocated(cluster, reference, transport, streams):
    prefill, (decode, _) = cluster
    prompts = random_prompts(PROMPT_LENGTHS, 2048, seed=transport * 10 + streams)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(
            lambda ip: generate(decode.address, f"dis-{transport}-{streams}-{ip[0]}", ip[1], prefill=prefill.address,
                                transport=transport, num_streams=streams), enumerate(prompts)))
    for prompt, got, want in zip(prompts, results, reference(prompts)):
        assert got.info.mode == pb.PrefillInfo.MODE_REMOTE, (len(prompt), got.info)
        assert got.token_ids == want, len(prompt)
        assert got.finish_reason == "length"
        # the prefill worker's share of the transfer time, which the router must not charge to the link
        info = got.info
        assert info.prefill_compute_s > 0 and info.prefill_queue_s >= 0, info
        assert info.prefill_queue_s + info.prefill_compute_s <= info.kv_transfer_s, info
    _assert_idle(prefill.address, decode.address)


def test_sixty_four_concurrent_requests(cluster, reference):
    prefill, decodes = cluster
    lengths = [50 + (i * 37) % 550 for i in range(64)]
    prompts = random_prompts(lengths, 2048, seed=64)
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(
            lambda ip: generate(decodes[ip[0] % 2].address, f"c64-{ip[0]}", ip[1], prefill=prefill.address),
            enumerate(prompts)))
    assert [r.token_ids for r in results] == reference(prompts)
    assert all(r.finish_reason == "length" for r in results)
    assert sum(r.info.mode == pb.PrefillInfo.MODE_REMOTE for r in results) == 64
    _assert_idle(prefill.address, *(d.address for d in decodes))


def test_unknown_peer_is_never_dialled_and_the_prompt_is_prefilled_locally(cluster, reference):
    _, (decode, _) = cluster
    for i, address in enumerate(["10.1.2.3:50051", "127.0.0.1:1", "metadata.google.internal:80", "not an address"]):
        prompt = random_prompts([300], 2048, seed=50 + i)[0]  # nothing cached: each would go remote
        started = time.monotonic()
        got = generate(decode.address, f"peer-{address}", prompt, prefill=address)
        assert got.info.mode == pb.PrefillInfo.MODE_FALLBACK and got.info.fallback_reason == "unknown_peer"
        assert got.info.prefill_worker == "" and got.info.kv_transfer_s == 0  # no connection was attempted
        assert time.monotonic() - started < 30  # 10.1.2.3 would hang a dial until its deadline
        assert got.token_ids == reference([prompt])[0]
    _assert_idle(decode.address)


def test_bad_requests_get_invalid_argument(cluster):
    _, (decode, _) = cluster
    with grpc.insecure_channel(decode.address) as channel:
        stub = pb_grpc.DecodeServiceStub(channel)
        bad = [
            pb.GenerateRequest(request_id="", prompt_token_ids=[1], sampling=sampling_to_proto(GREEDY)),
            pb.GenerateRequest(request_id="x1", prompt_token_ids=[], sampling=sampling_to_proto(GREEDY)),
            pb.GenerateRequest(request_id="x2", prompt_token_ids=[99999], sampling=sampling_to_proto(GREEDY)),
            pb.GenerateRequest(request_id="x3", prompt_token_ids=[1], sampling=pb.SamplingParams()),
        ]
        for request in bad:
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(request, timeout=10))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
    _assert_idle(decode.address)


def test_client_cancel_frees_blocks(cluster):
    prefill, (decode, _) = cluster
    prompt = random_prompts([1500], 2048, seed=9)[0]
    params = GREEDY.__class__(max_tokens=2000, temperature=0.0, ignore_eos=True)
    with grpc.insecure_channel(decode.address) as channel:
        request = pb.GenerateRequest(request_id="cancel-me", prompt_token_ids=prompt,
                                     sampling=sampling_to_proto(params))
        request.prefill.address = prefill.address
        call = pb_grpc.DecodeServiceStub(channel).Generate(request, timeout=60)
        next(iter(call))
        call.cancel()
    _assert_idle(prefill.address, decode.address)


def test_kv_events_and_health(cluster):
    prefill, (decode, _) = cluster
    h = health(prefill.address)
    assert h.role == "prefill" and h.status == pb.HealthResponse.STATUS_SERVING
    assert h.layout.block_size == 16 and h.layout.num_layers == 4
    with grpc.insecure_channel(decode.address) as channel:
        events = pb_grpc.WorkerAdminStub(channel).StreamKVEvents(pb.KVEventsRequest(), timeout=30)
        first = next(iter(events))
        assert first.reset
        prompt = random_prompts([64], 2048, seed=11)[0]
        generate(decode.address, "events", prompt)
        stored: list[int] = []
        for batch in events:
            stored += batch.stored_hashes
            if len(stored) >= 4:
                break
        events.cancel()
    from common.block_hash import hash_blocks

    assert hash_blocks(prompt, 16)[:4] == stored[:4]


def test_prefill_worker_killed_mid_transfer(model_dir, reference, tmp_path):
    """SIGKILL the prefill worker while it streams: the decode worker recomputes, same tokens."""
    prefill = worker("prefill", model_dir, tmp_path, "--num-blocks", "1024", "--max-num-batched-tokens", "16")
    metrics_port = free_port()
    decode = worker("decode", model_dir, tmp_path, *ENGINE, *REMOTE_ONLY, "--prefill-peers", prefill.address,
                    "--metrics-port", str(metrics_port))
    try:
        prompt = random_prompts([2000], 2048, seed=21)[0]
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(
            out=generate(decode.address, "killed", prompt, prefill=prefill.address)))
        thread.start()
        deadline = time.monotonic() + 30
        while load(prefill.address).num_transfers_in_flight == 0:
            assert time.monotonic() < deadline, "the transfer never started"
            time.sleep(0.01)
        prefill.kill()
        thread.join(120)
        out = result["out"]
        assert out.token_ids == reference([prompt])[0]
        assert out.info.mode == pb.PrefillInfo.MODE_FALLBACK, out.info
        fallbacks = metric_value(scrape(metrics_port), "pdserve_decode_local_prefill_fallbacks_total")
        assert fallbacks == 1
        _assert_idle(decode.address)
    finally:
        prefill.kill()
        decode.stop()


def _raw_prefill(address: str, prompt: list[int], request_id: str) -> tuple[grpc.Call, grpc.Channel]:
    """Open a Prefill stream as a consumer would, with made-up destination blocks.

    The channel keeps HTTP/2's small initial flow-control window (no BDP probing),
    so a consumer that stops reading really stops the stream.
    """
    layout = health(address).layout
    n = -(-len(prompt) // layout.block_size)
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 1 << 30),
                                                      ("grpc.http2.bdp_probe", 0)])
    call = channel.unary_stream("/pdserve.v1.PrefillService/Prefill",
                                request_serializer=pb.PrefillRequest.SerializeToString,
                                response_deserializer=bytes)
    request = pb.PrefillRequest(request_id=request_id, prompt_token_ids=prompt,
                                sampling=sampling_to_proto(GREEDY), dest_block_ids=list(range(n)),
                                layout=layout, transport=pb.KV_TRANSPORT_GRPC, num_streams=1, consumer_id="test")
    return call(request, timeout=60), channel


def test_lease_frees_blocks_of_a_vanished_consumer(model_dir, tmp_path):
    prefill = worker("prefill", model_dir, tmp_path, "--num-blocks", "1024", "--kv-lease-s", "1")
    try:
        # a consumer that stops reading but keeps its connection
        call, channel = _raw_prefill(prefill.address, random_prompts([2000], 2048, seed=3)[0], "stalled")
        next(iter(call))
        time.sleep(0.5)
        held = load(prefill.address)
        assert held.num_transfers_in_flight == 1 and held.num_free_blocks < held.num_total_blocks
        report = wait_idle(prefill.address, timeout=10)
        assert report.num_transfers_in_flight == 0
        assert report.num_free_blocks == report.num_total_blocks
        channel.close()
        # a consumer process that dies mid-stream
        code = (
            "import sys, time; sys.path.insert(0, '.');"
            "from tests.integration.test_data_plane import _raw_prefill;"
            "from tests.hf_reference import random_prompts;"
            f"call, ch = _raw_prefill('{prefill.address}', random_prompts([2000], 2048, seed=4)[0], 'dies');"
            "next(iter(call)); print('PDSERVE_READY role=consumer address=-', flush=True); time.sleep(60)")
        consumer = Proc([sys.executable, "-c", code], tmp_path / "consumer.log", cwd=Path(__file__).parents[2])
        consumer.kill()
        report = wait_idle(prefill.address, timeout=10)
        assert report.num_free_blocks == report.num_total_blocks and report.num_transfers_in_flight == 0
    finally:
        prefill.stop()


@pytest.mark.parametrize("mode", ["payload", "header"])
def test_corrupted_transfer_is_recomputed(model_dir, reference, tmp_path, mode):
    prefill = worker("prefill", model_dir, tmp_path, *ENGINE)
    proxy = Proc([sys.executable, str(Path(__file__).parents[1] / "kv_corrupting_proxy.py"), prefill.address,
                  mode], tmp_path / "proxy.log")
    metrics_port = free_port()
    decode = worker("decode", model_dir, tmp_path, *ENGINE, *REMOTE_ONLY, "--prefill-peers", proxy.address,
                    "--metrics-port", str(metrics_port))
    try:
        prompt = random_prompts([1500], 2048, seed=31)[0]
        out = generate(decode.address, f"corrupt-{mode}", prompt, prefill=proxy.address)
        assert out.info.mode == pb.PrefillInfo.MODE_FALLBACK and out.info.fallback_reason == "checksum", out.info
        assert out.token_ids == reference([prompt])[0]
        text = scrape(metrics_port)
        assert metric_value(text, "pdserve_decode_local_prefill_fallbacks_total", reason="checksum") == 1
        # an intact transfer through the same proxy (it corrupts once) still works remotely
        prompt2 = random_prompts([900], 2048, seed=32)[0]
        out2 = generate(decode.address, f"intact-{mode}", prompt2, prefill=proxy.address)
        assert out2.info.mode == pb.PrefillInfo.MODE_REMOTE and out2.token_ids == reference([prompt2])[0]
        _assert_idle(decode.address, prefill.address)
    finally:
        for p in (decode, proxy, prefill):
            p.stop()
