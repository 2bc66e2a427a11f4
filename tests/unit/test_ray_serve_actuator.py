"""autoscaler.actuators.ray_serve against a stand-in for the Serve REST API (no Ray needed)."""

from __future__ import annotations

import asyncio

import pytest

from autoscaler.actuators.base import ActuatorError
from autoscaler.actuators.ray_serve import RayServeActuator, ray_auth_token
from common.errors import ConfigError, PermissionDeniedError
from tests.fake_ray_serve import FakeServe as _FakeServe

TOKEN = "t0ken"
DEPLOYMENTS = {"prefill": "PrefillWorker", "decode": "DecodeWorker"}


def FakeServe(*, external_scaler: bool = True) -> _FakeServe:
    return _FakeServe({"PrefillWorker": 1, "DecodeWorker": 2, "RouterIngress": 1}, token=TOKEN,
                      external_scaler=external_scaler)


def test_current_and_scale_through_the_rest_api():
    with FakeServe() as serve:
        actuator = RayServeActuator(serve.url, "pdserve", DEPLOYMENTS, token=TOKEN)
        assert asyncio.run(actuator.current()) == {"prefill": 1, "decode": 2}
        asyncio.run(actuator.scale("decode", 3))
        assert serve.requests[-1] == ("POST", "/api/v1/applications/pdserve/deployments/DecodeWorker/scale",
                                      {"target_num_replicas": 3})
        assert asyncio.run(actuator.current()) == {"prefill": 1, "decode": 3}
        assert asyncio.run(actuator.flip("prefill")) is None
        with pytest.raises(ConfigError):
            asyncio.run(actuator.scale("router", 2))


def test_failures_map_onto_the_actuator_errors():
    with FakeServe(external_scaler=False) as serve:
        with pytest.raises(PermissionDeniedError, match="no Ray auth token"):
            asyncio.run(RayServeActuator(serve.url, "pdserve", DEPLOYMENTS).current())
        with pytest.raises(PermissionDeniedError, match="wrong Ray auth token"):
            asyncio.run(RayServeActuator(serve.url, "pdserve", DEPLOYMENTS, token="nope").scale("decode", 1))
        actuator = RayServeActuator(serve.url, "pdserve", DEPLOYMENTS, token=TOKEN)
        with pytest.raises(ActuatorError, match="external_scaler_enabled: true"):
            asyncio.run(actuator.scale("decode", 1))
        with pytest.raises(ActuatorError, match="no application 'other'"):
            asyncio.run(RayServeActuator(serve.url, "other", DEPLOYMENTS, token=TOKEN).current())
        renamed = RayServeActuator(serve.url, "pdserve", {"prefill": "P", "decode": "DecodeWorker"}, token=TOKEN)
        with pytest.raises(ActuatorError, match="no deployment 'P'"):
            asyncio.run(renamed.current())
    with pytest.raises(ActuatorError, match="unreachable"):
        asyncio.run(RayServeActuator("http://127.0.0.1:1", "pdserve", DEPLOYMENTS, timeout_s=1).current())
    with pytest.raises(ConfigError):
        RayServeActuator("127.0.0.1:8265", "pdserve", DEPLOYMENTS)


def test_token_is_found_where_ray_looks(tmp_path):
    home = tmp_path / "home"
    assert ray_auth_token({}, home=home) is None
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    assert ray_auth_token({}, home=home) == "from-home"
    (tmp_path / "token").write_text("from-path")
    assert ray_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}, home=home) == "from-path"
    assert ray_auth_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": "/nope"}, home=home) == "from-env"
    with pytest.raises(ConfigError):
        ray_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home=home)
