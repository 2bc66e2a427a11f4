"""The OpenAI API surface: request validation and response shapes, with no I/O.

``parse_completion`` and ``parse_chat`` turn a decoded JSON body into a
:class:`CompletionRequest` (prompts as token ids, sampling parameters, output
options), raising :class:`InvalidRequestError` with OpenAI's ``param`` for any
field that is wrong, so a bad request never reaches a worker. The builders
below produce the response objects and stream chunks of
``/v1/completions`` and ``/v1/chat/completions``.

Supported beyond the basics: ``n``, ``seed``, ``stop``, ``logprobs`` (and
``top_logprobs`` for chat), ``presence_penalty``, ``frequency_penalty``,
``logit_bias``, ``max_completion_tokens``, ``stream_options.include_usage``,
and vLLM's extensions ``top_k``, ``ignore_eos``, ``stop_token_ids``,
``skip_special_tokens``, ``include_stop_str_in_output``. Fields that would
change the output in ways this server does not implement (``tools``,
``best_of`` > ``n``, ``suffix``) are refused rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from common.errors import InvalidRequestError
from common.sampling import SamplingParams
from common.tokenizer import Tokenizer

MAX_STOP_SEQUENCES = 4


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """One validated API request: ``len(prompts) * n`` choices to generate."""

    kind: str  # "completion" | "chat"
    model: str
    prompts: tuple[tuple[int, ...], ...]
    sampling: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    echo_prompts: tuple[str, ...] | None  # completions with echo=true: the prompt texts
    user_max_tokens: bool  # max_tokens came from the request (else the context limit decides)


def _get(body: dict[str, Any], name: str, types: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in _as_tuple(types))
    if not ok:
        names = " or ".join(t.__name__ for t in _as_tuple(types))
        raise InvalidRequestError(f"must be {names}, got {type(value).__name__}", field=name)
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    if body.get("tools") or body.get("functions"):
        raise InvalidRequestError("tool calling is not supported by this server", field="tools")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise InvalidRequestError("only {'type': 'text'} is supported", field="response_format")
    if body.get("suffix") not in (None, ""):
        raise InvalidRequestError("is not supported by this server", field="suffix")


def _common(body: dict[str, Any], *, max_model_len: int, max_n: int, default_max_tokens: int | None,
            logprobs: int | None, longest_prompt: int, vocab_size: int
            ) -> tuple[SamplingParams, int, bool, bool, bool]:
    _refuse_unsupported(body)
    n = _get(body, "n", int, 1)
    if not 1 <= n <= max_n:
        raise InvalidRequestError(f"must be between 1 and {max_n}", field="n")
    best_of = _get(body, "best_of", int, n)
    if best_of != n:
        raise InvalidRequestError("must equal n (best_of sampling is not supported)", field="best_of")
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, {})
    if options and not stream:
        raise InvalidRequestError("is only allowed with stream=true", field="stream_options")
    include_usage = bool(_get(options, "include_usage", bool, False)) if options else False
    user_max = body.get("max_completion_tokens", body.get("max_tokens"))
    field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if user_max is not None:
        max_tokens = _get(body, field, int)
        if max_tokens < 1:
            raise InvalidRequestError(f"must be at least 1, got {max_tokens}", field=field)
    else:
        max_tokens = default_max_tokens or max(1, max_model_len - longest_prompt)
    if longest_prompt >= max_model_len:
        raise InvalidRequestError(f"the prompt has {longest_prompt} tokens; this model's context is "
                                  f"{max_model_len} tokens", field="messages" if "messages" in body else "prompt")
    if longest_prompt + max_tokens > max_model_len:
        raise InvalidRequestError(
            f"prompt ({longest_prompt} tokens) + {field} ({max_tokens}) exceeds the context of {max_model_len} "
            f"tokens", field=field)
    temperature = _get(body, "temperature", (int, float), 1.0)
    if not 0 <= temperature <= 2:
        raise InvalidRequestError(f"must be between 0 and 2, got {temperature}", field="temperature")
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequestError(f"at most {MAX_STOP_SEQUENCES} stop sequences", field="stop")
    sampling = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=_get(body, "top_p", (int, float), 1.0),
        top_k=_get(body, "top_k", int, -1), seed=_get(body, "seed", int), stop=stop,
        stop_token_ids=_get(body, "stop_token_ids", list, []), ignore_eos=_get(body, "ignore_eos", bool, False),
        logprobs=logprobs, include_stop_str_in_output=_get(body, "include_stop_str_in_output", bool, False),
        skip_special_tokens=_get(body, "skip_special_tokens", bool, True),
        presence_penalty=_get(body, "presence_penalty", (int, float), 0.0),
        frequency_penalty=_get(body, "frequency_penalty", (int, float), 0.0),
        logit_bias=_get(body, "logit_bias", dict, {}))
    sampling.check_vocabulary(vocab_size)
    return sampling, n, stream, include_usage, user_max is not None


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("is required and must be a string", field="model")
    return model


def parse_completion(body: dict[str, Any], tokenizer: Tokenizer, *, max_model_len: int, max_n: int,
                     vocab_size: int | None = None) -> CompletionRequest:
    """``vocab_size``: the model's (token-id prompts must be below it); default the tokenizer's."""
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        texts: list[str] | None = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        texts = prompt
    else:
        texts = None
    if texts is not None:
        prompts = [tuple(tokenizer.encode(t)) for t in texts]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [tuple(prompt)]
    elif (isinstance(prompt, list) and prompt and all(isinstance(p, list) and p for p in prompt)
          and all(isinstance(t, int) and not isinstance(t, bool) for p in prompt for t in p)):
        prompts = [tuple(p) for p in prompt]
    else:
        raise InvalidRequestError("must be a string, a list of strings, a list of token ids or a list of "
                                  "lists of token ids", field="prompt")
    if any(not p for p in prompts):
        raise InvalidRequestError("must not be empty", field="prompt")
    vocab = vocab_size or tokenizer.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise InvalidRequestError(f"token ids must be in [0, {vocab})", field="prompt")
    logprobs = _get(body, "logprobs", int)
    if logprobs is not None and not 0 <= logprobs <= 20:
        raise InvalidRequestError("must be between 0 and 20", field="logprobs")
    echo = _get(body, "echo", bool, False)
    if echo and logprobs is not None:
        raise InvalidRequestError("echo with logprobs is not supported", field="echo")
    sampling, n, stream, include_usage, user_max = _common(
        body, max_model_len=max_model_len, max_n=max_n, default_max_tokens=16, logprobs=logprobs,
        longest_prompt=max(len(p) for p in prompts), vocab_size=vocab)
    echo_prompts = tuple(texts if texts is not None else [tokenizer.decode(p) for p in prompts]) if echo else None
    return CompletionRequest("completion", model, tuple(prompts), sampling, n, stream, include_usage,
                             echo_prompts, user_max)


def parse_chat(body: dict[str, Any], tokenizer: Tokenizer, *, max_model_len: int, max_n: int,
               vocab_size: int | None = None) -> CompletionRequest:
    """``vocab_size``: the model's (logit_bias token ids must be below it); default the tokenizer's."""
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("must be a non-empty list of messages", field="messages")
    normalized = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequestError("each message must be an object with a string role", field="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is supported
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequestError("only text content parts are supported", field="messages")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise InvalidRequestError("message content must be a string or a list of parts", field="messages")
        normalized.append({**m, "content": content})
    prompt = tuple(tokenizer.encode_chat(normalized, add_generation_prompt=True))
    logprobs_on = _get(body, "logprobs", bool, False)
    top = _get(body, "top_logprobs", int)
    if top is not None and not logprobs_on:
        raise InvalidRequestError("requires logprobs=true", field="top_logprobs")
    if top is not None and not 0 <= top <= 20:
        raise InvalidRequestError("must be between 0 and 20", field="top_logprobs")
    logprobs = (top or 0) if logprobs_on else None
    sampling, n, stream, include_usage, user_max = _common(
        body, max_model_len=max_model_len, max_n=max_n, default_max_tokens=None, logprobs=logprobs,
        longest_prompt=len(prompt), vocab_size=vocab_size or tokenizer.vocab_size)
    return CompletionRequest("chat", model, (prompt,), sampling, n, stream, include_usage, None, user_max)


# --- responses ----------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer: Tokenizer, entries: list[Any], text_offset: int) -> dict[str, Any]:
    """Legacy completions format for a run of tokens (entries: TokenLogprob-like)."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    offset = text_offset
    for e in entries:
        text = _token_text(tokenizer, e.token_id)
        tokens.append(text)
        token_logprobs.append(e.logprob)
        tops.append({_token_text(tokenizer, t): lp for t, lp in zip(e.top_ids, e.top_logprobs)})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer, entries: list[Any]) -> dict[str, Any]:
    content = []
    for e in entries:
        text = _token_text(tokenizer, e.token_id)
        content.append({
            "token": text, "logprob": e.logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": (t := _token_text(tokenizer, tid)), "logprob": lp, "bytes": list(t.encode())}
                             for tid, lp in zip(e.top_ids, e.top_logprobs)]})
    return {"content": content}


def response_object(kind: str, response_id: str, model: str, choices: list[dict[str, Any]],
                    usage_: dict[str, int] | None) -> dict[str, Any]:
    obj: dict[str, Any] = {"id": response_id, "object": "chat.completion" if kind == "chat" else "text_completion",
                           "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        obj["usage"] = usage_
    return obj


def chunk_object(kind: str, response_id: str, model: str, created: int, choices: list[dict[str, Any]],
                 usage_: dict[str, int] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"id": response_id,
                           "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                           "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        obj["usage"] = usage_
    return obj
