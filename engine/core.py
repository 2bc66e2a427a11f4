"""``EngineCore``: one model replica, driven one step at a time.

It validates and admits requests (``add_request``), runs ``step()`` =
schedule → execute → update → outputs, and ends requests from outside a step
(``abort``, ``release``). The same core serves every role:

* colocated: ``add_request(...)`` and step until finished;
* prefill: ``add_request(..., mode=RequestMode.PREFILL_ONLY)``; the step that
  samples the first token finishes it with reason ``prefilled`` while its
  blocks stay allocated (``block_ids``) until ``release``;
* decode: ``add_request(..., mode=RequestMode.REMOTE_KV)``; a step reserves its
  blocks (``take_reservations``), a KV consumer fills them, then
  ``finish_remote_kv`` (KV and first token arrived) or ``fail_remote_kv``
  (compute the prompt here instead).

Not thread-safe: one thread owns a core (the worker's engine loop).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from common.batch_policy import make_batch_policy
from common.config import EngineConfig
from common.errors import InvalidRequestError
from common.sampling import SamplingParams
from common.tokenizer import Tokenizer
from engine.kv_cache_manager import KVCacheManager
from engine.models import load_model_config, resolve_dtype
from engine.output import OutputProcessor, RequestOutput
from engine.request import Request, RequestMode, RequestStatus, TokenLogprobs
from engine.runner import ModelRunner
from engine.scheduler import KVReservation, ScheduledRequest, Scheduler

logger = logging.getLogger(__name__)


class KVStepHooks(Protocol):
    """Engine-thread callbacks of a KV producer (the prefill side streams KV as layers finish)."""

    def begin_step(self, scheduled: list[ScheduledRequest]) -> bool:
        """Called before the forward pass; True if ``layer_done`` should be called this step."""
        ...

    def layer_done(self, layer: int) -> None:
        """Called after layer ``layer`` has written its KV for every scheduled token."""
        ...

    def end_step(self) -> None: ...


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What a load report says about this engine (taken on the engine thread)."""

    num_running: int
    num_waiting: int
    num_awaiting_kv: int
    num_prefilled_held: int
    num_queued_prefill_tokens: int
    num_free_blocks: int
    num_total_blocks: int
    block_size: int
    recent_step_times_s: tuple[float, ...]
    num_prefix_cache_queries: int
    num_prefix_cache_hits: int
    num_preemptions: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class EngineCore:
    def __init__(self, config: EngineConfig, *, record_kv_events: bool = False) -> None:
        self.config = config
        self.model_config = load_model_config(config.model)
        mc = self.model_config
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # Triton launches on the current device
        self.dtype = resolve_dtype(config.dtype, mc)
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        has_tokenizer = (Path(config.model) / "tokenizer.json").is_file()
        self.tokenizer = Tokenizer.from_dir(config.model) if has_tokenizer else None
        eos = set(mc.eos_token_ids)
        if self.tokenizer is not None:
            eos |= self.tokenizer.eos_token_ids
        self.eos_token_ids = frozenset(eos)
        self.runner = ModelRunner(config, mc, device=self.device, dtype=self.dtype,
                                  max_model_len=self.max_model_len)
        num_blocks = self.runner.plan_num_blocks()
        self.runner.allocate_kv_cache(num_blocks)
        self.runner.capture_graphs()
        self.kv = KVCacheManager(num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching,
                                 record_events=record_kv_events)
        self.scheduler = Scheduler(config, self.kv, make_batch_policy(config.batch_policy))
        self.outputs = OutputProcessor(self.tokenizer)
        self._reservations: list[KVReservation] = []
        self._finished_outside_step: list[RequestOutput] = []
        self.kv_hooks: KVStepHooks | None = None

    # --- intake ---------------------------------------------------------------------------------

    def validate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        """Raise :class:`InvalidRequestError` naming the field if the request cannot be served."""
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("must be a non-empty string", field="request_id")
        if request_id in self.scheduler.requests:
            raise InvalidRequestError(f"request {request_id!r} already exists", field="request_id")
        if not isinstance(sampling, SamplingParams):
            raise InvalidRequestError("must be a SamplingParams", field="sampling")
        if not isinstance(prompt_token_ids, list) or not prompt_token_ids:
            raise InvalidRequestError("must be a non-empty list of token ids", field="prompt")
        vocab = self.model_config.vocab_size
        for t in prompt_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise InvalidRequestError(f"token id {t!r} is outside the vocabulary [0, {vocab})",
                                          field="prompt")
        n = len(prompt_token_ids)
        if n >= self.max_model_len:
            raise InvalidRequestError(f"the prompt has {n} tokens; this model's context is "
                                      f"{self.max_model_len} tokens", field="prompt")
        if n + sampling.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({n} tokens) + max_tokens ({sampling.max_tokens}) exceeds the context of "
                f"{self.max_model_len} tokens", field="max_tokens")
        if self.kv.blocks_needed(n + sampling.max_tokens - 1) > self.kv.num_blocks:  # the last token needs no KV
            raise InvalidRequestError(
                f"prompt + max_tokens needs more KV blocks than this engine has ({self.kv.num_blocks})",
                field="max_tokens")
        sampling.check_vocabulary(vocab)
        if sampling.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer in the model directory", field="stop")

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, *,
                    mode: RequestMode = RequestMode.COLOCATED, arrival_time: float | None = None,
                    predicted_output_tokens: int = 0) -> None:
        self.validate(request_id, prompt_token_ids, sampling)
        generator = None
        if sampling.seed is not None and not sampling.greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(sampling.seed)
        request = Request(request_id, list(prompt_token_ids), sampling, self.eos_token_ids, self.max_model_len,
                          mode=mode, generator=generator, predicted_output_tokens=max(0, predicted_output_tokens))
        if arrival_time is not None:
            request.arrival_time = arrival_time
        self.outputs.add(request)
        self.scheduler.add_request(request)

    # --- ends from outside a step ---------------------------------------------------------------

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request in any state and free its blocks; its final output comes from the next step.

        A REMOTE_KV request's blocks are free the moment this returns: the caller
        must have stopped its KV transfer (no more writes into them) first.
        """
        request = self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        if request is None:
            return None
        # its reserved blocks are free again: a transfer must not be started into them
        self._reservations = [r for r in self._reservations if r.request_id != request_id]
        output = self.outputs.finish(request)
        self._finished_outside_step.append(output)
        return output

    def release(self, request_id: str) -> bool:
        """Free the blocks a prefilled (PREFILL_ONLY) request holds. False if there was none."""
        request = self.scheduler.prefilled.get(request_id)
        if request is None:
            return False
        self.scheduler.finish_request(request_id, RequestStatus.FINISHED_STOPPED)
        return True

    def block_ids(self, request_id: str) -> list[int]:
        return self.kv.block_ids(request_id)

    # --- remote KV (decode role) ----------------------------------------------------------------

    def take_reservations(self) -> list[KVReservation]:
        """REMOTE_KV requests whose blocks were reserved since the last call: start their transfers."""
        out, self._reservations = self._reservations, []
        return out

    def finish_remote_kv(self, request_id: str, first_token_id: int,
                         logprobs: TokenLogprobs | None = None) -> RequestOutput:
        request = self.scheduler.finish_remote_kv(request_id, first_token_id, logprobs)
        output, stopped = self.outputs.process(request)
        if stopped:
            self.scheduler.finish_request(request_id, RequestStatus.FINISHED_STOPPED)
        return output

    def fail_remote_kv(self, request_id: str) -> None:
        self.scheduler.fail_remote_kv(request_id)

    # --- the step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs, self._finished_outside_step = self._finished_outside_step, []
        sched = self.scheduler.schedule()
        self._reservations.extend(sched.reserved)
        if sched.empty:
            return outputs
        hooks = self.kv_hooks
        on_layer_done = hooks.layer_done if hooks is not None and hooks.begin_step(sched.scheduled) else None
        start = time.perf_counter()
        try:
            result = self.runner.execute(sched, on_layer_done)
        finally:
            if hooks is not None:
                hooks.end_step()
        self.scheduler.record_step_time(time.perf_counter() - start)
        for request in self.scheduler.update(sched, result):
            output, stopped = self.outputs.process(request)
            if stopped:
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
            outputs.append(output)
        return outputs

    # --- introspection --------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self._finished_outside_step)

    def has_pending_outputs(self) -> bool:
        return bool(self._finished_outside_step)

    def peek_cached_tokens(self, prompt_token_ids: list[int]) -> int:
        """Prompt tokens this engine's prefix cache holds now (no side effects)."""
        probe = Request("probe", list(prompt_token_ids), SamplingParams(), self.eos_token_ids, self.max_model_len)
        return self.kv.find_cached_prefix(probe)[1]

    def load(self) -> EngineLoad:
        sched = self.scheduler
        queued = sum(r.num_tokens - r.num_computed_tokens for r in sched.waiting)
        queued += sum(r.num_tokens - r.num_computed_tokens for r in sched.running
                      if r.num_tokens - r.num_computed_tokens > 1)
        return EngineLoad(
            num_running=len(sched.running), num_waiting=len(sched.waiting),
            num_awaiting_kv=len(sched.awaiting_kv), num_prefilled_held=len(sched.prefilled),
            num_queued_prefill_tokens=queued, num_free_blocks=self.kv.num_free_blocks,
            num_total_blocks=self.kv.num_blocks, block_size=self.kv.block_size,
            recent_step_times_s=sched.recent_step_times(), num_prefix_cache_queries=self.kv.stats.queries,
            num_prefix_cache_hits=self.kv.stats.hits, num_preemptions=sched.stats.num_preemptions)

    def leaks(self) -> dict[str, list]:
        """Anything not returned: referenced blocks and live requests. Empty lists when clean."""
        return {"blocks": self.kv.pool.leaks(), "requests": list(self.scheduler.requests),
                "block_owners": self.kv.owners()}

    def assert_no_leaks(self) -> None:
        leaks = self.leaks()
        if any(leaks.values()):
            raise AssertionError(f"engine leaked: {leaks}")
