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
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.processes import ServerProcess

REDIS_SERVER = "/usr/bin/redis-server"


class RedisServer(ServerProcess):
    name = "redis-server"

    def __init__(self, workdir: Path, binary: str = REDIS_SERVER) -> None:
        super().__init__(workdir, Path(workdir) / "redis.log", binary)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir)]

    def ready(self) -> bool:
        return self.ping()

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
