"""Offline batch generation: ``LLM(model_dir, **engine_options).generate(...)``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from common.config import EngineConfig
from common.errors import InvalidRequestError
from common.sampling import SamplingParams
from engine.core import EngineCore
from engine.output import RequestOutput


class LLM:
    """Runs an :class:`EngineCore` to completion over a batch of prompts.

    ``engine_options`` are :class:`EngineConfig` fields (``dtype``, ``block_size``,
    ``max_num_batched_tokens``, ...).
    """

    def __init__(self, model: str, **engine_options: object) -> None:
        self.engine = EngineCore(EngineConfig(model=str(model), **engine_options))  # type: ignore[arg-type]
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: str | Sequence[str] | None = None,
                 prompt_token_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """One finished :class:`RequestOutput` per prompt, in order.

        Every request is validated before any is started, so a bad one raises
        :class:`InvalidRequestError` without leaving work behind.
        """
        token_lists = self._token_lists(prompts, prompt_token_ids)
        if sampling is None:
            sampling = SamplingParams()
        params = [sampling] * len(token_lists) if isinstance(sampling, SamplingParams) else list(sampling)
        if len(params) != len(token_lists):
            raise InvalidRequestError(f"got {len(params)} sampling params for {len(token_lists)} prompts",
                                      field="sampling")
        ids = [f"llm-{next(self._ids)}" for _ in token_lists]
        for rid, tokens, p in zip(ids, token_lists, params):
            self.engine.validate(rid, tokens, p)
        for rid, tokens, p in zip(ids, token_lists, params):
            self.engine.add_request(rid, tokens, p)
        finished: dict[str, RequestOutput] = {}
        while len(finished) < len(ids):
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        return [finished[rid] for rid in ids]

    def _token_lists(self, prompts: str | Sequence[str] | None,
                     prompt_token_ids: Sequence[int] | Sequence[Sequence[int]] | None) -> list[list[int]]:
        if (prompts is None) == (prompt_token_ids is None):
            raise InvalidRequestError("give exactly one of prompts and prompt_token_ids", field="prompt")
        if prompts is not None:
            if self.tokenizer is None:
                raise InvalidRequestError("text prompts need a tokenizer in the model directory", field="prompt")
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            for t in texts:
                if not isinstance(t, str):
                    raise InvalidRequestError("prompts must be strings", field="prompt")
            return [self.tokenizer.encode(t) for t in texts]
        ids = list(prompt_token_ids)  # type: ignore[arg-type]
        if ids and all(isinstance(t, int) for t in ids):
            return [list(ids)]
        return [list(x) if isinstance(x, (list, tuple)) else x for x in ids]  # engine.validate rejects the rest
