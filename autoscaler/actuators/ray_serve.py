"""Ray Serve actuator: the replica counts of the prefill and decode deployments of a Serve app.

Through the Serve REST API of the Ray dashboard (Ray 2.60; the Python API has no public call that
changes one deployment's replicas without redeploying the whole application):

- ``current()``: ``GET /api/serve/applications/``; each deployment's ``target_num_replicas`` (what
  Serve is asked to run, not how many replicas are running yet).
- ``scale(role, n)``: ``POST /api/v1/applications/{app}/deployments/{deployment}/scale`` with
  ``{"target_num_replicas": n}``, Serve's external-scaler API. The application must be deployed with
  ``external_scaler_enabled: true`` (ray_serve/app.py's RayService config does), else Serve answers
  412 and this raises ActuatorError saying so. Serve applies it asynchronously: new replicas start,
  removed ones shut down gracefully (their workers leave the registry and drain).

Authentication: Ray's token authentication (``RAY_AUTH_MODE=token``) guards every dashboard route;
the actuator sends ``Authorization: Bearer <token>``, the token found as Ray itself finds it
(``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``). 401/403
raise PermissionDeniedError at once.

A scale set this way lasts until the application's config is deployed again (a new Serve config or
a KubeRay RayService update resets the counts to the config's ``num_replicas``); the loop reads
``current()`` every interval, so it notices and scales again.

**Role flips.** ``flip()`` returns None: a replica's role is fixed by its deployment, so the loop
scales one deployment down and the other up instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoscaler.actuators.base import DECODE, PREFILL, ROLES, ActuatorError, check_role
from common.errors import ConfigError, PermissionDeniedError

if TYPE_CHECKING:
    from autoscaler.config import AutoscalerConfig

logger = logging.getLogger(__name__)

APPLICATIONS_PATH = "/api/serve/applications/"
SCALE_PATH = "/api/v1/applications/{app}/deployments/{deployment}/scale"


def ray_auth_token(environ: Mapping[str, str] | None = None, home: Path | None = None) -> str | None:
    """Ray's token, looked up in Ray's order of precedence; None when there is none."""
    environ = os.environ if environ is None else environ
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as e:  # Ray treats an unreadable configured path as fatal; so do we
            raise ConfigError(f"cannot read RAY_AUTH_TOKEN_PATH: {e}", field="ray_auth_token_path") from e
    default = (home or Path.home()) / ".ray" / "auth_token"
    try:
        return default.read_text().strip() or None
    except OSError:
        return None


class RayServeActuator:
    name = "ray"

    def __init__(self, dashboard_url: str, app_name: str, deployments: Mapping[str, str], *,
                 token: str | None = None, timeout_s: float = 10.0) -> None:
        if not dashboard_url.startswith(("http://", "https://")):
            raise ConfigError(f"must be an http(s) URL, got {dashboard_url!r}", field="ray_dashboard_url")
        if not app_name:
            raise ConfigError("must not be empty", field="ray_app_name")
        if set(deployments) != set(ROLES) or not all(deployments.values()):
            raise ConfigError(f"must name a deployment for each of {ROLES}", field="deployments")
        self._url = dashboard_url.rstrip("/")
        self._app = app_name
        self._deployments = dict(deployments)
        self._token = token
        self._timeout_s = timeout_s

    async def current(self) -> dict[str, int]:
        body = await asyncio.to_thread(self._request, "GET", APPLICATIONS_PATH, None)
        app = (body.get("applications") or {}).get(self._app)
        if app is None:
            raise ActuatorError(f"Serve has no application {self._app!r} (applications: "
                                f"{sorted(body.get('applications') or {})})")
        deployments = app.get("deployments") or {}
        out = {}
        for role, name in self._deployments.items():
            details = deployments.get(name)
            if details is None:
                raise ActuatorError(f"application {self._app!r} has no deployment {name!r} ({role}); "
                                    f"it has {sorted(deployments)}")
            out[role] = int(details["target_num_replicas"])
        return out

    async def scale(self, role: str, replicas: int) -> None:
        check_role(role)
        if replicas < 0:
            raise ConfigError(f"must be >= 0, got {replicas}", field="replicas")
        deployment = self._deployments[role]
        path = SCALE_PATH.format(app=urllib.parse.quote(self._app, safe=""),
                                 deployment=urllib.parse.quote(deployment, safe=""))
        await asyncio.to_thread(self._request, "POST", path, {"target_num_replicas": replicas})
        logger.info("asked Serve for %d %s replicas (%s/%s)", replicas, role, self._app, deployment)

    async def flip(self, to_role: str) -> str | None:
        check_role(to_role)
        return None

    def _request(self, method: str, path: str, payload: dict[str, Any] | None) -> dict[str, Any]:
        """One HTTP call in a worker thread; maps failures onto the actuator's errors."""
        headers = {"Accept": "application/json"}
        data = None
        if payload is not None:
            data = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(self._url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = _error_detail(e)
            if e.code in (401, 403):
                raise PermissionDeniedError(
                    f"Ray dashboard refused {method} {path} ({e.code}): "
                    f"{'no Ray auth token configured' if not self._token else 'wrong Ray auth token'}; "
                    "set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token") from e
            if e.code == 412:
                raise ActuatorError(f"Serve refused to scale: {detail} (deploy the application with "
                                    "external_scaler_enabled: true)") from e
            raise ActuatorError(f"{method} {path} failed with {e.code}: {detail}") from e
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise ActuatorError(f"Ray dashboard {self._url} unreachable: {e}") from e
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise ActuatorError(f"{method} {path} answered non-JSON: {raw[:200]!r}") from e


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read().decode(errors="replace")
    except OSError:
        return str(e.reason)
    try:
        return str(json.loads(body).get("error") or body)[:500]
    except (json.JSONDecodeError, AttributeError):
        return body[:500]


def from_config(config: AutoscalerConfig) -> RayServeActuator:
    return RayServeActuator(config.ray_dashboard_url, config.ray_app_name,
                            {PREFILL: config.ray_prefill_deployment, DECODE: config.ray_decode_deployment},
                            token=ray_auth_token())
