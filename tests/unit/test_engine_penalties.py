"""OpenAI's presence/frequency penalties and logit_bias through the engine, against ``transformers``.

The reference is ``transformers``' own greedy ``generate`` with a LogitsProcessor implementing the
documented formula (``tests.hf_reference.OpenAIPenalties``): tokens must be identical in fp32, in one
batch that mixes requests with and without penalties, under chunked prefill and preemption, and when
the first token comes from a prefill engine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import InvalidRequestError
from engine import LLM, EngineCore, RequestMode, RequestOutput, SamplingParams
from tests.hf_reference import OpenAIPenalties, hf_generate_greedy, hf_greedy, load_hf, random_prompts

VOCAB = 512
NEW_TOKENS = 40
# (presence, frequency, logit_bias) per request of one batch; rows of zeros use none of them
SETTINGS: list[tuple[float, float, dict[int, float]]] = [
    (0.0, 0.0, {}),
    (0.0, 1.5, {}),
    (2.0, 0.0, {}),
    (0.0, 0.0, {}),
    (0.7, 0.4, {7: 4.0, 100: -100.0}),
    (-1.0, -0.5, {}),
    (0.0, 0.0, {3: 6.5, 250: 3.0}),
    (1.0, 2.0, {}),
]
LENGTHS = [5, 17, 33, 1, 48, 9, 26, 12]


def finished_output(core: EngineCore) -> RequestOutput:
    """Step until the core's one request finishes."""
    while core.has_unfinished():
        for out in core.step():
            if out.finished:
                return out
    raise AssertionError("nothing finished")


def params(presence: float, frequency: float, bias: dict[int, float], max_tokens: int = NEW_TOKENS
           ) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=3,
                          presence_penalty=presence, frequency_penalty=frequency, logit_bias=bias)


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> Path:
    return tiny_model_factory("llama_gqa")


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(LENGTHS, VOCAB, seed=41)


@pytest.fixture(scope="module")
def reference(model_dir, prompts):
    hf = load_hf(model_dir)
    return [hf_generate_greedy(hf, p, NEW_TOKENS, OpenAIPenalties(len(p), *s)) for p, s in zip(prompts, SETTINGS)]


def test_every_setting_changes_the_reference(model_dir, prompts, reference) -> None:
    """Guards the test below against passing vacuously: each setting moves transformers' greedy tokens."""
    hf = load_hf(model_dir)
    for p, s, (tokens, _) in zip(prompts, SETTINGS, reference):
        assert (tokens != hf_greedy(hf, p, NEW_TOKENS)[0]) == any((s[0], s[1], s[2])), s


@pytest.mark.parametrize("options", [
    {},
    {"block_size": 4, "max_num_batched_tokens": 13},  # chunked prefill next to decodes
    {"block_size": 4, "num_blocks": 40},  # preemption: a recomputed request keeps its counts
], ids=["batch", "chunked", "preempted"])
def test_greedy_tokens_match_transformers(model_dir, prompts, reference, options) -> None:
    llm = LLM(model_dir, dtype="float32", **options)
    outputs = llm.generate(prompt_token_ids=prompts, sampling=[params(*s) for s in SETTINGS])
    for i, (out, (ref_tokens, ref_logprobs)) in enumerate(zip(outputs, reference)):
        assert out.token_ids == ref_tokens, f"request {i} {SETTINGS[i]}"
        # logprobs are of the penalised, biased distribution (what transformers' processed scores give)
        for pos, (lp, ref) in enumerate(zip(out.logprobs, ref_logprobs)):
            assert abs(lp.logprob - float(ref[lp.token_id])) < 1e-3, (i, pos)
            assert lp.top_ids[0] == lp.token_id == int(ref.argmax())
    if "num_blocks" in options:
        assert llm.engine.scheduler.stats.num_preemptions > 0
    llm.engine.assert_no_leaks()


def test_banned_and_forced_tokens(model_dir, prompts, reference) -> None:
    llm = LLM(model_dir, dtype="float32")
    plain = reference[0][0]
    banned = llm.generate(prompt_token_ids=prompts[0], sampling=params(0.0, 0.0, {t: -100 for t in set(plain)}))
    assert not set(banned[0].token_ids) & set(plain)
    forced = llm.generate(prompt_token_ids=prompts[0], sampling=params(0.0, 0.0, {42: 100}))
    assert forced[0].token_ids == [42] * NEW_TOKENS


def test_frequency_penalty_makes_greedy_output_repeat_less(model_dir, prompts) -> None:
    """A random tiny model falls into loops under greedy; a large frequency penalty breaks them."""
    llm = LLM(model_dir, dtype="float32")

    def repeats(**kwargs) -> list[int]:
        sampling = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True, **kwargs)
        return [len(o.token_ids) - len(set(o.token_ids))
                for o in llm.generate(prompt_token_ids=prompts[:3], sampling=sampling)]

    without = repeats()
    assert min(without) > 50, without
    assert all(w < 10 for w in repeats(frequency_penalty=2.0))
    assert all(w > 150 for w in repeats(frequency_penalty=-2.0))


def test_the_first_token_from_a_prefill_engine_counts(model_dir, prompts) -> None:
    """Disaggregated: the prefill engine samples the first token (logit_bias applies, nothing to penalise
    yet); the decode engine penalises it like its own tokens, so the output equals a colocated run."""
    prompt = prompts[1]
    sampling = params(0.5, 1.0, {9: 3.0}, max_tokens=20)
    colocated = LLM(model_dir, dtype="float32").generate(prompt_token_ids=prompt, sampling=sampling)[0]

    def core() -> EngineCore:
        return LLM(model_dir, dtype="float32", block_size=8, num_blocks=64).engine

    prefill, decode = core(), core()
    prefill.add_request("r", prompt, sampling, mode=RequestMode.PREFILL_ONLY)
    first = finished_output(prefill)
    decode.add_request("r", prompt, sampling, mode=RequestMode.REMOTE_KV)
    decode.step()
    (reservation,) = decode.take_reservations()
    for src, dst in zip(prefill.runner.kv_caches, decode.runner.kv_caches):
        dst[:, reservation.block_ids] = src[:, prefill.block_ids("r")]
    decode.finish_remote_kv("r", first.token_ids[0], first.logprobs[0])
    assert finished_output(decode).token_ids == colocated.token_ids
    assert prefill.release("r")
    prefill.assert_no_leaks()
    decode.assert_no_leaks()


def test_logit_bias_outside_the_vocabulary_is_refused(model_dir) -> None:
    core = LLM(model_dir, dtype="float32").engine
    with pytest.raises(InvalidRequestError) as err:
        core.add_request("r", [1, 2], params(0.0, 0.0, {VOCAB: 1.0}))
    assert err.value.field == "logit_bias"
    core.add_request("r", [1, 2], params(0.0, 0.0, {VOCAB - 1: 1.0}))
