"""Text in and text out, shared by the router and the engine, without torch.

Owns three things:

* ``Tokenizer``: loads a Hugging Face checkpoint's tokenizer (``tokenizer.json`` plus the
  JSON configs around it), encodes and decodes exactly as ``transformers.AutoTokenizer``
  does, and renders the chat template in the same sandboxed Jinja environment. The router
  tokenizes prompts with it and the engine detokenizes outputs with it, so both hash the
  same token ids.
* ``IncrementalDetokenizer``: turns a request's growing list of output token ids into text
  deltas for streaming, never emitting half of a UTF-8 character that byte-level BPE split
  across tokens. One per request; the engine calls ``add`` once per generated step.
* ``find_stop`` and ``StopStringMatcher``: stop-string detection that looks only at the
  text a new delta could complete, and holds back text that may be the start of a stop
  string until it is known to be safe to stream.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

from common.errors import ConfigError, InvalidRequestError

# The named special tokens that transformers passes to chat templates and marks special.
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                         "mask_token")
# transformers copies a message's reasoning between these names so that any template finds it.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# How many prompt tokens the detokenizer decodes as left context for the first output tokens.
_PROMPT_CONTEXT_TOKENS = 5


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    """A special token from a config: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_ids(value: Any) -> set[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


class Tokenizer:
    """A checkpoint's tokenizer and chat template; immutable after ``from_dir``."""

    def __init__(self, backend: _Backend, *, special_tokens: Mapping[str, str] | None = None,
                 chat_template: str | Mapping[str, str] | None = None,
                 extra_eos_token_ids: Iterable[int] = (), clean_up_tokenization_spaces: bool = False,
                 model_max_length: int | None = None) -> None:
        self._backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        # transformers ignores clean-up for BPE models: it would delete real spaces before punctuation.
        self._clean_up = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"
        eos_ids = set(extra_eos_token_ids)
        if (eos_id := self.token_to_id(self.special_tokens.get("eos_token"))) is not None:
            eos_ids.add(eos_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self._templates: dict[str, jinja2.Template] = {}

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load from a Hugging Face checkpoint directory, resolving configs as transformers 5 does."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        backend = _Backend.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        if "added_tokens_decoder" not in config:  # legacy checkpoints: the map overrides the config
            config |= _read_json(path / "special_tokens_map.json")
        special = {name: _token_content(config.get(name)) for name in _NAMED_SPECIAL_TOKENS}
        special = {k: v for k, v in special.items() if v is not None}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        extra = extra.values() if isinstance(extra, dict) else extra
        _mark_special(backend, [*special.values(), *filter(None, map(_token_content, extra))])
        # Like transformers 5, ignore add_bos_token/add_eos_token: tokenizer.json's post-processor rules.
        chat_template = _load_chat_template(path, config.get("chat_template"))
        eos_ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            eos_ids |= _as_ids(_read_json(path / name).get("eos_token_id"))
        max_length = config.get("model_max_length")
        if not isinstance(max_length, int) or max_length > 1 << 40:  # transformers' "no limit" is 1e30
            max_length = None
        return cls(backend, special_tokens=special, chat_template=chat_template,
                   extra_eos_token_ids=eos_ids, model_max_length=max_length,
                   clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)))

    # ---- vocabulary ----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included (``len(hf_tokenizer)``)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("bos_token"))

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("pad_token"))

    @property
    def all_special_ids(self) -> frozenset[int]:
        """Ids that ``decode(skip_special_tokens=True)`` drops: every added token marked special."""
        return self._special_ids

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self._backend.id_to_token(i) for i in ids]

    # ---- text <-> ids ----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    # ---- chat ------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Any, add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        """Render a conversation to the prompt text, as ``transformers``' ``apply_chat_template``.

        Called by the router for chat requests. ``kwargs`` become template variables (for
        example ``enable_thinking``) and override the special tokens of the same name.
        """
        messages = _checked_messages(messages)
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise InvalidRequestError("tools must be a list of objects", field="tools")
        template = self._template(tools)
        variables = {**self.special_tokens, "documents": None, **kwargs}
        try:
            return template.render(messages=messages, tools=tools,
                                   add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise InvalidRequestError(f"chat template rejected the messages: {e}", field="messages") from e

    def encode_chat(self, messages: Any, add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> list[int]:
        """Token ids of the rendered chat; the template writes BOS itself, so none is added."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools, **kwargs)
        return self.encode(text, add_special_tokens=False)

    def _template(self, tools: list[dict[str, Any]] | None) -> jinja2.Template:
        source = self.chat_template
        if isinstance(source, Mapping):  # named templates: transformers picks "tool_use" when given tools
            name = "tool_use" if tools is not None and "tool_use" in source else "default"
            source = source.get(name)
        if not source:
            raise InvalidRequestError("this model has no chat template; use the completions API",
                                      field="messages")
        if source not in self._templates:
            try:
                self._templates[source] = _jinja_env().from_string(source)
            except jinja2.TemplateSyntaxError as e:
                raise ConfigError(f"chat template does not compile: {e}", field="chat_template") from e
        return self._templates[source]


def _mark_special(backend: _Backend, tokens: Iterable[str]) -> None:
    """Make the config's special tokens special in the backend, as transformers does on load."""
    added = {t.content: t for t in backend.get_added_tokens_decoder().values()}
    missing = []
    for content in dict.fromkeys(tokens):
        old = added.get(content)
        if old is None:
            missing.append(AddedToken(content, special=True, normalized=False))
        elif not old.special:
            missing.append(AddedToken(content, single_word=old.single_word, lstrip=old.lstrip,
                                      rstrip=old.rstrip, normalized=old.normalized, special=True))
    if missing:
        backend.add_special_tokens(missing)


