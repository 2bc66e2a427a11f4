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
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty lie in [-MAX_PENALTY, MAX_PENALTY]
MAX_LOGIT_BIAS = 100.0  # each bias lies in [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS]
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's cap on the size of logit_bias


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


def _token_id_key(key: Any) -> int:
    """A logit_bias key: an int, or (from JSON, where object keys are strings) a string of one."""
    if isinstance(key, str):  # decimal digits only: int() would also take "5_0", " +7 " and other scripts' digits
        if not (key.isascii() and key.isdigit()):
            raise InvalidRequestError(f"keys must be token ids, got {key!r}", field="logit_bias")
        key = int(key)
    if _int_field(key, "logit_bias") < 0:
        raise InvalidRequestError(f"token ids must be >= 0, got {key}", field="logit_bias")
    return key


def _normalize_logit_bias(bias: Any) -> tuple[tuple[int, float], ...]:
    """``{token_id: bias}`` (or pairs) as ``((token_id, bias), ...)`` sorted by token id."""
    if bias is None:
        return ()
    if isinstance(bias, dict):
        items = list(bias.items())
    elif isinstance(bias, (list, tuple)) and all(isinstance(e, (list, tuple)) and len(e) == 2 for e in bias):
        items = [tuple(e) for e in bias]
    else:
        raise InvalidRequestError(f"must be a map from token id to bias, got {type(bias).__name__}",
                                  field="logit_bias")
    if len(items) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidRequestError(f"at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(items)}",
                                  field="logit_bias")
    out: dict[int, float] = {}
    for key, value in items:
        token_id = _token_id_key(key)
        value = _float_field(value, "logit_bias")
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise InvalidRequestError(f"biases must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {value} "
                                      f"for token {token_id}", field="logit_bias")
        if token_id in out:
            raise InvalidRequestError(f"token {token_id} appears twice", field="logit_bias")
        out[token_id] = value
    return tuple(sorted(out.items()))


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    ``temperature == 0`` is greedy. ``top_k`` of -1 or 0 disables top-k.
    ``logprobs=N`` returns, for every generated token, its log-probability and
    the N most likely alternatives, computed from the model's distribution
    after ``logit_bias`` and the penalties but before temperature, top-k and
    top-p: the distribution the request asked for, before the knobs that only
    shape the random draw (so under greedy the chosen token is always the top
    alternative). ``seed`` makes random sampling reproducible per request,
    whatever else is in the batch.

    OpenAI's penalties, applied to the logits before anything else: for each
    token already generated in this completion (prompt tokens do not count),
    ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``.
    ``logit_bias`` adds a bias to the logits of the given token ids; it is kept
    as ``((token_id, bias), ...)`` sorted by token id (a dict is accepted).
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

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
        for name in ("presence_penalty", "frequency_penalty"):
            penalty = _float_field(getattr(self, name), name)
            if not -MAX_PENALTY <= penalty <= MAX_PENALTY:
                raise InvalidRequestError(f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {penalty}",
                                          field=name)
            set_(self, name, penalty)
        set_(self, "logit_bias", _normalize_logit_bias(self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_vocabulary(self, vocab_size: int) -> None:
        """Refuse token ids (``stop_token_ids``, ``logit_bias``) outside ``[0, vocab_size)``."""
        if any(t >= vocab_size for t in self.stop_token_ids):
            raise InvalidRequestError("stop token id outside the vocabulary", field="stop_token_ids")
        if self.logit_bias and self.logit_bias[-1][0] >= vocab_size:  # sorted by token id
            raise InvalidRequestError(f"token id {self.logit_bias[-1][0]} is outside the vocabulary "
                                      f"[0, {vocab_size})", field="logit_bias")

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "seed": self.seed, "stop": list(self.stop),
            "stop_token_ids": list(self.stop_token_ids), "ignore_eos": self.ignore_eos,
            "logprobs": self.logprobs, "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "logit_bias": dict(self.logit_bias),
        }
