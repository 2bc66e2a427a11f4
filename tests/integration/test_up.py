"""`pdserve up`, the README's first command: one line with the URL, the official client works, SIGTERM stops all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import psutil
import pytest

from tests.grpc_clients import free_port


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    from engine.demo_model import write_demo_model

    model = write_demo_model(tmp_path_factory.mktemp("demo") / "demo-model")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "up", "--model", str(model), "--port", str(port),
                             "--prefill", "1", "--decode", "2", "--log-dir", str(tmp_path_factory.mktemp("logs"))],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=Path(__file__).resolve().parents[2], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = proc.stdout.readline()
    assert line.startswith("pdserve is ready: http://"), line
    yield proc, line.split()[3], port
    if proc.poll() is None:
        proc.kill()


def test_prints_one_line_with_the_url(up):
    proc, url, port = up
    assert url == f"http://127.0.0.1:{port}/v1"


def test_openai_client_against_up(up):
    _, url, _ = up
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    done = client.completions.create(model=model, prompt="Serving with pdserve", max_tokens=10, temperature=0,
                                     logprobs=0)
    assert done.usage.completion_tokens == len(done.choices[0].logprobs.tokens) > 0
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True,
        stream_options={"include_usage": True}, logprobs=True))
    streamed = sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs)
    assert chunks[-1].usage.completion_tokens == streamed > 0


def test_sigterm_stops_every_process(up):
    proc, _, _ = up
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) == 4  # router, one prefill, two decode workers
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    deadline = time.monotonic() + 10
    while any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children):
        assert time.monotonic() < deadline, [c for c in children if c.is_running()]
        time.sleep(0.1)
