"""The scaffold of a strict Kubernetes API server stand-in, shared by the discovery and autoscaler tests.

:class:`StandInApiServer` serves HTTP/1.1 on a free local port and hands every request, whatever
its verb, to the subclass's ``handle``; :meth:`~StandInApiServer.api_client` is an official
``kubernetes`` client pointed at it with a bearer token. :func:`status` is the API server's
``Status`` error body and :func:`send_json` writes one JSON answer (``fake_ray_serve`` uses it too).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

NS = "serving"
TOKEN = "s3cret-token"


def status(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    if details:
        body["details"] = details
    return body


def send_json(h: BaseHTTPRequestHandler, code: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    h.send_response(code)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


class StandInApiServer:
    """Starts serving on construction; subclasses set up their state first, then call ``super().__init__()``."""

    def __init__(self) -> None:
        handler = type("Handler", (_Handler,), {"fake": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}"

    def api_client(self, token: str = TOKEN) -> Any:
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        cfg.api_key = {"authorization": token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(cfg)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        """Called on a handler thread for every request; answers it."""
        raise NotImplementedError


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: StandInApiServer

    def do_GET(self) -> None:
        self.fake.handle(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass
