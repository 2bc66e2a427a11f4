"""What a step gives back per request: new tokens, new text, and how it finished.

The :class:`OutputProcessor` keeps one incremental detokenizer and one
stop-string matcher per request. Text that could still turn out to be the
start of a stop string is held back from the stream until it cannot; a
completed stop string ends the request (the engine core frees its blocks) and
the text is cut before it, or after it with ``include_stop_str_in_output``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer
from engine.request import Request, RequestMode, RequestStatus, TokenLogprobs


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every output token so far
    new_token_ids: list[int]  # those added by this step
    text: str  # the output text so far (what was streamed)
    delta_text: str  # the text added by this step
    finished: bool
    finish_reason: str | None = None  # stop | length | abort | prefilled
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[TokenLogprobs] | None = None
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_cached_tokens: int = 0


@dataclass(slots=True)
class _State:
    detokenizer: IncrementalDetokenizer | None
    matcher: StopStringMatcher | None
    num_sent_tokens: int = 0
    text: str = ""


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _State] = {}

    def add(self, request: Request) -> None:
        detok = matcher = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                           skip_special_tokens=request.sampling.skip_special_tokens)
            if request.sampling.stop and request.mode != RequestMode.PREFILL_ONLY:  # the decode side checks
                matcher = StopStringMatcher(request.sampling.stop, request.sampling.include_stop_str_in_output)
        self._states[request.request_id] = _State(detok, matcher)

    def process(self, request: Request) -> tuple[RequestOutput, bool]:
        """The request's output delta; True when a stop string just ended it."""
        state = self._states[request.request_id]
        new_ids = request.output_token_ids[state.num_sent_tokens:]
        new_logprobs = request.logprobs[state.num_sent_tokens:] if request.sampling.logprobs is not None else []
        state.num_sent_tokens = request.num_output_tokens
        delta, stopped = "", False
        if state.detokenizer is not None:
            delta = state.detokenizer.add(new_ids)
            if state.matcher is not None:
                delta, stopped, matched = state.matcher.feed(delta)
                if stopped:
                    request.stop_reason = matched
        finished = stopped or request.status.finished or request.status == RequestStatus.PREFILLED
        if finished and not stopped:
            if state.detokenizer is not None:
                tail = state.detokenizer.flush()
                delta += state.matcher.feed(tail)[0] if state.matcher is not None and tail else tail
            if state.matcher is not None:
                delta += state.matcher.flush()
        state.text += delta
        output = RequestOutput(
            request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
            token_ids=list(request.output_token_ids), new_token_ids=new_ids, text=state.text, delta_text=delta,
            finished=finished, finish_reason="stop" if stopped else request.finish_reason,
            stop_reason=request.stop_reason,
            logprobs=request.logprobs if request.sampling.logprobs is not None else None,
            new_logprobs=list(new_logprobs), num_cached_tokens=max(request.num_cached_tokens, 0))
        if finished:
            del self._states[request.request_id]
        return output, stopped

    def finish(self, request: Request) -> RequestOutput:
        """Final output of a request ended from outside a step (an abort)."""
        state = self._states.pop(request.request_id, None)
        text = state.text if state is not None else ""
        return RequestOutput(
            request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
            token_ids=list(request.output_token_ids), new_token_ids=[], text=text, delta_text="", finished=True,
            finish_reason=request.finish_reason, stop_reason=request.stop_reason,
            logprobs=request.logprobs if request.sampling.logprobs is not None else None,
            num_cached_tokens=max(request.num_cached_tokens, 0))
