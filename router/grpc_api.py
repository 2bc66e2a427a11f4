"""The router's public gRPC API (``proto/api.proto``), with the HTTP API's semantics.

A ``CompletionRequest`` is translated into the body of the equivalent HTTP
request and validated by the same parser, so both front ends accept and
refuse exactly the same things; errors map to gRPC status codes
(INVALID_ARGUMENT, UNAUTHENTICATED, NOT_FOUND, RESOURCE_EXHAUSTED with a
``retry-after`` trailer, UNAVAILABLE).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from common.errors import AuthenticationError, NotFoundError, OverloadedError, PdserveError
from common.rpc import api_pb2 as api
from common.rpc import api_pb2_grpc as api_grpc
from common.tokenizer import Tokenizer
from router import openai_protocol as oai
from router.auth import ApiKeys
from router.choices import interleave, start_choices
from router.service import Router

logger = logging.getLogger(__name__)


def _body(request: api.CompletionRequest) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": request.model, "ignore_eos": request.ignore_eos,
                            "stop_token_ids": list(request.stop_token_ids)}
    for name in ("max_tokens", "top_k", "seed", "n"):
        if request.HasField(name):
            body[name] = getattr(request, name)
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        if request.HasField(name):
            body[name] = round(getattr(request, name), 6)
    if request.logit_bias:
        body["logit_bias"] = {token_id: round(bias, 6) for token_id, bias in request.logit_bias.items()}
    if request.stop:
        body["stop"] = list(request.stop)
    kind = request.WhichOneof("prompt")
    if kind == "chat":
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        if request.HasField("logprobs"):
            body["logprobs"], body["top_logprobs"] = True, request.logprobs
        return "chat", body
    if request.HasField("logprobs"):
        body["logprobs"] = request.logprobs
    body["prompt"] = request.text if kind == "text" else list(request.token_ids.ids) if kind else None
    return "completion", body


class CompletionsService(api_grpc.CompletionsServicer):
    def __init__(self, router: Router, tokenizer: Tokenizer, *, served_model_name: str, max_model_len: int,
                 max_n: int, keys: ApiKeys, vocab_size: int | None = None) -> None:
        self.router = router
        self.tokenizer = tokenizer
        self.served_model_name = served_model_name
        self.max_model_len = max_model_len
        self.max_n = max_n
        self.keys = keys
        self.vocab_size = vocab_size

    def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        if not self.keys.check(metadata.get("authorization")):
            raise AuthenticationError("invalid or missing API key")

    async def _abort(self, context: grpc.aio.ServicerContext, error: PdserveError) -> None:
        if isinstance(error, OverloadedError):
            context.set_trailing_metadata((("retry-after", str(max(1, round(error.retry_after_s)))),))
        await context.abort(grpc.StatusCode[error.grpc_code], str(error))

    async def ListModels(self, request: api.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> api.ListModelsResponse:
        try:
            self._authenticate(context)
        except PdserveError as e:
            await self._abort(context, e)
        return api.ListModelsResponse(models=[api.ModelInfo(id=self.served_model_name,
                                                            max_model_len=self.max_model_len)])

    async def Complete(self, request: api.CompletionRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[api.CompletionChunk]:
        try:
            self._authenticate(context)
            kind, body = _body(request)
            if body["model"] != self.served_model_name:
                raise NotFoundError(f"the model {body['model']!r} does not exist", field="model")
            if kind == "chat":
                req = oai.parse_chat(body, self.tokenizer, max_model_len=self.max_model_len, max_n=self.max_n,
                                     vocab_size=self.vocab_size)
            else:
                req = oai.parse_completion(body, self.tokenizer, max_model_len=self.max_model_len, max_n=self.max_n,
                                           vocab_size=self.vocab_size)
            response_id = oai.new_id(kind)
            choices = await start_choices(self.router, req, response_id)
        except PdserveError as e:
            await self._abort(context, e)
            return
        try:
            async for c, delta in interleave(choices):
                c.num_tokens += len(delta.token_ids)
                yield api.CompletionChunk(id=response_id, index=c.index, text=delta.text, token_ids=delta.token_ids,
                                          logprobs=delta.logprobs, finish_reason=delta.finish_reason or "")
        except PdserveError as e:
            await self._abort(context, e)
            return
        prompt_tokens = sum(len(p) for p in req.prompts)
        completion_tokens = sum(c.num_tokens for c in choices)
        yield api.CompletionChunk(id=response_id, usage=api.Usage(
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens))
