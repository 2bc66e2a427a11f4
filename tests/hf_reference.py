"""Reference generation with Hugging Face ``transformers`` (manual greedy loop over its KV cache)."""

from __future__ import annotations

from pathlib import Path

import torch


def load_hf(model_dir: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the full log-softmax at each generated position."""
    out = model(torch.tensor([prompt]), use_cache=True)
    past, logits = out.past_key_values, out.logits[0, -1]
    tokens: list[int] = []
    logprobs: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        lp = logits.float().log_softmax(-1)
        token = int(lp.argmax())
        tokens.append(token)
        logprobs.append(lp)
        out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
    return tokens, logprobs


def random_prompts(lengths: list[int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


class OpenAIPenalties:
    """OpenAI's presence/frequency penalties and logit_bias as a ``transformers`` ``LogitsProcessor``.

    ``transformers`` has no OpenAI-style penalties (its ``repetition_penalty`` scales logits and
    counts the prompt), so this is the documented formula, for ``generate(logits_processor=...)``:
    only tokens after ``prompt_len`` count, ``logit -= frequency * count + presence * (count > 0)``,
    then ``logit_bias`` is added.
    """

    def __init__(self, prompt_len: int, presence: float = 0.0, frequency: float = 0.0,
                 logit_bias: dict[int, float] | None = None) -> None:
        self.prompt_len = prompt_len
        self.presence = presence
        self.frequency = frequency
        self.logit_bias = logit_bias or {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float().clone()  # fp32 input: float() is the caller's own tensor
        generated = input_ids[:, self.prompt_len:]
        if generated.shape[1] and (self.presence or self.frequency):
            counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
            scores = scores - (counts * self.frequency + (counts > 0) * self.presence)
        for token_id, bias in self.logit_bias.items():
            scores[:, token_id] += bias
        return scores


@torch.inference_mode()
def hf_generate_greedy(model, prompt: list[int], max_new_tokens: int, processor: OpenAIPenalties
                       ) -> tuple[list[int], list[torch.Tensor]]:
    """``transformers``' own ``generate``, greedy, with ``processor`` and no stopping at EOS: the tokens and
    the log-softmax of the processed logits at each generated position."""
    from transformers import GenerationConfig, LogitsProcessorList

    # eos_token_id=[]: None would fall back to the checkpoint's generation_config.json
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=[], pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True)
    out = model.generate(torch.tensor([prompt]), generation_config=config,
                         logits_processor=LogitsProcessorList([processor]))
    return out.sequences[0, len(prompt):].tolist(), [s[0].float().log_softmax(-1) for s in out.scores]
