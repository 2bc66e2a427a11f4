"""The OpenAI-compatible HTTP API (FastAPI): routes, auth, body limits, errors, SSE.

Every error leaves in OpenAI's shape (``{"error": {message, type, param,
code}}``) with the status its type implies (400, 401, 404, 413, 429 with
Retry-After, 503). Requests are fully validated here, so a bad one never
reaches a worker. A streamed response that fails after it started ends with
an error event and ``data: [DONE]``; a client that disconnects cancels every
choice, which aborts the requests on their workers.

``/health`` (liveness) and ``/ready`` (readiness: a tokenizer and at least one
healthy decode worker) are the only routes without an API key.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from common import metrics
from common.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    PdserveError,
)
from common.tokenizer import Tokenizer
from router import openai_protocol as oai
from router.auth import ApiKeys
from router.choices import Choice, interleave, start_choices
from router.service import Delta, Router

logger = logging.getLogger(__name__)

OPEN_PATHS = {"/health", "/ready"}


@dataclass(frozen=True)
class ApiSettings:
    served_model_name: str
    max_model_len: int
    max_n: int
    max_body_bytes: int
    instance: str
    vocab_size: int | None = None  # the model's; token-id prompts must be below it


def error_response(error: PdserveError) -> JSONResponse:
    headers = {}
    if isinstance(error, OverloadedError):
        headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
    return JSONResponse(error.to_openai(), status_code=error.http_status, headers=headers)


class GuardMiddleware:
    """Pure ASGI: API key on every route but the probes, and a hard cap on body size."""

    def __init__(self, app: Any, *, keys: ApiKeys, max_body_bytes: int) -> None:
        self.app = app
        self.keys = keys
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode().lower(): v.decode(errors="replace") for k, v in scope.get("headers", [])}
        if scope["path"] not in OPEN_PATHS and not self.keys.check(headers.get("authorization")):
            error = AuthenticationError("invalid or missing API key", code="invalid_api_key")
            return await error_response(error)(scope, receive, send)
        length = headers.get("content-length")
        too_large = PayloadTooLargeError(f"request body exceeds {self.max_body_bytes} bytes")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await error_response(too_large)(scope, receive, send)
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise too_large  # becomes a 413 through the app's PdserveError handler
            return message

        await self.app(scope, limited_receive, send)


def create_app(router: Router, tokenizer: Tokenizer, settings: ApiSettings, *, keys: ApiKeys,
               ready: Callable[[], bool]) -> FastAPI:
    """``ready()`` answers the readiness probe; worker gauges are read from ``router.pool`` at scrape time."""
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)
    labels = {"model": settings.served_model_name, "instance": settings.instance}
    metrics.init_router_series(settings.served_model_name, settings.instance)

    @app.exception_handler(PdserveError)
    async def _pdserve_error(request: Request, error: PdserveError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(PdserveError("internal error"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = NotFoundError if error.status_code == 404 else InvalidRequestError
        response = error_response(kind(str(error.detail)))
        response.status_code = error.status_code
        return response

    @app.middleware("http")
    async def _count(request: Request, call_next: Callable) -> Response:
        response = await call_next(request)
        if request.url.path.startswith("/v1/"):
            metrics.ROUTER_REQUESTS.labels(**labels, endpoint=metrics.api_endpoint(request.url.path),
                                           status=str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready_probe() -> JSONResponse:
        ok = ready()
        return JSONResponse({"status": "ready" if ok else "not ready"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        for role in ("prefill", "decode"):
            metrics.ROUTER_WORKERS.labels(**labels, role=role).set(len(router.pool.healthy(role)))
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.served_model_name, "object": "model", "created": 0,
                                            "owned_by": "pdserve", "max_model_len": settings.max_model_len}]}

    async def _body(request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise InvalidRequestError(f"Content-Type must be application/json, got {ctype or 'none'!r}")
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidRequestError(f"the body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise InvalidRequestError("the body must be a JSON object")
        model = body.get("model")
        if isinstance(model, str) and model and model != settings.served_model_name:
            raise NotFoundError(f"the model {model!r} does not exist", field="model", code="model_not_found")
        return body

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _body(request)
        parsed = oai.parse_completion(body, tokenizer, max_model_len=settings.max_model_len, max_n=settings.max_n,
                                      vocab_size=settings.vocab_size)
        return await _respond(parsed)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await _body(request)
        parsed = oai.parse_chat(body, tokenizer, max_model_len=settings.max_model_len, max_n=settings.max_n,
                                vocab_size=settings.vocab_size)
        return await _respond(parsed)

    async def _respond(req: oai.CompletionRequest) -> Response:
        response_id = oai.new_id(req.kind)
        arrival = time.monotonic()
        choices = await start_choices(router, req, response_id)
        metrics.ROUTER_TTFT.labels(**labels).observe(time.monotonic() - arrival)
        prompt_tokens = sum(len(p) for p in req.prompts)
        metrics.ROUTER_PROMPT_TOKENS.labels(**labels).inc(prompt_tokens)
        if req.stream:
            return StreamingResponse(_sse(req, response_id, choices, prompt_tokens, arrival),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        last_token_at = {c.index: arrival for c in choices}
        async for c, delta in interleave(choices):
            _observe_itl(c, delta, last_token_at)
            c.text.append(delta.text)
            c.num_tokens += len(delta.token_ids)
            c.logprobs.extend(delta.logprobs)
            c.finish_reason = delta.finish_reason or c.finish_reason
        metrics.ROUTER_E2E.labels(**labels).observe(time.monotonic() - arrival)
        completion_tokens = sum(c.num_tokens for c in choices)
        metrics.ROUTER_GENERATION_TOKENS.labels(**labels).inc(completion_tokens)
        return JSONResponse(oai.response_object(req.kind, response_id, settings.served_model_name,
                                                [_final_choice(req, c) for c in choices],
                                                oai.usage(prompt_tokens, completion_tokens)))

    def _observe_itl(c: Choice, delta: Delta, last_token_at: dict[int, float]) -> None:
        """Inter-token latency of a choice's tokens after its first (streamed or not: the service's speed)."""
        now = time.monotonic()
        if delta.token_ids and c.num_tokens:
            metrics.ROUTER_ITL.labels(**labels).observe((now - last_token_at[c.index]) / len(delta.token_ids))
        last_token_at[c.index] = now

    def _final_choice(req: oai.CompletionRequest, c: Choice) -> dict[str, Any]:
        text = "".join(c.text)
        want_logprobs = req.sampling.logprobs is not None
        if req.kind == "chat":
            return {"index": c.index, "message": {"role": "assistant", "content": text},
                    "logprobs": oai.chat_logprobs(tokenizer, c.logprobs) if want_logprobs else None,
                    "finish_reason": c.finish_reason}
        if req.echo_prompts is not None:
            text = req.echo_prompts[c.prompt_index] + text
        return {"index": c.index, "text": text,
                "logprobs": oai.completion_logprobs(tokenizer, c.logprobs, 0) if want_logprobs else None,
                "finish_reason": c.finish_reason}

    def _chunk_choice(req: oai.CompletionRequest, c: Choice, delta: Delta, offset: int) -> dict[str, Any]:
        want_logprobs = req.sampling.logprobs is not None
        choice: dict[str, Any] = {"index": c.index, "finish_reason": delta.finish_reason}
        if req.kind == "chat":
            choice["delta"] = {"content": delta.text} if delta.text or not delta.finish_reason else {}
            choice["logprobs"] = oai.chat_logprobs(tokenizer, delta.logprobs) if want_logprobs else None
        else:
            choice["text"] = delta.text
            choice["logprobs"] = (oai.completion_logprobs(tokenizer, delta.logprobs, offset)
                                  if want_logprobs else None)
        return choice

    async def _sse(req: oai.CompletionRequest, response_id: str, choices: list[Choice], prompt_tokens: int,
                   arrival: float) -> AsyncIterator[str]:
        created = int(time.time())
        model = settings.served_model_name
        offsets = {c.index: 0 for c in choices}
        last_token_at = {c.index: arrival for c in choices}
        if req.kind == "chat":
            yield _event(oai.chunk_object(req.kind, response_id, model, created, [
                {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for c in choices]))
        elif req.echo_prompts is not None:
            yield _event(oai.chunk_object(req.kind, response_id, model, created, [
                {"index": c.index, "text": req.echo_prompts[c.prompt_index], "logprobs": None, "finish_reason": None}
                for c in choices]))
        try:
            async for c, delta in interleave(choices):
                _observe_itl(c, delta, last_token_at)
                c.num_tokens += len(delta.token_ids)
                yield _event(oai.chunk_object(req.kind, response_id, model, created,
                                              [_chunk_choice(req, c, delta, offsets[c.index])]))
                offsets[c.index] += len(delta.text)
        except Exception as e:  # noqa: BLE001 (the response has started: report in-band, then end)
            error = e if isinstance(e, PdserveError) else PdserveError(f"generation failed: {e}")
            logger.warning("stream %s failed after it started: %s", response_id, e)
            yield _event(error.to_openai())
        else:
            completion_tokens = sum(c.num_tokens for c in choices)
            metrics.ROUTER_GENERATION_TOKENS.labels(**labels).inc(completion_tokens)
            metrics.ROUTER_E2E.labels(**labels).observe(time.monotonic() - arrival)
            if req.include_usage:
                yield _event(oai.chunk_object(req.kind, response_id, model, created, [],
                                              oai.usage(prompt_tokens, completion_tokens)))
        yield "data: [DONE]\n\n"

    return app


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"
