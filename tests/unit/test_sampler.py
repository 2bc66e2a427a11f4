"""Sampler on hand-made logits: greedy, top-k, top-p, seeds, temperature, logprobs, penalties and logit_bias."""

from __future__ import annotations

import math

import pytest
import torch

from common.sampling import SamplingParams
from engine.sampler import Sampler

CPU = torch.device("cpu")


def sampler(seed: int = 0) -> Sampler:
    return Sampler(seed, CPU)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draw(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> list[int]:
    """``n`` independent draws from one row of logits (one batch of ``n`` identical rows)."""
    rows = logits.expand(n, -1).contiguous()
    return sampler(seed)(rows, [params] * n, [None] * n).token_ids


def counts(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double()


def chi_square(observed: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * observed.sum()
    keep = expected > 0
    assert observed[~keep].sum() == 0, "draws outside the support"
    return float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# 99.9% quantiles of chi-square: a correct sampler fails these with probability 1e-3 for a
# random seed; the seeds are fixed, so the tests are deterministic.
CHI2_999 = {4: 18.47, 5: 20.52, 7: 24.32}

SKEWED = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.05]).log()


def test_greedy_is_argmax() -> None:
    logits = torch.randn(16, 300, generator=gen(1))
    out = sampler()(logits, [SamplingParams(temperature=0.0)] * 16, [None] * 16)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 16


def test_greedy_rows_stay_greedy_in_a_mixed_batch() -> None:
    logits = torch.randn(6, 50, generator=gen(2))
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0) for i in range(6)]
    out = sampler()(logits, params, [None] * 6)
    assert [out.token_ids[i] for i in (1, 3, 5)] == logits.argmax(-1)[[1, 3, 5]].tolist()


def test_half_precision_logits() -> None:
    logits = torch.randn(4, 64, generator=gen(3)).to(torch.bfloat16)
    out = sampler()(logits, [SamplingParams(temperature=0.0, logprobs=2)] * 4, [None] * 4)
    assert out.token_ids == logits.float().argmax(-1).tolist()
    assert all(lp is not None and lp.logprob <= 0 for lp in out.logprobs)


@pytest.mark.parametrize("params", [SamplingParams(top_k=1), SamplingParams(top_p=1e-6),
                                    SamplingParams(top_k=1, temperature=5.0),
                                    SamplingParams(top_p=1e-6, temperature=0.01, seed=3)])
def test_top_k_one_and_tiny_top_p_are_greedy(params: SamplingParams) -> None:
    logits = torch.randn(64, 200, generator=gen(4))
    generators = [gen(i) for i in range(64)] if params.seed is not None else [None] * 64
    assert sampler(5)(logits, [params] * 64, generators).token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("params, allowed", [
    (SamplingParams(top_k=3), {0, 1, 2}),
    (SamplingParams(top_p=0.6), {0, 1}),  # mass above token 2 is 0.65 >= 0.6
    (SamplingParams(top_p=0.66), {0, 1, 2}),
    (SamplingParams(top_k=3, top_p=0.7), {0, 1}),  # top-p on the top-k renormalised: 0.5, 0.3125, ...
    (SamplingParams(top_k=3, top_p=0.9), {0, 1, 2}),
    (SamplingParams(top_k=2, temperature=3.0), {0, 1}),
])
def test_top_k_top_p_never_sample_outside_the_allowed_set(params: SamplingParams, allowed: set[int]) -> None:
    perm = torch.randperm(6, generator=gen(6))  # the allowed set is by probability, not by index
    logits = torch.empty(6)
    logits[perm] = SKEWED
    tokens = draw(logits, params, 4000)
    rank = perm.argsort()  # token perm[r] is the r-th most likely
    seen = {int(rank[t]) for t in set(tokens)}
    assert seen == allowed
    # within the allowed set, frequencies follow the renormalised (tempered) distribution
    probs = (logits / params.temperature).softmax(-1)
    mask = torch.zeros(6, dtype=torch.bool)
    mask[perm[list(allowed)]] = True
    probs = torch.where(mask, probs, 0.0)
    probs /= probs.sum()
    assert chi_square(counts(tokens, 6), probs) < CHI2_999[5]


def test_disabled_top_k_values_keep_the_whole_vocabulary() -> None:
    logits = torch.zeros(8)
    for top_k in (-1, 0, 8, 100):
        assert set(draw(logits, SamplingParams(top_k=top_k), 2000, seed=top_k + 2)) == set(range(8))


