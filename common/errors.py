"""Typed errors shared by every component.

Each error knows how it crosses a service boundary: the HTTP status and the
OpenAI error ``type`` the router answers with, and the gRPC status code name a
worker aborts an RPC with. ``field`` names the offending request or config
field (OpenAI's ``param``), so a client can tell which input was wrong.
"""

from __future__ import annotations

from typing import Any


class PdserveError(Exception):
    """Base class. Subclasses fix the status codes; instances carry the message."""

    http_status: int = 500
    openai_type: str = "internal_error"
    grpc_code: str = "INTERNAL"  # name of a grpc.StatusCode member

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.code = code

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.openai_type,
                "param": self.field,
                "code": self.code,
            }
        }


class InvalidRequestError(PdserveError):
    """The request itself is wrong (a field out of range, a prompt too long)."""

    http_status = 400
    openai_type = "invalid_request_error"
    grpc_code = "INVALID_ARGUMENT"


class ConfigError(PdserveError):
    """A configuration value is wrong; raised when a config object is built."""

    http_status = 500
    openai_type = "internal_error"
    grpc_code = "FAILED_PRECONDITION"


class AuthenticationError(PdserveError):
    http_status = 401
    openai_type = "authentication_error"
    grpc_code = "UNAUTHENTICATED"


class PermissionDeniedError(PdserveError):
    http_status = 403
    openai_type = "permission_error"
    grpc_code = "PERMISSION_DENIED"


class NotFoundError(PdserveError):
    http_status = 404
    openai_type = "not_found_error"
    grpc_code = "NOT_FOUND"


class PayloadTooLargeError(PdserveError):
    http_status = 413
    openai_type = "invalid_request_error"
    grpc_code = "RESOURCE_EXHAUSTED"


class OverloadedError(PdserveError):
    """Admission refused; ``retry_after_s`` is the client's back-off hint."""

    http_status = 429
    openai_type = "rate_limit_error"
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, field: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message, field=field, code=code)
        self.retry_after_s = retry_after_s


class UnavailableError(PdserveError):
    """No worker can take the request now (none registered, all draining)."""

    http_status = 503
    openai_type = "service_unavailable"
    grpc_code = "UNAVAILABLE"


class RequestAbortedError(PdserveError):
    http_status = 499
    openai_type = "request_aborted"
    grpc_code = "CANCELLED"


class DeadlineExceededError(PdserveError):
    http_status = 504
    openai_type = "timeout"
    grpc_code = "DEADLINE_EXCEEDED"


class KVTransferError(PdserveError):
    """A KV transfer failed (peer gone, deadline, bad checksum). The consumer recomputes."""

    http_status = 502
    openai_type = "internal_error"
    grpc_code = "DATA_LOSS"
