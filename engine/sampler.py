"""Turns the logits of one step into tokens: greedy, temperature, top-k, top-p, seeds, logprobs.

Random sampling uses the exponential-race form of a categorical draw
(``argmax(p / q)`` with ``q ~ Exp(1)``), with ``q`` drawn from the request's own
generator when it has a seed. A seeded request therefore gets the same tokens
whatever else shares its batch. Logprobs are taken from the model's raw
distribution, before temperature and truncation.
"""

from __future__ import annotations

from dataclasses import dataclass

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


class Sampler:
    def __init__(self, seed: int, device: torch.device) -> None:
        # draws for random requests without a seed of their own
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> SamplerOutput:
        logits = logits.float()
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
