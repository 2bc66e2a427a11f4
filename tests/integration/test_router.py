"""The router as users meet it: the official openai client, bad input, overload, disconnects, migration."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from cli.processes import Proc, pdserve, worker
from engine import LLM, SamplingParams
from tests.grpc_clients import load, metric_value, wait_idle

API_KEY = "sk-test-" + "x" * 24
WORKER = ["--num-blocks", "2048", "--max-num-batched-tokens", "1024"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from engine.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="module")
def reference(model_dir):
    llm = LLM(str(model_dir), num_blocks=2048)

    def run(prompt: str | list[int], max_tokens: int, **kw) -> str:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)
        if isinstance(prompt, str):
            return llm.generate(prompt, sampling=params)[0]
        return llm.generate(prompt_token_ids=prompt, sampling=params)[0]

    run.tokenizer = llm.tokenizer
    return run


def start_router(model_dir: Path, logs: Path, prefills: list[Proc], decodes: list[Proc], *extra: str,
                 name: str = "router", env: dict | None = None) -> Proc:
    workers = f"prefill={','.join(p.address for p in prefills)};decode={','.join(d.address for d in decodes)}"
    return pdserve(["router", "--model", str(model_dir), "--port", "0", "--workers", workers, *extra],
                   logs / f"{name}.log", env=env)


def wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def stack(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    prefill = worker("prefill", model_dir, logs, *WORKER)
    decodes = [worker("decode", model_dir, logs, *WORKER, "--prefill-peers", prefill.address, name=f"decode{i}")
               for i in range(2)]
    router = start_router(model_dir, logs, [prefill], decodes, "--max-n", "4",
                          env={"PDSERVE_ROUTER_API_KEYS": f"other-key,{API_KEY}"})
    wait_ready(router.address)
    yield router, prefill, decodes
    for p in (router, prefill, *decodes):
        p.stop()


def client(router: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.address}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _workers_idle(*procs: Proc, timeout: float = 10.0) -> None:
    for p in procs:
        report = wait_idle(p.address, timeout=timeout)
        assert report.num_free_blocks == report.num_total_blocks and report.num_running == 0, report


# --- the official client ------------------------------------------------------------------------


def test_completions(stack, reference):
    router, prefill, decodes = stack
    c = client(router)
    prompt = "The KV cache of a long prompt is moved"
    out = c.completions.create(model="model", prompt=prompt, max_tokens=24, temperature=0, logprobs=2)
    choice = out.choices[0]
    want = reference(prompt, 24, logprobs=2)
    assert choice.text == want.text
    assert choice.finish_reason == want.finish_reason
    assert out.usage.completion_tokens == len(choice.logprobs.tokens) == len(want.token_ids)
    assert out.usage.prompt_tokens == len(want.prompt_token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    assert [round(x, 3) for x in choice.logprobs.token_logprobs] == [round(lp.logprob, 3) for lp in want.logprobs]


def test_completions_streaming(stack, reference):
    router, *_ = stack
    prompt = "Continuous batching keeps the GPU busy"
    chunks = list(client(router).completions.create(
        model="model", prompt=prompt, max_tokens=20, temperature=0, stream=True, logprobs=0,
        stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    tokens = sum(len(ch.choices[0].logprobs.tokens) for ch in chunks if ch.choices and ch.choices[0].logprobs)
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    usage = chunks[-1].usage
    want = reference(prompt, 20)
    assert text == want.text and finish == [want.finish_reason]
    assert usage.completion_tokens == tokens == len(want.token_ids)
    assert usage.prompt_tokens == len(want.prompt_token_ids)


def test_chat(stack, reference):
    router, *_ = stack
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a scheduler."}]
    c = client(router)
    out = c.chat.completions.create(model="model", messages=messages, max_tokens=16, temperature=0,
                                    logprobs=True, top_logprobs=3)
    ids = reference.tokenizer.encode_chat(messages)
    want = reference(ids, 16, logprobs=3)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want.text
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == len(out.choices[0].logprobs.content) == len(want.token_ids)
    stream = c.chat.completions.create(model="model", messages=messages, max_tokens=16, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_n_and_seed(stack):
    router, *_ = stack
    c = client(router)
    a = c.completions.create(model="model", prompt="Sampling with a seed", max_tokens=12, temperature=1.0,
                             seed=7, n=3)
    b = c.completions.create(model="model", prompt="Sampling with a seed", max_tokens=12, temperature=1.0,
                             seed=7, n=3)
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert sorted(ch.index for ch in a.choices) == [0, 1, 2]
    assert len({ch.text for ch in a.choices}) > 1
    assert a.usage.completion_tokens <= 36


def test_stop_string(stack, reference):
    router, *_ = stack
    prompt = "Prefix caching reuses blocks"
    full = reference(prompt, 24).text
    stop = full[8:11]
    assert stop.strip(), full
    out = client(router).completions.create(model="model", prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
    assert out.choices[0].text == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_penalties_and_logit_bias(stack, reference):
    """Accepted on both endpoints, and the tokens are the engine's own with the same settings (the prefill
    worker samples the first token, the decode worker penalises it with the rest)."""
    router, *_ = stack
    c = client(router)
    prompt = "Repeat after me: the cache, the cache, the cache"
    plain = reference(prompt, 32)
    penalties = {"presence_penalty": 0.5, "frequency_penalty": 1.5}
    want = reference(prompt, 32, logprobs=1, **penalties)
    assert want.token_ids != plain.token_ids, "the penalties should change this output"
    assert len(set(want.token_ids)) > len(set(plain.token_ids))
    out = c.completions.create(model="model", prompt=prompt, max_tokens=32, temperature=0, logprobs=1, **penalties)
    assert out.choices[0].text == want.text
    assert [round(x, 3) for x in out.choices[0].logprobs.token_logprobs] == [round(lp.logprob, 3)
                                                                            for lp in want.logprobs]
    # logit_bias: JSON keys are strings; -100 bans a token, +100 forces one under greedy
    banned = {str(t): -100 for t in set(plain.token_ids)}
    out = c.completions.create(model="model", prompt=prompt, max_tokens=32, temperature=0, logit_bias=banned)
    assert out.choices[0].text == reference(prompt, 32, logit_bias=banned).text
    assert not set(reference.tokenizer.encode(out.choices[0].text)) & set(plain.token_ids)
    forced = reference.tokenizer.encode(" cache")[-1]
    messages = [{"role": "user", "content": "Say anything."}]
    chat = c.chat.completions.create(model="model", messages=messages, max_tokens=5, temperature=0,
                                     logit_bias={str(forced): 100}, logprobs=True, top_logprobs=2)
    assert chat.choices[0].message.content == reference.tokenizer.decode([forced] * 5)
    assert all(e.top_logprobs[0].token == e.token for e in chat.choices[0].logprobs.content)
    # what the official client makes of a bad value
    for bad in ({"logit_bias": {"5": 101}}, {"frequency_penalty": 2.1}):
        with pytest.raises(openai.BadRequestError) as err:
            c.completions.create(model="model", prompt=prompt, max_tokens=4, **bad)
        assert err.value.param == next(iter(bad)) and err.value.type == "invalid_request_error"


def test_models_and_probes(stack):
    router, *_ = stack
    assert [m.id for m in client(router).models.list().data] == ["model"]
    assert httpx.get(f"{router.address}/health").status_code == 200
    assert httpx.get(f"{router.address}/ready").status_code == 200
    assert httpx.get(f"{router.address}/metrics").status_code == 401
    metrics = httpx.get(f"{router.address}/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert "pdserve_router_time_to_first_token_seconds" in metrics.text


def test_idle_connections_outlive_a_short_pause(stack):
    """A client (or load balancer) reusing a connection after a few idle seconds must not find it closed."""
    import http.client
    from urllib.parse import urlsplit

    router, *_ = stack
    url = urlsplit(router.address)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        for pause in (0, 6):  # uvicorn's default keep-alive is 5 s
            time.sleep(pause)
            conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())["data"][0]["id"] == "model"
    finally:
        conn.close()


# --- bad input ----------------------------------------------------------------------------------


def _queries(*procs: Proc) -> int:
    return sum(load(p.address).num_prefix_cache_queries for p in procs)


def test_bad_input_matrix(stack):
    router, prefill, decodes = stack
    url = f"{router.address}/v1/completions"
    auth = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    ok = {"model": "model", "prompt": "hello", "max_tokens": 4}
    long_prompt = [10 + i % 2000 for i in range(4096)]
    cases = [
        ("malformed json", b'{"model": "model", "prompt": ', auth, 400, None),
        ("non-object body", b"[1, 2, 3]", auth, 400, None),
        ("wrong content type", json.dumps(ok).encode(), {**auth, "Content-Type": "text/plain"}, 400, None),
        ("oversized body", json.dumps({**ok, "prompt": "x" * (9 << 20)}).encode(), auth, 413, None),
        ("prompt over context", json.dumps({**ok, "prompt": long_prompt}).encode(), auth, 400, "prompt"),
        ("prompt + max_tokens over context", json.dumps({**ok, "prompt": long_prompt[:4000], "max_tokens": 200}
                                                        ).encode(), auth, 400, "max_tokens"),
        ("max_tokens 0", json.dumps({**ok, "max_tokens": 0}).encode(), auth, 400, "max_tokens"),
        ("max_tokens -3", json.dumps({**ok, "max_tokens": -3}).encode(), auth, 400, "max_tokens"),
        ("temperature < 0", json.dumps({**ok, "temperature": -0.5}).encode(), auth, 400, "temperature"),
        ("top_p > 1", json.dumps({**ok, "top_p": 1.5}).encode(), auth, 400, "top_p"),
        ("n over the cap", json.dumps({**ok, "n": 5}).encode(), auth, 400, "n"),
        ("token id out of vocab", json.dumps({**ok, "prompt": [1, 999999]}).encode(), auth, 400, "prompt"),
        ("stop of the wrong type", json.dumps({**ok, "stop": 7}).encode(), auth, 400, "stop"),
        ("presence_penalty > 2", json.dumps({**ok, "presence_penalty": 2.5}).encode(), auth, 400, "presence_penalty"),
        ("frequency_penalty < -2", json.dumps({**ok, "frequency_penalty": -3}).encode(), auth, 400,
         "frequency_penalty"),
        ("frequency_penalty a string", json.dumps({**ok, "frequency_penalty": "1"}).encode(), auth, 400,
         "frequency_penalty"),
        ("logit_bias a list", json.dumps({**ok, "logit_bias": [[1, 2]]}).encode(), auth, 400, "logit_bias"),
        ("logit_bias key not a token id", json.dumps({**ok, "logit_bias": {"hello": 1}}).encode(), auth, 400,
         "logit_bias"),
        ("logit_bias key outside the vocabulary", json.dumps({**ok, "logit_bias": {"999999": 1}}).encode(), auth,
         400, "logit_bias"),
        ("logit_bias value > 100", json.dumps({**ok, "logit_bias": {"5": 100.5}}).encode(), auth, 400,
         "logit_bias"),
        ("logit_bias value a string", json.dumps({**ok, "logit_bias": {"5": "x"}}).encode(), auth, 400,
         "logit_bias"),
        ("logit_bias over 300 entries", json.dumps({**ok, "logit_bias": {str(i): 1 for i in range(301)}}).encode(),
         auth, 400, "logit_bias"),
        ("unknown model", json.dumps({**ok, "model": "gpt-9"}).encode(), auth, 404, "model"),
        ("missing key", json.dumps(ok).encode(), {"Content-Type": "application/json"}, 401, None),
        ("wrong key", json.dumps(ok).encode(), {**auth, "Authorization": "Bearer sk-nope"}, 401, None),
    ]
    before = _queries(prefill, *decodes)
    for name, body, headers, status, param in cases:
        r = httpx.post(url, content=body, headers=headers, timeout=30)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        error = r.json()["error"]
        assert error["message"] and error["type"], name
        if param is not None:
            assert error["param"] == param, (name, error)
    chat_url = f"{router.address}/v1/chat/completions"
    chat = httpx.post(chat_url, headers=auth, timeout=30, content=json.dumps({"model": "model", "messages": "hi"}))
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    messages = [{"role": "user", "content": "hi"}]
    for bad in ({"logit_bias": {"999999": 1}}, {"presence_penalty": -2.5}):
        chat = httpx.post(chat_url, headers=auth, timeout=30, json={"model": "model", "messages": messages, **bad})
        assert chat.status_code == 400 and chat.json()["error"]["param"] == next(iter(bad)), chat.text
    assert _queries(prefill, *decodes) == before, "a bad request reached a worker"
    assert httpx.post(url, content=json.dumps(ok).encode(), headers=auth, timeout=60).status_code == 200


# --- disconnects and overload -------------------------------------------------------------------


def test_disconnects_free_every_block(stack):
    router, prefill, decodes = stack

    async def one(i: int, http: httpx.AsyncClient) -> None:
        body = {"model": "model", "prompt": f"request {i} " * 40, "max_tokens": 1000, "stream": True,
                "temperature": 0, "ignore_eos": True}
        async with http.stream("POST", f"{router.address}/v1/completions", json=body,
                               headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and '"text":"' in line:
                    return  # drop the connection after the first token

    async def main() -> None:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=60)) as http:
            await asyncio.gather(*(one(i, http) for i in range(50)))

    asyncio.run(main())
    start = time.monotonic()
    _workers_idle(prefill, *decodes, timeout=2.0)
    assert time.monotonic() - start <= 2.0


def test_overload_gets_fast_429s(model_dir, stack, tmp_path):
    _, prefill, decodes = stack
    router = start_router(model_dir, tmp_path, [prefill], decodes, "--max-concurrency", "4", name="small")
    try:
        wait_ready(router.address)
        results: list[tuple[int, float, str | None]] = []

        def one(i: int) -> None:
            start = time.monotonic()
            r = httpx.post(f"{router.address}/v1/completions", timeout=120, json={
                "model": "model", "prompt": f"overload {i}", "max_tokens": 200, "ignore_eos": True})
            results.append((r.status_code, time.monotonic() - start, r.headers.get("retry-after")))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
            time.sleep(0.01)
        for t in threads:
            t.join()
        ok = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] == 429]
        assert len(ok) + len(refused) == 12 and len(ok) >= 4 and len(refused) >= 6, results
        assert all(r[1] < 1.0 and r[2] is not None for r in refused), refused
    finally:
        router.stop()
    _workers_idle(prefill, *decodes)


# --- migration ----------------------------------------------------------------------------------


def stream_greedy(router: Proc, prompt: str, max_tokens: int, *, at_chunk: int, then) -> str:
    """A greedy completion streamed through the openai client; ``then()`` runs after chunk ``at_chunk``."""
    text = []
    stream = openai.OpenAI(base_url=f"{router.address}/v1", api_key="none", max_retries=0).completions.create(
        model="model", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True})
    for n, chunk in enumerate(stream):
        text.append(chunk.choices[0].text)
        if n == at_chunk:
            then()
    return "".join(text)


def test_decode_worker_killed_mid_stream(model_dir, reference, tmp_path):
    prefill = worker("prefill", model_dir, tmp_path, *WORKER)
    decodes = [worker("decode", model_dir, tmp_path, *WORKER, "--prefill-peers", prefill.address, name=f"d{i}")
               for i in range(2)]
    router = start_router(model_dir, tmp_path, [prefill], decodes)
    try:
        wait_ready(router.address)
        prompt = "Migration moves a request to another decode worker"
        want = reference(prompt, 300, ignore_eos=True).text
        killed = []

        def kill_the_busy_one() -> None:
            busy = [d for d in decodes if load(d.address).num_running > 0]
            assert len(busy) == 1
            busy[0].kill()
            killed.append(busy[0])

        assert stream_greedy(router, prompt, 300, at_chunk=30, then=kill_the_busy_one) == want and killed
        survivor = next(d for d in decodes if d is not killed[0])
        _workers_idle(survivor, prefill)
        metrics = httpx.get(f"{router.address}/metrics").text
        assert metric_value(metrics, "pdserve_router_migrations_total") == 1
    finally:
        for p in (router, prefill, *decodes):
            p.stop()


def test_decode_worker_leaving_discovery_finishes_its_streams(model_dir, reference, tmp_path):
    """Scale-down: the worker leaves discovery, then drains. Streams on it end normally, not cut off."""
    from router.discovery import WorkerEndpoint, write_workers_file

    prefill = worker("prefill", model_dir, tmp_path, *WORKER)
    decodes = [worker("decode", model_dir, tmp_path, *WORKER, "--prefill-peers", prefill.address, name=f"d{i}")
               for i in range(2)]
    procs = {"p": prefill, "d0": decodes[0], "d1": decodes[1]}
    roles = {"p": "prefill", "d0": "decode", "d1": "decode"}
    workers_file = tmp_path / "workers.json"

    def publish(names: list[str]) -> None:
        write_workers_file(workers_file, [WorkerEndpoint(procs[n].address, roles[n], procs[n].address)
                                          for n in names])

    publish(["p", "d0", "d1"])
    router = pdserve(["router", "--model", str(model_dir), "--port", "0", "--discovery", "file", "--workers-file",
                      str(workers_file)], tmp_path / "router.log")
    try:
        wait_ready(router.address)
        prompt = "A worker that leaves keeps serving what it holds"
        want = reference(prompt, 200, ignore_eos=True).text
        left = []

        def scale_the_busy_one_down() -> None:
            busy = next(name for name in ("d0", "d1") if load(procs[name].address).num_running > 0)
            publish([name for name in procs if name != busy])  # the router forgets it ...
            time.sleep(1.5)  # ... (file discovery polls every 0.5 s) before it drains
            procs[busy].proc.send_signal(signal.SIGTERM)
            left.append(busy)

        assert stream_greedy(router, prompt, 200, at_chunk=20, then=scale_the_busy_one_down) == want and left
        assert procs[left[0]].proc.wait(30) == 0  # drained, not killed
        metrics = httpx.get(f"{router.address}/metrics").text
        assert metric_value(metrics, "pdserve_router_migrations_total") == 0
        # new requests go to the one that stayed
        client = openai.OpenAI(base_url=f"{router.address}/v1", api_key="none", max_retries=0)
        assert client.completions.create(model="model", prompt=prompt, max_tokens=8).choices[0].text
    finally:
        for p in (router, *procs.values()):
            p.stop()
