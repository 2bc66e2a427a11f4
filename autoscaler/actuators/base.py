"""The interface between the autoscaler's loop and whatever runs the worker pools.

An :class:`Actuator` reads and changes the number of prefill and decode workers of one model.
Backends: ``kubernetes`` (the ``scale`` subresource of two Deployments), ``ray`` (Ray Serve
deployment replica counts, in ``ray_serve.py``) and ``local`` (worker processes of ``pdserve up
--autoscale``). The loop (``autoscaler/service.py``) is the only caller; it calls one method at a
time, never concurrently, and awaits each before the next.

Contract, for every implementation:

- Roles are exactly ``"prefill"`` and ``"decode"`` (:data:`ROLES`).
- ``current()`` is what the backend is asked to run now (a Deployment's ``spec.replicas``, not how
  many pods are ready): the loop sizes from it and exports it as the actual replica count.
- ``scale(role, n)`` sets an absolute count (idempotent: asking for the current count is a no-op).
  When the loop shrinks one role and grows the other it shrinks first, so a GPU budget is never
  exceeded while both change. The loop never asks for fewer than one replica of a role whose
  minimum is one or more.
- ``flip(to_role)`` moves one worker of the other role to ``to_role`` without a restart: drain the
  worker's in-flight work of its old role (``WorkerAdmin.SetRole`` does the drain and the switch),
  then it serves ``to_role``; the router moves it between pools from its next load report. Return
  the worker's id, or ``None`` when this backend cannot flip in place (then the loop scales the
  other role down by one and ``to_role`` up by one instead, and counts no flip).
- Failures raise :class:`ActuatorError` (or ``common.errors.PermissionDeniedError`` when the
  backend refuses for lack of permission, naming the missing permission). An implementation
  retries only what is safe and bounded (a write conflict, say); the loop holds its sizes after
  an error and tries again at its next interval, so an implementation must not retry forever.
- Methods are coroutines and must not block the event loop: run synchronous clients with
  ``asyncio.to_thread``. Every network call has a timeout.

A backend module exposes ``from_config(config: AutoscalerConfig) -> Actuator``; ``make_actuator``
imports it lazily by the name in ``AutoscalerConfig.actuator`` (see :data:`BACKENDS`), so a
backend's dependencies (the kubernetes client, ray) load only when chosen. Test doubles need no
inheritance: any object with these four members will do.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

from common.errors import ConfigError, PdserveError

if TYPE_CHECKING:
    from autoscaler.config import AutoscalerConfig

PREFILL, DECODE = "prefill", "decode"
ROLES = (PREFILL, DECODE)

# AutoscalerConfig.actuator -> the module whose from_config(config) builds it
BACKENDS = {
    "kubernetes": "autoscaler.actuators.kubernetes",
    "ray": "autoscaler.actuators.ray_serve",
}


class ActuatorError(PdserveError):
    """The backend could not read or change the pool sizes (unreachable, conflict, refused)."""

    http_status = 503
    openai_type = "internal_error"
    grpc_code = "UNAVAILABLE"


class Actuator(Protocol):
    name: str
    """Backend name, for logs and metrics: kubernetes, ray, local."""

    async def current(self) -> dict[str, int]:
        """Replicas per role, ``{"prefill": p, "decode": d}``. Called by the loop every interval,
        before it decides; raises ActuatorError when the backend cannot be read (the loop holds)."""
        ...

    async def scale(self, role: str, replicas: int) -> None:
        """Run ``replicas`` workers of ``role`` (absolute; >= 0). Called by the loop after a
        decision that changes the role's size; returns once the backend accepted the change."""
        ...

    async def flip(self, to_role: str) -> str | None:
        """Move one worker of the other role to ``to_role``: drain, switch, no restart. Called by
        the loop for each flip of a decision. Returns the worker's id, or None if this backend cannot
        flip in place (the loop then scales instead)."""
        ...


def other_role(role: str) -> str:
    check_role(role)
    return DECODE if role == PREFILL else PREFILL


def check_role(role: str) -> None:
    if role not in ROLES:
        raise ConfigError(f"must be one of {ROLES}, got {role!r}", field="role")


def make_actuator(config: AutoscalerConfig) -> Actuator:
    """The backend ``config.actuator`` names, built by its module's ``from_config``.

    ``local`` is not built here: its processes belong to ``pdserve up --autoscale``, which
    constructs ``autoscaler.actuators.local.LocalActuator`` itself.
    """
    module_name = BACKENDS.get(config.actuator)
    if module_name is None:
        raise ConfigError(f"{config.actuator!r} cannot be built from flags; one of {tuple(BACKENDS)} "
                          "(local is for `pdserve up --autoscale`)", field="actuator")
    module = importlib.import_module(module_name)
    return module.from_config(config)