def test_same_seed_same_tokens_whatever_the_batch() -> None:
    vocab = 64
    steps = [torch.randn(vocab, generator=gen(100 + i)) for i in range(12)]
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)

    def run(position: int, others: list[SamplingParams], other_seeds: list[int | None], sampler_seed: int):
        s = sampler(sampler_seed)
        mine = gen(1234)
        other_gens = [gen(x) if x is not None else None for x in other_seeds]
        tokens = []
        for i, row in enumerate(steps):
            batch = torch.randn(len(others) + 1, vocab, generator=gen(999 + i))
            batch[position] = row
            params = others[:position] + [seeded] + others[position:]
            gens = other_gens[:position] + [mine] + other_gens[position:]
            tokens.append(s(batch, params, gens).token_ids[position])
        return tokens

    alone = run(0, [], [], 0)
    assert len(set(alone)) > 3  # really random
    others = [SamplingParams(temperature=0.0), SamplingParams(top_k=5), SamplingParams(top_p=0.3, seed=7),
              SamplingParams(temperature=2.0, logprobs=3)]
    assert run(0, others, [None, None, 7, None], 1) == alone
    assert run(2, others, [None, None, 7, None], 2) == alone
    assert run(4, others, [None, None, 7, None], 3) == alone
    assert run(1, others[2:3], [7], 4) == alone


def test_different_seeds_give_different_tokens() -> None:
    logits = torch.zeros(1, 1000)

    def tokens(seed: int) -> list[int]:
        g = gen(seed)
        s = sampler()
        return [s(logits, [SamplingParams(seed=seed)], [g]).token_ids[0] for _ in range(10)]

    assert tokens(1) == tokens(1)
    assert tokens(1) != tokens(2)


def test_unseeded_sampling_follows_the_sampler_seed() -> None:
    logits = torch.zeros(200, 1000)
    params = [SamplingParams()] * 200
    assert sampler(1)(logits, params, [None] * 200).token_ids == sampler(1)(logits, params, [None] * 200).token_ids
    assert sampler(1)(logits, params, [None] * 200).token_ids != sampler(2)(logits, params, [None] * 200).token_ids


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies_match_softmax(temperature: float) -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    n = 20000
    observed = counts(draw(logits, SamplingParams(temperature=temperature), n, seed=11), 6)
    expected = (logits / temperature).softmax(-1)
    assert chi_square(observed, expected) < CHI2_999[5]
    # the statistic does tell temperatures apart
    other = 1.0 if temperature != 1.0 else 2.0
    assert chi_square(observed, (logits / other).softmax(-1)) > 10 * CHI2_999[5]


def test_seeded_rows_sample_from_the_right_distribution() -> None:
    logits = torch.tensor([1.0, 0.0, -0.5, 0.3, 2.0, -2.0, 0.7, 0.1])
    s = sampler()
    g = gen(77)
    params = SamplingParams(temperature=0.8, seed=77)
    tokens = [s(logits[None], [params], [g]).token_ids[0] for _ in range(6000)]
    assert chi_square(counts(tokens, 8), (logits / 0.8).softmax(-1)) < CHI2_999[7]


def test_logprobs_are_raw_log_softmax_with_top_n() -> None:
    logits = torch.randn(4, 40, generator=gen(8)) * 3
    params = [SamplingParams(temperature=0.5, logprobs=5, seed=1), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, logprobs=0), SamplingParams(top_k=3, logprobs=20)]
    out = sampler()(logits, params, [gen(1), None, None, None])
    ref = logits.log_softmax(-1)
    assert out.logprobs[1] is None
    for i, n in ((0, 5), (2, 0), (3, 20)):
        lp = out.logprobs[i]
        assert lp is not None and lp.token_id == out.token_ids[i]
        assert math.isclose(lp.logprob, float(ref[i, lp.token_id]), abs_tol=1e-5)
        assert len(lp.top_ids) == len(lp.top_logprobs) == n
        assert lp.top_ids == ref[i].topk(n).indices.tolist() if n else lp.top_ids == []
        for tid, val in zip(lp.top_ids, lp.top_logprobs):
            assert math.isclose(val, float(ref[i, tid]), abs_tol=1e-5)
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
    greedy = out.logprobs[2]
    assert greedy.token_id == int(logits[2].argmax()) and math.isclose(greedy.logprob, float(ref[2].max()),
                                                                      abs_tol=1e-5)
    assert out.token_ids[3] in ref[3].topk(3).indices.tolist()


# --- penalties and logit_bias -------------------------------------------------------------------


def openai_penalized(logits: torch.Tensor, generated: list[int], presence: float, frequency: float) -> torch.Tensor:
    """The formula of OpenAI's documentation, token by token."""
    out = logits.clone()
    for token in set(generated):
        out[token] -= frequency * generated.count(token) + presence
    return out


