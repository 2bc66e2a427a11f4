"""deploy/worker_probe.py (the workers' exec probes and preStop drain) against a real worker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cli.processes import worker

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "deploy" / "worker_probe.py"


def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def decode(tmp_path_factory):
    from engine.demo_model import write_demo_model

    tmp = tmp_path_factory.mktemp("probe")
    model = write_demo_model(tmp / "model")
    proc = worker("decode", model, tmp, "--num-blocks", "256", "--max-num-batched-tokens", "256",
                  "--drain-timeout-s", "5")
    yield proc
    proc.stop()


def test_probe_follows_the_worker_from_serving_to_draining(decode):
    address = decode.address
    host, port = address.rsplit(":", 1)
    # the address comes from the worker's own PDSERVE_WORKER_* variables, as in the pod
    from_env = probe("ready", env={"PDSERVE_WORKER_HOST": host, "PDSERVE_WORKER_PORT": port, "PATH": "/usr/bin"})
    assert from_env.returncode == 0, from_env.stderr
    assert "STATUS_SERVING" in from_env.stdout
    assert probe("live", "--address", address).returncode == 0
    drained = probe("drain", "--address", address, "--timeout-s", "5")
    assert drained.returncode == 0 and "drained=True" in drained.stdout
    assert probe("ready", "--address", address).returncode == 1  # draining: out of the Service
    assert probe("live", "--address", address).returncode == 0   # but alive: no restart mid-drain


def test_probe_fails_when_nothing_answers():
    result = probe("live", "--address", "127.0.0.1:1", "--timeout-s", "1")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr
    assert probe("drain", "--address", "127.0.0.1:1", "--timeout-s", "1").returncode == 0  # never blocks a shutdown
    bad = probe("live", env={"PDSERVE_WORKER_PORT": "not-a-port", "PATH": "/usr/bin"})
    assert bad.returncode == 1 and "port" in bad.stderr
