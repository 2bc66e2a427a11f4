"""Turns the logits of one step into tokens: penalties, logit bias, greedy, temperature, top-k, top-p,
seeds, logprobs.

The logits are first adjusted per request: OpenAI's presence and frequency
penalties over the tokens it has generated so far, then its ``logit_bias``.
Both are skipped entirely when no request in the batch uses them; their inputs
(two small arrays each) go to the device through the runner's pinned staging
buffers, non-blocking, so they add no sync. Their host work grows with the
tokens the penalised requests have generated: counts are rebuilt each step.
Greedy takes the argmax of the adjusted logits. Random sampling uses the
exponential-race form of a categorical draw (``argmax(p / q)`` with
``q ~ Exp(1)``), with ``q`` drawn from the request's own generator when it has
a seed. A seeded request therefore gets the same tokens whatever else shares
its batch. Logprobs are taken from the adjusted logits, before temperature and
truncation (see ``SamplingParams``).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.sampling import SamplingParams
from engine.request import TokenLogprobs


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
                       ) -> torch.Tensor:
    """Mask everything outside each row's top-k and top-p sets with -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
        remove |= ranks >= top_k[:, None]
    if top_p is not None:
        probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
        remove |= (before >= top_p[:, None]) & (top_p[:, None] < 1.0)  # rounding must not trim top_p=1 rows
    remove[:, 0] = False  # the most likely token always survives
    return logits.scatter(-1, order, sorted_logits.masked_fill(remove, float("-inf")))


ToDevice = Callable[[str, np.ndarray], torch.Tensor]
"""Copies a host array to the device under a name (the runner's pinned staging buffers)."""


def _penalize(logits: torch.Tensor, params: list[SamplingParams], output_token_ids: Sequence[Sequence[int]],
              to_device: ToDevice) -> torch.Tensor:
    """``logits - (frequency_penalty * count + presence_penalty * (count > 0))`` for the rows that have them."""
    rows = [i for i, p in enumerate(params) if p.has_penalties and output_token_ids[i]]
    if not rows:
        return logits
    lengths = [len(output_token_ids[i]) for i in rows]
    num_rows, num_ids = len(rows), sum(lengths)
    ints = np.empty(num_rows + 2 * num_ids, dtype=np.int64)  # penalised rows, then each id's row and the id
    ints[:num_rows] = rows
    ints[num_rows:num_rows + num_ids] = np.repeat(np.arange(num_rows), lengths)
    ints[num_rows + num_ids:] = np.fromiter(itertools.chain.from_iterable(output_token_ids[i] for i in rows),
                                            dtype=np.int64, count=num_ids)
    floats = np.array([[params[i].frequency_penalty for i in rows], [params[i].presence_penalty for i in rows]],
                      dtype=np.float32)
    ints_dev, floats_dev = to_device("penalty_ids", ints), to_device("penalty_values", floats)
    rows_dev, id_rows, ids = ints_dev[:num_rows], ints_dev[num_rows:num_rows + num_ids], ints_dev[num_rows + num_ids:]
    counts = torch.zeros(num_rows, logits.shape[-1], dtype=logits.dtype, device=logits.device)
    counts.index_put_((id_rows, ids), torch.ones(num_ids, dtype=logits.dtype, device=logits.device), accumulate=True)
    seen = counts > 0  # the penalty is built in the counts' buffer: [rows, vocab] is large at 128k tokens
    counts.mul_(floats_dev[0, :, None]).add_(seen * floats_dev[1, :, None])
    return logits.index_add(0, rows_dev, counts, alpha=-1)


class _LogitBiasArrays:
    """Each request's ``logit_bias`` as NumPy arrays, built once rather than every step (300 entries in
    each of 256 rows is 77k Python tuples). A request keeps one SamplingParams for life, so entries are
    found by identity; an entry holds its params, so their id cannot be reused while it is cached."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[int, tuple[SamplingParams, np.ndarray, np.ndarray]] = OrderedDict()

    def get(self, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
        entry = self._entries.get(id(params))
        if entry is None or entry[0] is not params:
            ids = np.array([t for t, _ in params.logit_bias], dtype=np.int64)
            biases = np.array([b for _, b in params.logit_bias], dtype=np.float32)
            entry = self._entries[id(params)] = (params, ids, biases)
            if len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        self._entries.move_to_end(id(params))
        return entry[1], entry[2]


def _add_logit_bias(logits: torch.Tensor, params: list[SamplingParams], to_device: ToDevice,
                    arrays: _LogitBiasArrays) -> torch.Tensor:
    rows = [i for i, p in enumerate(params) if p.logit_bias]
    if not rows:
        return logits
    per_row = [arrays.get(params[i]) for i in rows]
    ints = np.stack([np.repeat(rows, [len(ids) for ids, _ in per_row]), np.concatenate([ids for ids, _ in per_row])])
    ints_dev = to_device("bias_ids", ints)
    values = to_device("bias_values", np.concatenate([biases for _, biases in per_row]))
    return logits.index_put((ints_dev[0], ints_dev[1]), values, accumulate=True)


class Sampler:
    def __init__(self, seed: int, device: torch.device, to_device: ToDevice | None = None) -> None:
        # draws for random requests without a seed of their own
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.to_device = to_device or (lambda _name, array: torch.from_numpy(array).to(device))
        self._logit_bias = _LogitBiasArrays()

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None],
                 output_token_ids: Sequence[Sequence[int]] | None = None) -> SamplerOutput:
        """Called by the runner once per step; ``output_token_ids[i]``: the tokens row i's request has
        generated so far (what its penalties count; None: nothing generated yet, in every row)."""
        logits = logits.float()
        if output_token_ids is not None:
            logits = _penalize(logits, params, output_token_ids, self.to_device)
        logits = _add_logit_bias(logits, params, self.to_device, self._logit_bias)
        num_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        greedy = [p.greedy for p in params]
        tokens = logits.argmax(dim=-1)
        if not all(greedy):
            tokens = torch.where(torch.tensor(greedy, device=logits.device), tokens,
                                 self._sample(logits, params, generators))
        if num_logprobs is None:
            return SamplerOutput(tokens.tolist(), [None] * len(params))
        logprobs = logits.log_softmax(dim=-1)
        chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
        top_vals, top_ids = logprobs.topk(max(num_logprobs, 1), dim=-1)
        token_list, chosen_list = tokens.tolist(), chosen.tolist()
        top_vals_list, top_ids_list = top_vals.tolist(), top_ids.tolist()
        out: list[TokenLogprobs | None] = []
        for i, p in enumerate(params):
            if p.logprobs is None:
                out.append(None)
                continue
            n = p.logprobs
            out.append(TokenLogprobs(token_list[i], chosen_list[i], top_ids_list[i][:n], top_vals_list[i][:n]))
        return SamplerOutput(token_list, out)

    def _sample(self, logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> torch.Tensor:
        device = logits.device
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=device)
        logits = logits / temps[:, None]
        vocab = logits.shape[-1]
        top_k = top_p = None
        if any(0 < p.top_k < vocab for p in params):
            top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], device=device)
        if top_k is not None or top_p is not None:
            logits = _apply_top_k_top_p(logits, top_k, top_p)
        probs = logits.softmax(dim=-1)
        q = torch.empty_like(probs)
        if all(g is None for g in generators):
            q.exponential_(generator=self.generator)
        else:
            for i, g in enumerate(generators):
                q[i].exponential_(generator=g or self.generator)
        return (probs / q).argmax(dim=-1)
