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
