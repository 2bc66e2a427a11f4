"""Output-length prediction: how many tokens a request will generate, before it runs.

The router asks ``predict`` once per request (to size the request's KV lifetime on a decode
instance, :attr:`RoutingRequest.predicted_output_tokens`) and calls ``observe`` once the request
finishes with the number of tokens it generated. Predictors are plain objects behind the
:class:`LengthPredictor` protocol; none does I/O and all use bounded memory, so the router and the
simulator hold one each and a Redis-sharing router can snapshot one.

:class:`PrefixHistoryPredictor` (the default) bets on repetition in production traffic: turns of one
conversation, agents re-sending the same document, templated jobs. It remembers recent output
lengths per *prompt prefix*, keyed by the chained hash of a full prompt block (which identifies the
whole prefix up to that block), and predicts from the deepest prefix of the new prompt it has seen.
To stay bounded it stores keys only at depths 1, 2, 4, 8, ... blocks and at the prompt's last full
block (a conversation's next turn contains the previous turn's last block), in an LRU of at most
``max_keys`` keys. A key that many requests share (a system prompt) says little about any one of
them and is skipped. Without a usable prefix it falls back to a session key, then to the quantile
of recent lengths among prompts of similar length (quarter-octave buckets; production traffic is
templated, so this is far from a constant), then to the global quantile.

Baselines: :class:`MedianPredictor` (the running global median) and
:class:`PromptLengthRegression` (log-linear least squares on the prompt length).
``benchmarks/length_predictor.py`` replays real traces through all three.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol

from common.errors import ConfigError

DEFAULT_TOKENS = 256  # before anything has been observed


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    """What is known about a request when it arrives."""

    num_prompt_tokens: int
    block_hashes: tuple[int, ...] = ()
    """Chained hashes of the prompt's full blocks (common.block_hash), as in RoutingRequest."""
    prefix_key: str | None = None
    """A session or conversation key, when the client sends one."""
    max_tokens: int | None = None
    """The request's cap; predictions never exceed it."""


class LengthPredictor(Protocol):
    def predict(self, features: RequestFeatures) -> int:
        """Predicted number of output tokens (>= 1). Called by the router before routing."""
        ...

    def observe(self, features: RequestFeatures, num_output_tokens: int) -> None:
        """Learn from a finished request. Called by the router when the request ends."""
        ...


def _cap(tokens: float, features: RequestFeatures) -> int:
    out = max(1, int(round(tokens)))
    return min(out, features.max_tokens) if features.max_tokens else out


class _RecentQuantile:
    """A quantile of the last ``window`` values, recomputed only when asked after a change."""

    __slots__ = ("_values", "_q", "_cached")

    def __init__(self, window: int, q: float) -> None:
        self._values: deque[int] = deque(maxlen=window)
        self._q = q
        self._cached: float | None = None

    def __len__(self) -> int:
        return len(self._values)

    def add(self, value: int) -> None:
        self._values.append(value)
        self._cached = None

    def value(self) -> float:
        if self._cached is None:
            ordered = sorted(self._values)
            self._cached = float(ordered[int(self._q * (len(ordered) - 1))])
        return self._cached


class MedianPredictor:
    """Baseline: the median of the last ``window`` observed lengths, whatever the request."""

    def __init__(self, *, window: int = 4096, default_tokens: int = DEFAULT_TOKENS) -> None:
        self._recent = _RecentQuantile(window, 0.5)
        self._default = default_tokens

    def predict(self, features: RequestFeatures) -> int:
        return _cap(self._recent.value() if len(self._recent) else self._default, features)

    def observe(self, features: RequestFeatures, num_output_tokens: int) -> None:
        self._recent.add(num_output_tokens)


class PromptLengthRegression:
    """Baseline: least squares of log(1 + output) on log(1 + prompt), from running sums (O(1) memory).

    Predictions are clipped to the longest output seen (an early fit extrapolates wildly).
    """

    def __init__(self, *, default_tokens: int = DEFAULT_TOKENS) -> None:
        self._n = 0
        self._sx = self._sy = self._sxx = self._sxy = 0.0
        self._max = 1
        self._default = default_tokens

    def predict(self, features: RequestFeatures) -> int:
        if self._n < 2:
            return _cap(self._default, features)
        x = math.log1p(features.num_prompt_tokens)
        var = self._sxx - self._sx * self._sx / self._n
        slope = (self._sxy - self._sx * self._sy / self._n) / var if var > 1e-12 else 0.0
        intercept = (self._sy - slope * self._sx) / self._n
        return _cap(min(self._max, math.expm1(intercept + slope * x)), features)

    def observe(self, features: RequestFeatures, num_output_tokens: int) -> None:
        x, y = math.log1p(features.num_prompt_tokens), math.log1p(num_output_tokens)
        self._n += 1
        self._max = max(self._max, num_output_tokens)
        self._sx += x
        self._sy += y
        self._sxx += x * x
        self._sxy += x * y


class _KeyHistory:
    __slots__ = ("lengths", "uses")

    def __init__(self, window: int) -> None:
        self.lengths: deque[int] = deque(maxlen=window)
        self.uses = 0


