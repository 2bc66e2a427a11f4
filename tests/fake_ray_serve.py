"""A stand-in for Ray Serve's REST API, as the autoscaler's Ray Serve actuator uses it (no Ray needed).

``GET /api/serve/applications/`` reports each deployment's ``target_num_replicas``;
``POST /api/v1/applications/<app>/deployments/<name>/scale`` sets it, answering 412 unless the
application has ``external_scaler_enabled`` and 404 for an unknown deployment. With ``token`` set,
every request must carry ``Authorization: Bearer <token>`` (Ray's token authentication), or gets 401.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.k8s_stand_in import send_json


class FakeServe:
    def __init__(self, replicas: dict[str, int], *, app: str = "pdserve", token: str | None = None,
                 external_scaler: bool = True) -> None:
        self.replicas = dict(replicas)
        self.app = app
        self.token = token
        self.external_scaler = external_scaler
        self.requests: list[tuple[str, str, dict | None]] = []
        self.scaled: list[tuple[str, int]] = []  # (deployment, replicas) of every accepted scale
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _authorized(self) -> bool:
                if fake.token is not None and self.headers.get("Authorization") != f"Bearer {fake.token}":
                    send_json(self, 401, {"error": "Unauthorized: Missing authentication token"})
                    return False
                return True

            def do_GET(self):
                fake.requests.append(("GET", self.path, None))
                if not self._authorized():
                    return
                deployments = {name: {"name": name, "target_num_replicas": n} for name, n in fake.replicas.items()}
                send_json(self, 200, {"applications": {fake.app: {"status": "RUNNING", "deployments": deployments}}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(("POST", self.path, body))
                if not self._authorized():
                    return
                prefix = f"/api/v1/applications/{fake.app}/deployments/"
                name = self.path.removeprefix(prefix).removesuffix("/scale")
                if not fake.external_scaler:
                    send_json(self, 412, {"error": "external_scaler_enabled is false"})
                elif not self.path.startswith(prefix) or name not in fake.replicas:
                    send_json(self, 404, {"error": "Application or Deployment not found"})
                else:
                    fake.replicas[name] = body["target_num_replicas"]
                    fake.scaled.append((name, body["target_num_replicas"]))
                    send_json(self, 200, {"message": "Scaling request received."})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeServe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
