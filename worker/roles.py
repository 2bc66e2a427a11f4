"""Which role a worker serves right now, and switching it without a restart.

Every worker process hosts both the prefill and the decode service around one
engine; the :class:`RoleGate` decides which of them takes new work. A role
flip (``WorkerAdmin.SetRole``, driven by the autoscaler) closes the gate to
new work, lets the old role's in-flight requests finish (up to a timeout,
then aborts the rest: their clients recompute or migrate elsewhere), opens
the gate for the new role, and updates the Redis registration. Load reports
carry the role, so routers move the worker to its new pool on the next one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from common.errors import InvalidRequestError, UnavailableError

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode")


class RoleService(Protocol):
    def num_in_flight(self) -> int: ...

    async def abort_all(self) -> int:
        """Abort every request this service has in flight; returns how many."""
        ...


class RoleGate:
    def __init__(self, role: str) -> None:
        if role not in ROLES:
            raise InvalidRequestError(f"must be one of {ROLES}", field="role")
        self.role = role
        self.draining = False
        self.switching = False

    def admit(self, role: str) -> None:
        """Called by a service before taking new work of ``role``; raises UNAVAILABLE if it may not."""
        if self.draining:
            raise UnavailableError("this worker is draining")
        if self.switching or role != self.role:
            raise UnavailableError(f"this worker serves the {self.role} role now", code="wrong_role")


class RoleSwitcher:
    def __init__(self, gate: RoleGate, services: dict[str, RoleService], *,
                 on_switched: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.gate = gate
        self.services = services
        self.on_switched = on_switched
        self._lock = asyncio.Lock()

    async def switch(self, role: str, drain_timeout_s: float) -> tuple[str, bool, int]:
        """Serve ``role`` from now on. Returns (role, drained in time, requests aborted)."""
        if role not in ROLES:
            raise InvalidRequestError(f"must be one of {ROLES}, got {role!r}", field="role")
        async with self._lock:
            old = self.gate.role
            if role == old:
                return role, True, 0
            self.gate.switching = True
            try:
                service = self.services[old]
                deadline = time.monotonic() + max(0.0, drain_timeout_s)
                while service.num_in_flight() and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                drained = service.num_in_flight() == 0
                aborted = 0 if drained else await service.abort_all()
                self.gate.role = role
            finally:
                self.gate.switching = False
            logger.info("role switched %s -> %s (drained=%s, aborted=%d)", old, role, drained, aborted)
            if self.on_switched is not None:
                await self.on_switched(role)
            return role, drained, aborted
