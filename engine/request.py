"""A request's life inside one engine: its tokens, its progress and its lifecycle.

Progress is counted one way only: ``num_computed_tokens`` catches up with
``num_tokens`` (prompt + output so far). A prompt chunk, a prefix-cache hit and
KV received from a prefill worker all just advance it; when it reaches
``num_tokens`` the step samples a new token, which makes ``num_tokens`` one
larger again.

Lifecycle (``RequestStatus``)::

    WAITING ──schedule──► RUNNING ──stop/length──► FINISHED_*      (blocks freed)
       ▲                    │  └─ mode PREFILL_ONLY, first token ─► PREFILLED (blocks held until release)
       └────preempted───────┘
    WAITING ──(mode REMOTE_KV) reserve blocks──► WAITING_FOR_KV ──KV arrived──► RUNNING
                                                       └──transfer failed──► RUNNING (computes the prompt itself)
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from common.sampling import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    WAITING_FOR_KV = 1
    RUNNING = 2
    PREFILLED = 3
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


class RequestMode(enum.IntEnum):
    COLOCATED = 0
    """Compute the prompt and generate here (the baseline and the local-prefill fallback)."""
    PREFILL_ONLY = 1
    """Compute the prompt, sample the first token, then hold the blocks until released."""
    REMOTE_KV = 2
    """Reserve blocks for the prompt; a producer fills them; then generate here."""


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.PREFILLED: "prefilled",
}


@dataclass(slots=True)
class TokenLogprobs:
    """Log-probability of a generated token and the ``n`` most likely alternatives."""

    token_id: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: frozenset[int]
    max_model_len: int
    mode: RequestMode = RequestMode.COLOCATED
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first admission; -1 until admitted
    block_hashes: list[int] = field(default_factory=list)  # of full blocks of all_token_ids
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    generator: torch.Generator | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    first_token_time: float | None = None
    predicted_output_tokens: int = 0  # the router's prediction (0: none); read by length-aware batch policies

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    def append_token(self, token_id: int, logprobs: TokenLogprobs | None = None) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()

    def check_stop(self) -> RequestStatus | None:
        """The finished status the last appended token implies, if any (stop strings aside)."""
        token = self.output_token_ids[-1]
        params = self.sampling
        if not params.ignore_eos and token in self.eos_token_ids:
            self.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
        if token in params.stop_token_ids:
            self.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= params.max_tokens or self.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
