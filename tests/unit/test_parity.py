"""Greedy generation and logprobs match Hugging Face transformers exactly, in every scheduling regime."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.conftest import TINY_MODELS
from tests.hf_reference import hf_greedy, load_hf, random_prompts

NEW_TOKENS = 32
LENGTHS = [1, 5, 17, 33, 64, 100, 150, 7, 48]
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=5)


def _reference(model_dir, prompts):
    hf = load_hf(model_dir)
    return [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]


def _check(outputs, reference):
    for i, (out, (ref_tokens, ref_logprobs)) in enumerate(zip(outputs, reference)):
        assert out.token_ids == ref_tokens, f"prompt {i}: tokens differ"
        assert out.finish_reason == "length"
        assert len(out.logprobs) == NEW_TOKENS
        for pos, (lp, ref) in enumerate(zip(out.logprobs, ref_logprobs)):
            assert len(lp.top_ids) == 5
            assert abs(lp.logprob - float(ref[lp.token_id])) < 1e-3, (i, pos)
            for tid, val in zip(lp.top_ids, lp.top_logprobs):
                assert abs(val - float(ref[tid])) < 1e-3, (i, pos, tid)
            assert set(lp.top_ids[:1]) == {int(ref.argmax())}


@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_greedy_parity_batch(tiny_model_factory, kind):
    model_dir = tiny_model_factory(kind)
    prompts = random_prompts(LENGTHS, 512, seed=1)
    llm = LLM(model_dir, dtype="float32", block_size=8)
    outputs = llm.generate(prompt_token_ids=prompts, sampling=GREEDY)
    _check(outputs, _reference(model_dir, prompts))
    llm.engine.assert_no_leaks()


def test_sharded_checkpoint(tiny_model_factory):
    model_dir = tiny_model_factory("qwen3", max_shard_size="40KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    prompts = random_prompts([9, 30], 512, seed=2)
    llm = LLM(model_dir, dtype="float32")
    _check(llm.generate(prompt_token_ids=prompts, sampling=GREEDY), _reference(model_dir, prompts))


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2", "mistral_window"])
def test_chunked_prefill(tiny_model_factory, kind):
    """A token budget smaller than the prompts: prompts are computed in chunks across steps."""
    model_dir = tiny_model_factory(kind)
    prompts = random_prompts(LENGTHS, 512, seed=3)
    llm = LLM(model_dir, dtype="float32", block_size=4, max_num_batched_tokens=13)
    outputs = llm.generate(prompt_token_ids=prompts, sampling=GREEDY)
    _check(outputs, _reference(model_dir, prompts))
    llm.engine.assert_no_leaks()


def test_prefix_cache_hits(tiny_model_factory):
    """Shared prefixes, submitted together and one after another, hit the cache and change nothing."""
    model_dir = tiny_model_factory("qwen3")
    shared = random_prompts([70], 512, seed=4)[0]
    tails = random_prompts([1, 9, 23, 2, 40, 16, 5, 30], 512, seed=5)
    prompts = [shared + t for t in tails]
    reference = _reference(model_dir, prompts)
    llm = LLM(model_dir, dtype="float32", block_size=8, max_num_batched_tokens=64)
    # together: the first request's prefix blocks are cached while later ones wait for budget
    _check(llm.generate(prompt_token_ids=prompts, sampling=GREEDY), reference)
    stats = llm.engine.kv.stats
    assert stats.hits > 0
    hits_together = stats.hits
    # one after another: every request finds the shared prefix (and its own earlier run) cached
    for prompt, ref in zip(prompts, reference):
        _check(llm.generate(prompt_token_ids=[prompt], sampling=GREEDY), [ref])
    assert stats.hits - hits_together >= len(prompts) * (len(shared) // 8) * 8
    llm.engine.assert_no_leaks()


def test_preemption(tiny_model_factory):
    """A KV pool too small for every request at once forces preemption by recompute."""
    model_dir = tiny_model_factory("llama_gqa")
    prompts = random_prompts([40, 33, 50, 21, 60, 45, 38, 29], 512, seed=6)
    # each request needs up to ceil((60 + 32) / 4) = 23 blocks; the pool holds 40
    llm = LLM(model_dir, dtype="float32", block_size=4, num_blocks=40, max_num_batched_tokens=64)
    outputs = llm.generate(prompt_token_ids=prompts, sampling=GREEDY)
    _check(outputs, _reference(model_dir, prompts))
    assert llm.engine.scheduler.stats.num_preemptions > 0
    llm.engine.assert_no_leaks()


def test_preemption_without_prefix_cache(tiny_model_factory):
    model_dir = tiny_model_factory("llama_mha_tied")
    prompts = random_prompts([40, 33, 50, 21, 60, 45, 38, 29], 512, seed=7)
    llm = LLM(model_dir, dtype="float32", block_size=4, num_blocks=40, enable_prefix_caching=False)
    outputs = llm.generate(prompt_token_ids=prompts, sampling=GREEDY)
    _check(outputs, _reference(model_dir, prompts))
    assert llm.engine.scheduler.stats.num_preemptions > 0
    llm.engine.assert_no_leaks()
