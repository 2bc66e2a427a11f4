"""Local pdserve processes: start one, wait for its ``PDSERVE_READY`` line, stop or kill it.

Used by ``pdserve up`` to run the embedded cluster, and by tests and benchmarks
to run real workers and routers over loopback.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

READY = re.compile(r"PDSERVE_READY role=(\S+) address=(\S+)")


class Proc:
    """A command in its own process that prints a ``PDSERVE_READY`` line; output goes to a log file."""

    def __init__(self, cmd: list[str], log_path: Path, *, env: dict[str, str] | None = None,
                 ready_timeout: float = 120.0, cwd: Path | None = None) -> None:
        self.args = cmd
        self.log_path = log_path
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log = open(log_path, "w")  # noqa: SIM115 (lives as long as the process)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                     stderr=self._log, env=full_env, text=True,
                                     cwd=cwd)
        self.address = self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> str:
        found: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self._log.write(line)
                self._log.flush()
                m = READY.search(line)
                if m and not found:
                    found.append(m.group(2))

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"{self.args} not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)
        return found[0]

    def log_tail(self, n: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text().splitlines()[-n:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.proc.returncode


def pdserve(args: list[str], log_path: Path, **kwargs) -> Proc:
    return Proc([sys.executable, "-m", "cli.main", *args], log_path, **kwargs)


def worker(role: str, model_dir: Path, log_dir: Path, *extra: str, name: str | None = None) -> Proc:
    return pdserve([f"{role}-worker", "--model", str(model_dir), "--port", "0", *extra],
                   log_dir / f"{name or role}.log")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on at ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server that prints no ``PDSERVE_READY`` line (Prometheus, Redis; in tests ``pdserve autoscaler``)
    run as a child process on a loopback port.

    Subclasses give ``name``, ``command()`` and ``ready()``; ``start()`` runs the command with its
    output in ``log_path`` and waits for ``ready()``; ``stop()`` sends SIGTERM (so the server
    shuts down cleanly), then SIGKILL; ``restart()`` brings it back on the same port.
    """

    name = "server"

    def __init__(self, workdir: Path, log_path: Path, binary: str) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout_s: float = 30.0) -> None:
        assert self.proc is None, "already running"
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                raise RuntimeError(f"{self.name} exited with {code}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.name} not ready after {timeout_s}s:\n{self.log_tail()}")
            time.sleep(0.02)

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self, timeout_s: float = 30.0) -> None:
        self.stop()
        self.start(timeout_s)

    def log_tail(self, n: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