def _load_chat_template(path: Path, from_config: Any) -> str | dict[str, str] | None:
    """``chat_template.jinja`` and ``additional_chat_templates/`` win over tokenizer_config's."""
    templates: dict[str, str] = {}
    if (path / "chat_template.jinja").is_file():
        templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = path / "additional_chat_templates"
    if extra_dir.is_dir():
        for file in sorted(extra_dir.glob("*.jinja")):
            templates[file.stem] = file.read_text(encoding="utf-8")
    if not templates:
        if isinstance(from_config, list):  # [{"name": ..., "template": ...}, ...]
            return {t["name"]: t["template"] for t in from_config}
        return from_config if isinstance(from_config, str) else None
    if list(templates) == ["default"]:
        return templates["default"]
    return templates


def _checked_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate messages and copy them the way transformers does (None values dropped)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", field="messages")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"message {i} must be an object", field="messages")
        message = {k: v for k, v in message.items() if v is not None}
        if not isinstance(message.get("role"), str):
            raise InvalidRequestError(f"message {i} needs a string 'role'", field="messages")
        content = message.get("content")
        if not isinstance(content, (str, list)) and not (content is None and "tool_calls" in message):
            raise InvalidRequestError(f"message {i} needs a string or list 'content'", field="messages")
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        checked.append(message)
    return checked


def _raise_exception(message: str) -> None:
    raise InvalidRequestError(message, field="messages")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _jinja_env() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in; templates are untrusted code."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _clean_up_tokenization(text: str) -> str:
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


class IncrementalDetokenizer:
    """Streams one request's output text, a delta per ``add``.

    Keeps a window of token ids: ``[prefix_offset, read_offset)`` was already emitted and
    is decoded again only as context (so a leading space or merge comes out right), and
    ``[read_offset, end)`` is new. A delta is emitted once the window's text no longer ends
    in U+FFFD, i.e. once every character split across tokens is complete. Each call decodes
    a few tokens, so a long output costs linear time.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_len = len(self._decode(self._ids))
        self._chunks: list[str] = []
        self._text = ""

    def add(self, token_ids: Sequence[int]) -> str:
        """Append output token ids; return the newly completed text (maybe empty)."""
        self._ids.extend(token_ids)
        window = self._decode(self._ids[self._prefix_offset:])
        if len(window) <= self._prefix_len or window.endswith("\ufffd"):
            return ""  # nothing visible yet, or a character is still incomplete
        delta = window[self._prefix_len:]
        # The tokens just emitted become the context for the next delta.
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_len = len(self._decode(self._ids[self._prefix_offset:self._read_offset]))
        if self._prefix_offset > 256:  # drop ids that are no longer needed as context
            del self._ids[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        self._chunks.append(delta)
        return delta

    def flush(self) -> str:
        """At the end of the request: emit whatever is held, U+FFFD for bytes that never completed."""
        window = self._decode(self._ids[self._prefix_offset:])
        if len(window) <= self._prefix_len:
            return ""
        delta = window[self._prefix_len:]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_len = 0
        self._chunks.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        if self._chunks:
            self._text += "".join(self._chunks)
            self._chunks.clear()
        return self._text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


def find_stop(text: str, new_text_len: int, stop_strings: Sequence[str],
              include_stop: bool = False) -> tuple[int | None, str | None]:
    """Find a stop string that ends within the last ``new_text_len`` characters of ``text``.

    Returns ``(truncate_at, matched)``: keep ``text[:truncate_at]``; ``(None, None)`` if no
    stop string ends in the new text. Of several matches, the one that ends first wins (the
    one a token-by-token stream would meet first), and of those the longest.
    """
    best: tuple[int, int, str] | None = None
    for stop in stop_strings:
        start = text.find(stop, max(0, len(text) - new_text_len - len(stop) + 1))
        if start >= 0 and (best is None or (start + len(stop), -len(stop)) < (best[1], -len(best[2]))):
            best = (start, start + len(stop), stop)
    if best is None:
        return None, None
    start, end, stop = best
    return (end if include_stop else start), stop


class StopStringMatcher:
    """Applies stop strings to a stream of text deltas; one per request.

    ``feed`` returns only text that can no longer become part of a stop string: a tail that
    is a prefix of some stop string is held back until the next delta decides it, or until
    ``flush`` releases it at the end of the request.
    """

    def __init__(self, stop_strings: Sequence[str], include_stop: bool = False) -> None:
        if any(not s for s in stop_strings):
            raise InvalidRequestError("stop sequences must not be empty", field="stop")
        self._stops = tuple(stop_strings)
        self._include_stop = include_stop
        self._held = ""
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, delta: str) -> tuple[str, bool, str | None]:
        """Returns ``(text safe to emit, stopped, matched stop string)``."""
        if self.matched is not None:
            return "", True, self.matched
        text = self._held + delta
        cut, matched = find_stop(text, len(delta), self._stops, self._include_stop)
        if matched is not None:
            self._held, self.matched = "", matched
            return text[:cut], True, matched
        keep = self._partial_stop_len(text)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], False, None

    def flush(self) -> str:
        """The held-back text, once the request ends without a stop-string match."""
        held, self._held = self._held, ""
        return held

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest tail of ``text`` that some stop string starts with."""
        longest = max((len(s) for s in self._stops), default=1) - 1
        for n in range(min(longest, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0