class PrefixHistoryPredictor:
    """The default predictor: per-prefix history, then session, then prompt-length-bucket quantiles."""

    def __init__(self, *, max_keys: int = 65_536, window: int = 8, max_key_uses: int = 64,
                 quantile: float = 0.5, buckets_per_octave: int = 4, bucket_window: int = 512,
                 bucket_min_samples: int = 16, global_window: int = 4096,
                 max_probe_blocks: int = 1024, default_tokens: int = DEFAULT_TOKENS) -> None:
        for name, value in (("max_keys", max_keys), ("window", window), ("buckets_per_octave", buckets_per_octave),
                            ("bucket_window", bucket_window), ("global_window", global_window)):
            if value < 1:
                raise ConfigError(f"must be >= 1, got {value}", field=name)
        if not 0 <= quantile <= 1:
            raise ConfigError(f"must be in [0, 1], got {quantile}", field="quantile")
        self.max_keys = max_keys
        self.window = window
        self.max_key_uses = max_key_uses
        self.quantile = quantile
        self.buckets_per_octave = buckets_per_octave
        self.bucket_window = bucket_window
        self.bucket_min_samples = bucket_min_samples
        self.max_probe_blocks = max_probe_blocks
        self.default_tokens = default_tokens
        self._keys: OrderedDict[int | str, _KeyHistory] = OrderedDict()
        self._buckets: dict[int, _RecentQuantile] = {}
        self._global = _RecentQuantile(global_window, quantile)
        self.num_prefix_hits = 0
        self.num_session_hits = 0
        self.num_fallbacks = 0

    # --- prediction ----------------------------------------------------------------------------

    def predict(self, features: RequestFeatures) -> int:
        history = self._prefix_history(features.block_hashes)
        if history is not None:
            self.num_prefix_hits += 1
            return _cap(self._quantile(history.lengths), features)
        if features.prefix_key is not None:
            entry = self._keys.get(features.prefix_key)
            if entry is not None and entry.lengths:
                self.num_session_hits += 1
                return _cap(self._quantile(entry.lengths), features)
        self.num_fallbacks += 1
        return _cap(self._fallback(features.num_prompt_tokens), features)

    def _prefix_history(self, block_hashes: tuple[int, ...]) -> _KeyHistory | None:
        """History of the deepest stored prefix of the prompt, unless that prefix is generic.

        Probes every depth among the deepest ``max_probe_blocks`` (where an earlier turn's last
        block lies), then only the geometric depths below (the only ones stored that deep).
        """
        keys = self._keys
        lowest = max(0, len(block_hashes) - self.max_probe_blocks)
        shallow = [d for d in self._depths(lowest) if d < lowest]
        for depth in itertools.chain(range(len(block_hashes) - 1, lowest - 1, -1), reversed(shallow)):
            entry = keys.get(block_hashes[depth])
            if entry is not None:
                if entry.uses > self.max_key_uses:
                    return None  # shallower keys are shared at least as widely
                return entry
        return None

    def _quantile(self, values: deque[int]) -> float:
        ordered = sorted(values)
        return float(ordered[int(self.quantile * (len(ordered) - 1))])

    def _bucket(self, num_prompt_tokens: int) -> int:
        return int(math.log2(max(1, num_prompt_tokens)) * self.buckets_per_octave)

    def _fallback(self, num_prompt_tokens: int) -> float:
        bucket = self._buckets.get(self._bucket(num_prompt_tokens))
        if bucket is not None and len(bucket) >= self.bucket_min_samples:
            return bucket.value()
        return self._global.value() if len(self._global) else self.default_tokens

    # --- learning ------------------------------------------------------------------------------

    def observe(self, features: RequestFeatures, num_output_tokens: int) -> None:
        for key in self._keys_to_store(features):
            entry = self._keys.get(key)
            if entry is None:
                entry = self._keys[key] = _KeyHistory(self.window)
                if len(self._keys) > self.max_keys:
                    self._keys.popitem(last=False)
            else:
                self._keys.move_to_end(key)
            entry.lengths.append(num_output_tokens)
            entry.uses += 1
        index = self._bucket(features.num_prompt_tokens)
        bucket = self._buckets.get(index)
        if bucket is None:
            bucket = self._buckets[index] = _RecentQuantile(self.bucket_window, self.quantile)
        bucket.add(num_output_tokens)
        self._global.add(num_output_tokens)

    @staticmethod
    def _depths(num_blocks: int) -> list[int]:
        depths, d = [], 1
        while d <= num_blocks:
            depths.append(d - 1)
            d *= 2
        if num_blocks and depths[-1] != num_blocks - 1:
            depths.append(num_blocks - 1)
        return depths

    def _keys_to_store(self, features: RequestFeatures) -> list[int | str]:
        hashes = features.block_hashes
        keys: list[int | str] = [hashes[d] for d in self._depths(len(hashes))]
        if features.prefix_key is not None:
            keys.append(features.prefix_key)
        return keys

    def __len__(self) -> int:
        """Keys held (bounded by ``max_keys``)."""
        return len(self._keys)


def make_predictor(name: str) -> LengthPredictor:
    """A predictor by name: ``prefix_history`` (default), ``median`` or ``prompt_regression``."""
    factories = {"prefix_history": PrefixHistoryPredictor, "median": MedianPredictor,
                 "prompt_regression": PromptLengthRegression}
    if name not in factories:
        raise ConfigError(f"unknown length predictor {name!r}; choose from {sorted(factories)}",
                          field="length_predictor")
    return factories[name]()
