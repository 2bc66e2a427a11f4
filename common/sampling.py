"""Sampling parameters of one request: a frozen, self-validating value.

The router builds it from an OpenAI request, ships it to workers over gRPC and
the engine's sampler reads it. Validation happens once, on construction, and
raises :class:`InvalidRequestError` naming the field. Checks that need the
model (context length, vocabulary) are the engine's, at ``add_request``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from common.errors import InvalidRequestError

MAX_LOGPROBS = 20


def _normalize_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise InvalidRequestError(
            f"must be a string or a list of strings, got {type(stop).__name__}", field="stop")
    for s in stop:
        if not isinstance(s, str):
            raise InvalidRequestError(
                f"every stop sequence must be a string, got {type(s).__name__}", field="stop")
        if not s:
            raise InvalidRequestError("stop sequences must not be empty", field="stop")
    return tuple(stop)


def _int_field(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"must be an integer, got {value!r}", field=name)
    return value


def _float_field(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"must be a number, got {value!r}", field=name)
    value = float(value)
    if not math.isfinite(value):
        raise InvalidRequestError(f"must be finite, got {value!r}", field=name)
    return value


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    ``temperature == 0`` is greedy. ``top_k`` of -1 or 0 disables top-k.
    ``logprobs=N`` returns, for every generated token, its log-probability and
    the N most likely alternatives, computed from the model's raw distribution
    (before temperature, top-k and top-p). ``seed`` makes random sampling
    reproducible per request, whatever else is in the batch.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if _int_field(self.max_tokens, "max_tokens") < 1:
            raise InvalidRequestError(f"must be at least 1, got {self.max_tokens}", field="max_tokens")
        temperature = _float_field(self.temperature, "temperature")
        if temperature < 0:
            raise InvalidRequestError(f"must be >= 0, got {self.temperature}", field="temperature")
        set_(self, "temperature", temperature)
        top_p = _float_field(self.top_p, "top_p")
        if not 0.0 < top_p <= 1.0:
            raise InvalidRequestError(f"must be in (0, 1], got {self.top_p}", field="top_p")
        set_(self, "top_p", top_p)
        if _int_field(self.top_k, "top_k") < -1:
            raise InvalidRequestError(f"must be -1 (disabled) or >= 0, got {self.top_k}", field="top_k")
        if self.seed is not None:
            _int_field(self.seed, "seed")
        set_(self, "stop", _normalize_stop(self.stop))
        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(
                self.stop_token_ids, (list, tuple)):
            raise InvalidRequestError("must be a list of integers", field="stop_token_ids")
        ids = tuple(_int_field(t, "stop_token_ids") for t in self.stop_token_ids)
        if any(t < 0 for t in ids):
            raise InvalidRequestError("token ids must be >= 0", field="stop_token_ids")
        set_(self, "stop_token_ids", ids)
        if self.logprobs is not None:
            n = _int_field(self.logprobs, "logprobs")
            if not 0 <= n <= MAX_LOGPROBS:
                raise InvalidRequestError(f"must be in [0, {MAX_LOGPROBS}], got {n}", field="logprobs")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError("must be a boolean", field=name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "seed": self.seed, "stop": list(self.stop),
            "stop_token_ids": list(self.stop_token_ids), "ignore_eos": self.ignore_eos,
            "logprobs": self.logprobs, "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens,
        }
