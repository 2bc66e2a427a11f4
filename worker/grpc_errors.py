"""Typed errors raised by a servicer method leave as the gRPC status their type names."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from common.errors import PdserveError


def grpc_errors(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Map typed errors raised by a servicer method onto gRPC status codes."""
    if inspect.isasyncgenfunction(handler):
        @functools.wraps(handler)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in handler(self, request, context):
                    yield item
            except PdserveError as e:
                await context.abort(grpc.StatusCode[e.grpc_code], str(e))
        return stream

    @functools.wraps(handler)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except PdserveError as e:
            await context.abort(grpc.StatusCode[e.grpc_code], str(e))
    return unary