def test_penalties_change_the_greedy_choice_as_the_formula_says() -> None:
    logits = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.0])
    generated = [0, 0, 0, 1]  # token 0 three times, token 1 once
    cases = [  # (presence, frequency) -> the argmax, worked by hand over tokens 0, 1, 2
        ((0.0, 0.2), 0),  # 3 - 3 * 0.2 = 2.4, 2.5 - 0.2 = 2.3, 2.0
        ((0.0, 0.4), 1),  # 1.8, 2.1, 2.0: the count matters ...
        ((0.4, 0.0), 0),  # 2.6, 2.1, 2.0: ... where presence alone does not
        ((1.2, 0.0), 2),  # 1.8, 1.3, 2.0
        ((0.5, 0.3), 2),  # 3 - 0.9 - 0.5 = 1.6, 2.5 - 0.3 - 0.5 = 1.7, 2.0
        ((0.3, 0.2), 0),  # 2.1, 2.0, 2.0
        ((-1.0, -2.0), 0),  # negative penalties encourage repetition: 10, 5.5, 2.0
    ]
    for (presence, frequency), want in cases:
        params = SamplingParams(temperature=0.0, presence_penalty=presence, frequency_penalty=frequency)
        assert int(openai_penalized(logits, generated, presence, frequency).argmax()) == want
        out = sampler()(logits[None], [params], [None], [generated])
        assert out.token_ids == [want], (presence, frequency)


def test_no_generated_tokens_means_no_penalty() -> None:
    """The sampler penalises only the history it is given; that this is the generated tokens alone, not the
    prompt, is checked against transformers in test_engine_penalties."""
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    params = SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0)
    assert sampler()(logits, [params], [None], [[]]).token_ids == [0]
    assert sampler()(logits, [params], [None]).token_ids == [0]
    assert sampler()(logits, [params], [None], [[0]]).token_ids == [1]


def test_mixed_batch_leaves_rows_without_penalties_unchanged() -> None:
    logits = torch.randn(6, 80, generator=gen(20)) * 2
    generated = [torch.randint(0, 80, (n,), generator=gen(21 + n)).tolist() for n in (0, 30, 12, 7, 50, 3)]
    params = [SamplingParams(temperature=0.0, logprobs=3),
              SamplingParams(temperature=0.0, frequency_penalty=0.7, presence_penalty=0.4, logprobs=3),
              SamplingParams(temperature=0.0, logprobs=3),
              SamplingParams(temperature=0.0, presence_penalty=-1.5, logprobs=3),
              SamplingParams(temperature=0.0, logprobs=3),
              SamplingParams(temperature=0.0, frequency_penalty=2.0, logprobs=3)]
    out = sampler()(logits, params, [None] * 6, generated)
    plain = sampler()(logits, [SamplingParams(temperature=0.0, logprobs=3)] * 6, [None] * 6)
    for i in (0, 2, 4):  # same tokens and bit-identical logprobs as a batch without penalties
        assert out.token_ids[i] == plain.token_ids[i] == int(logits[i].argmax())
        assert out.logprobs[i] == plain.logprobs[i]
    for i in (1, 3, 5):
        p = params[i]
        want = openai_penalized(logits[i], generated[i], p.presence_penalty, p.frequency_penalty)
        assert out.token_ids[i] == int(want.argmax())
        # logprobs are of the penalised distribution (before temperature and truncation)
        lp = out.logprobs[i]
        assert lp.top_ids == want.log_softmax(-1).topk(3).indices.tolist()
        assert math.isclose(lp.logprob, float(want.log_softmax(-1).max()), abs_tol=1e-5)


def test_logit_bias_bans_and_forces_tokens() -> None:
    logits = torch.randn(4, 50, generator=gen(30)) * 3
    top = logits.argmax(-1).tolist()
    params = [SamplingParams(temperature=0.0, logit_bias={str(top[0]): -100}),
              SamplingParams(temperature=0.0, logit_bias={7: 100, 8: 5}),
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.7, seed=3, logit_bias={"11": 100})]
    out = sampler()(logits, params, [None, None, None, gen(3)])
    banned = logits[0].clone()
    banned[top[0]] = float("-inf")
    assert out.token_ids == [int(banned.argmax()), 7, top[2], 11]
    # a ban holds under random sampling too, whatever the draw
    ban_all_but_two = {t: -100 for t in range(50) if t not in (4, 9)}
    many = draw(torch.zeros(50), SamplingParams(logit_bias=ban_all_but_two), 500)
    assert set(many) == {4, 9}


def test_logit_bias_moves_logprobs_and_keeps_the_input_intact() -> None:
    """Logprobs include the bias (the forced token is the top one); the logits tensor (a CUDA graph's
    output buffer, in the engine) is not written to."""
    logits = torch.randn(2, 30, generator=gen(31))
    before = logits.clone()
    params = [SamplingParams(temperature=0.0, logprobs=2, logit_bias={5: 100}),
              SamplingParams(temperature=0.0, logprobs=2, presence_penalty=1.0)]
    out = sampler()(logits, params, [None, None], [[1, 2], [int(logits[1].argmax())]])
    assert torch.equal(logits, before)
    biased = logits[0].clone()
    biased[5] += 100
    assert out.logprobs[0].token_id == out.logprobs[0].top_ids[0] == 5
    assert math.isclose(out.logprobs[0].logprob, float(biased.log_softmax(-1)[5]), abs_tol=1e-5)

