"""A real ``redis-server`` for tests: no persistence, loopback only, in a temporary directory.

``redis_server`` (a pytest fixture) starts one per test and stops it afterwards; ``restart()`` brings
it back, empty, on the same port (what a Redis pod restart looks like to its clients). Tests are
skipped only when the binary is missing. A test module imports the fixture with
``from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401`` and asks for
``redis_server``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = "/usr/bin/redis-server"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, workdir: Path, binary: str = REDIS_SERVER) -> None:
        self.workdir = workdir
        self.binary = binary
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        assert self.proc is None, "already running"
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 (the process holds it)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + timeout_s
        while not self.ping():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server not answering after {timeout_s}s:\n{self.log_tail()}")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def client(self):  # a sync redis-py client for assertions; decode_responses on
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)

    def log_tail(self, n: int = 20) -> str:
        path = self.workdir / "redis.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    binary = REDIS_SERVER if os.access(REDIS_SERVER, os.X_OK) else shutil.which("redis-server")
    if binary is None:
        pytest.skip(f"redis-server not found at {REDIS_SERVER} or on PATH (apt-get install redis-server)")
    server = RedisServer(tmp_path, binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()
