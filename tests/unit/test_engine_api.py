"""EngineCore and LLM on tiny models: bad inputs, stop conditions, seeds, aborts, roles, dtypes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from common.config import EngineConfig
from common.errors import InvalidRequestError
from engine import LLM, EngineCore, RequestMode, RequestOutput, SamplingParams
from engine.demo_model import write_demo_model
from tests.hf_reference import hf_greedy, load_hf, random_prompts

VOCAB = 512
BS = 4
MAX_LEN = 64


def greedy(max_tokens: int = 8, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


def make_core(model_dir: Path, **options) -> EngineCore:
    options = {"dtype": "float32", "block_size": BS, "num_blocks": 128, **options}
    return EngineCore(EngineConfig(model=str(model_dir), **options))


def make_llm(model_dir: Path, **options) -> LLM:
    return LLM(model_dir, **{"dtype": "float32", "block_size": BS, "num_blocks": 128, **options})


def run(core: EngineCore, max_steps: int = 500) -> dict[str, RequestOutput]:
    """Step until nothing is left; the final output of every request that finished."""
    finished: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        if not core.has_unfinished():
            return finished
        for out in core.step():
            if out.finished:
                assert out.request_id not in finished, "finished twice"
                finished[out.request_id] = out
    raise AssertionError("no progress")


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> Path:
    return tiny_model_factory("llama_gqa")


@pytest.fixture(scope="module")
def hf(model_dir):
    return load_hf(model_dir)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("demo"), vocab_size=512, hidden_size=64, num_layers=2,
                            num_heads=4, num_kv_heads=2, intermediate_size=128)


# --- bad inputs -----------------------------------------------------------------------------------

PROMPT = [5, 6, 7]
BAD_INPUTS: list[tuple[str, str, Callable[[EngineCore], None]]] = [
    ("prompt longer than the context", "prompt", lambda c: c.add_request("bad", [1] * (MAX_LEN + 1), greedy(1))),
    ("prompt fills the context", "prompt", lambda c: c.add_request("bad", [1] * MAX_LEN, greedy(1))),
    ("prompt + max_tokens too long", "max_tokens",
     lambda c: c.add_request("bad", [1] * (MAX_LEN - 4), greedy(5))),
    ("max_tokens 0", "max_tokens", lambda c: c.add_request("bad", PROMPT, SamplingParams(max_tokens=0))),
    ("temperature < 0", "temperature", lambda c: c.add_request("bad", PROMPT, SamplingParams(temperature=-0.1))),
    ("top_p 0", "top_p", lambda c: c.add_request("bad", PROMPT, SamplingParams(top_p=0.0))),
    ("top_p 1.5", "top_p", lambda c: c.add_request("bad", PROMPT, SamplingParams(top_p=1.5))),
    ("top_k -2", "top_k", lambda c: c.add_request("bad", PROMPT, SamplingParams(top_k=-2))),
    ("token -1", "prompt", lambda c: c.add_request("bad", [1, -1, 2], greedy())),
    ("token = vocab", "prompt", lambda c: c.add_request("bad", [1, VOCAB], greedy())),
    ("token a float", "prompt", lambda c: c.add_request("bad", [1, 2.0], greedy())),
    ("token a bool", "prompt", lambda c: c.add_request("bad", [True], greedy())),
    ("empty prompt", "prompt", lambda c: c.add_request("bad", [], greedy())),
    ("stop an int", "stop", lambda c: c.add_request("bad", PROMPT, SamplingParams(stop=5))),
    ("stop with a non-string", "stop", lambda c: c.add_request("bad", PROMPT, SamplingParams(stop=["a", 3]))),
    ("stop without a tokenizer", "stop", lambda c: c.add_request("bad", PROMPT, SamplingParams(stop=["a"]))),
    ("stop token outside the vocabulary", "stop_token_ids",
     lambda c: c.add_request("bad", PROMPT, SamplingParams(stop_token_ids=[VOCAB]))),
    ("duplicate request id", "request_id", lambda c: c.add_request("good-0", PROMPT, greedy())),
    ("empty request id", "request_id", lambda c: c.add_request("", PROMPT, greedy())),
]


def test_bad_inputs_name_the_field_and_leave_the_engine_serving(model_dir, hf) -> None:
    core = make_core(model_dir, max_model_len=MAX_LEN)
    prompts = random_prompts([11, 5, 30], VOCAB, seed=21)
    for i, p in enumerate(prompts):
        core.add_request(f"good-{i}", p, greedy(8))
    core.step()  # the good requests are running (or waiting) while the bad ones arrive
    for name, field, bad in BAD_INPUTS:
        with pytest.raises(InvalidRequestError) as err:
            bad(core)
        assert err.value.field == field, name
        assert set(core.scheduler.requests) == {"good-0", "good-1", "good-2"}, name
    core.add_request("bad", PROMPT, greedy(3))  # a rejected id left nothing behind
    finished = run(core)
    assert set(finished) == {"good-0", "good-1", "good-2", "bad"}
    for i, p in enumerate(prompts):
        assert finished[f"good-{i}"].token_ids == hf_greedy(hf, p, 8)[0]
    assert finished["bad"].token_ids == hf_greedy(hf, PROMPT, 3)[0]
    core.assert_no_leaks()


def test_llm_validates_the_whole_batch_before_starting_any(model_dir) -> None:
    llm = make_llm(model_dir, max_model_len=MAX_LEN)
    with pytest.raises(InvalidRequestError) as err:
        llm.generate(prompt_token_ids=[[1, 2], [3, VOCAB]], sampling=greedy(2))
    assert err.value.field == "prompt"
    with pytest.raises(InvalidRequestError) as err:
        llm.generate(prompt_token_ids=[[1, 2], [3]], sampling=[greedy(2)])
    assert err.value.field == "sampling"
    with pytest.raises(InvalidRequestError) as err:
        llm.generate(prompts=["text"])  # the tiny model has no tokenizer
    assert err.value.field == "prompt"
    assert not llm.engine.has_unfinished()
    llm.engine.assert_no_leaks()
    assert len(llm.generate(prompt_token_ids=[1, 2, 3], sampling=greedy(2))[0].token_ids) == 2


# --- stop conditions ------------------------------------------------------------------------------


def test_max_tokens_gives_length_and_exactly_that_many_tokens(model_dir, hf) -> None:
    llm = make_llm(model_dir)
    prompts = random_prompts([3, 9], VOCAB, seed=22)
    refs = [hf_greedy(hf, p, 6)[0] for p in prompts]
    for n in (1, 2, 6):
        for ref, out in zip(refs, llm.generate(prompt_token_ids=prompts, sampling=greedy(n))):
            assert out.finish_reason == "length" and out.stop_reason is None
            assert out.token_ids == ref[:n]
    llm.engine.assert_no_leaks()


def test_stop_token_ids(model_dir, hf) -> None:
    prompt = random_prompts([10], VOCAB, seed=23)[0]
    ref = hf_greedy(hf, prompt, 12)[0]
    stop_at = next(i for i in range(2, 12) if ref[i] not in ref[:i])  # first occurrence at i
    llm = make_llm(model_dir)
    out = llm.generate(prompt_token_ids=[prompt], sampling=greedy(12, stop_token_ids=[ref[stop_at], VOCAB - 1]))[0]
    assert out.token_ids == ref[:stop_at + 1]
    assert out.finish_reason == "stop" and out.stop_reason == ref[stop_at]
    llm.engine.assert_no_leaks()


def test_eos_ends_generation_unless_ignore_eos(model_dir, hf, tmp_path) -> None:
    prompt = random_prompts([7], VOCAB, seed=24)[0]
    ref = hf_greedy(hf, prompt, 10)[0]
    eos_at = next(i for i in range(1, 10) if ref[i] not in ref[:i])
    eos_dir = shutil.copytree(model_dir, tmp_path / "eos")
    for name in ("config.json", "generation_config.json"):
        path = eos_dir / name
        if path.is_file():
            config = json.loads(path.read_text())
            config["eos_token_id"] = ref[eos_at]
            path.write_text(json.dumps(config))
    llm = make_llm(eos_dir)
    assert llm.engine.eos_token_ids == {ref[eos_at]}
    stopped, ignored = llm.generate(prompt_token_ids=[prompt, prompt], sampling=[
        SamplingParams(max_tokens=10, temperature=0.0), greedy(10)])
    assert stopped.token_ids == ref[:eos_at + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason is None
    assert ignored.token_ids == ref and ignored.finish_reason == "length"
    llm.engine.assert_no_leaks()


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_cut_the_text_and_stop_the_tokens(demo_dir, include: bool) -> None:
    llm = make_llm(demo_dir)
    tok = llm.tokenizer
    assert tok is not None
    full = llm.generate("The quick brown fox", sampling=greedy(24))[0]
    text = full.text
    assert len(text) > 20 and "\ufffd" not in text[8:20]
    stop = text[12:16]
    cut = text.find(stop)
    out = llm.generate("The quick brown fox", sampling=greedy(24, stop=[stop, "never appears \x01"],
                                                              include_stop_str_in_output=include))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == (text[:cut + len(stop)] if include else text[:cut])
    # generation stopped at the token that completed the stop string
    n = next(k for k in range(1, 25) if stop in tok.decode(full.token_ids[:k]))
    assert out.token_ids == full.token_ids[:n] and n < 24
    llm.engine.assert_no_leaks()


# --- sampling through the engine ------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_across_runs_and_batches(model_dir) -> None:
    prompt = random_prompts([9], VOCAB, seed=25)[0]
    others = random_prompts([4, 30, 13], VOCAB, seed=26)
    seeded = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    alone = make_llm(model_dir).generate(prompt_token_ids=[prompt], sampling=seeded)[0]
    llm = make_llm(model_dir, max_num_batched_tokens=16)
    mixed = [greedy(6), SamplingParams(max_tokens=5, temperature=1.5), SamplingParams(max_tokens=10, seed=43)]
    first = llm.generate(prompt_token_ids=[others[0], prompt, *others[1:]],
                         sampling=[mixed[0], seeded, *mixed[1:]])[1]
    last = llm.generate(prompt_token_ids=[*others, prompt], sampling=[*mixed, seeded])[3]
    assert alone.token_ids == first.token_ids == last.token_ids
    other_seed = llm.generate(prompt_token_ids=[prompt], sampling=SamplingParams(
        max_tokens=10, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True))[0]
    assert other_seed.token_ids != alone.token_ids
    llm.engine.assert_no_leaks()


# --- aborts ---------------------------------------------------------------------------------------


def test_abort_running_and_waiting_requests(model_dir, hf) -> None:
    core = make_core(model_dir, max_num_requests=2)
    prompts = random_prompts([6, 8, 10], VOCAB, seed=27)
    for i, p in enumerate(prompts):
        core.add_request(f"r{i}", p, greedy(20))
    core.step()
    core.step()
    assert [r.request_id for r in core.scheduler.running] == ["r0", "r1"]
    assert [r.request_id for r in core.scheduler.waiting] == ["r2"]
    running = core.abort("r0")
    waiting = core.abort("r2")
    assert core.abort("r0") is None and core.abort("nope") is None
    assert running.finish_reason == "abort" and running.finished and len(running.token_ids) == 2
    assert waiting.finish_reason == "abort" and waiting.token_ids == []
    assert core.block_ids("r0") == [] and core.block_ids("r2") == []
    outputs = core.step()
    aborted = {o.request_id: o for o in outputs if o.finished}
    assert {aborted["r0"].finish_reason, aborted["r2"].finish_reason} == {"abort"}
    finished = run(core)
    assert set(finished) == {"r1"} and finished["r1"].token_ids == hf_greedy(hf, prompts[1], 20)[0]
    core.assert_no_leaks()


# --- roles: prefill on one engine, decode on another ----------------------------------------------


def _copy_kv(src: EngineCore, src_ids: list[int], dst: EngineCore, dst_ids: list[int]) -> None:
    for s, d in zip(src.runner.kv_caches, dst.runner.kv_caches):
        d[:, dst_ids] = s[:, src_ids]


def _prefill(core: EngineCore, request_id: str, prompt: list[int], sampling: SamplingParams) -> RequestOutput:
    core.add_request(request_id, prompt, sampling, mode=RequestMode.PREFILL_ONLY)
    finished = run(core)
    return finished[request_id]


@pytest.mark.parametrize("warm_prefix", [0, 9])
def test_prefill_then_remote_decode_matches_colocated(model_dir, hf, warm_prefix: int) -> None:
    prompt = random_prompts([23], VOCAB, seed=28)[0]
    ref = hf_greedy(hf, prompt, 10)[0]
    prefill, decode = make_core(model_dir), make_core(model_dir)
    params = greedy(10)

    first = _prefill(prefill, "p", prompt, params)
    assert first.finish_reason == "prefilled" and first.token_ids == [ref[0]]
    held = prefill.block_ids("p")
    assert len(held) == 6 and sorted(prefill.kv.pool.leaks()) == sorted(held)
    assert prefill.leaks()["requests"] == ["p"] and not prefill.has_unfinished()

    if warm_prefix:  # the decode engine already caches part of the prompt: only the rest is sent
        decode.add_request("warm", prompt[:warm_prefix], greedy(1))
        run(decode)
    executed: list[int] = []
    execute = decode.runner.execute
    decode.runner.execute = lambda out, *a: (executed.append(out.num_tokens), execute(out, *a))[1]
    decode.add_request("d", prompt, params, mode=RequestMode.REMOTE_KV)
    assert decode.step() == [] and executed == []
    (res,) = decode.take_reservations()
    assert decode.take_reservations() == []
    assert res.request_id == "d" and len(res.block_ids) == 6
    assert res.num_cached_tokens == warm_prefix // BS * BS
    start = res.num_cached_tokens // BS
    for layer in decode.runner.kv_caches:  # what a failed or absent transfer would leave behind
        layer[:, res.block_ids[start:]] = 100.0
    _copy_kv(prefill, held[start:], decode, res.block_ids[start:])
    out = decode.finish_remote_kv("d", first.token_ids[0])
    assert out.token_ids == [ref[0]] and not out.finished
    finished = run(decode)
    assert finished["d"].token_ids == ref and finished["d"].finish_reason == "length"
    assert executed == [1] * 9  # only decode steps: the prompt's KV came from the prefill engine

    assert prefill.release("p") and not prefill.release("p")
    prefill.assert_no_leaks()
    decode.assert_no_leaks()


def test_failed_transfer_falls_back_to_local_prefill(model_dir, hf) -> None:
    prompt = random_prompts([23], VOCAB, seed=28)[0]
    ref = hf_greedy(hf, prompt, 10)[0]
    decode = make_core(model_dir, max_num_batched_tokens=8)
    decode.add_request("warm", prompt[:10], greedy(1))
    run(decode)
    decode.add_request("d", prompt, greedy(10), mode=RequestMode.REMOTE_KV)
    decode.step()
    (res,) = decode.take_reservations()
    assert res.num_cached_tokens == 8
    for layer in decode.runner.kv_caches:  # a transfer that wrote garbage and then failed
        layer[:, res.block_ids[2:]] = 100.0
    decode.fail_remote_kv("d")
    finished = run(decode)
    assert finished["d"].token_ids == ref and finished["d"].num_cached_tokens == 8
    decode.assert_no_leaks()


def test_first_token_that_stops_ends_the_remote_request(model_dir, hf) -> None:
    prompt = random_prompts([12], VOCAB, seed=29)[0]
    ref = hf_greedy(hf, prompt, 1)[0]
    decode = make_core(model_dir)
    decode.add_request("d", prompt, greedy(5, stop_token_ids=[ref[0]]), mode=RequestMode.REMOTE_KV)
    decode.step()
    decode.take_reservations()
    out = decode.finish_remote_kv("d", ref[0])
    assert out.finished and out.finish_reason == "stop" and out.stop_reason == ref[0]
    assert not decode.has_unfinished()
    decode.assert_no_leaks()


def test_abort_of_held_and_reserved_requests(model_dir) -> None:
    core = make_core(model_dir)
    core.add_request("p", [1, 2, 3, 4, 5], greedy(4), mode=RequestMode.PREFILL_ONLY)
    core.add_request("d", [1, 2, 3, 4, 5, 6], greedy(4), mode=RequestMode.REMOTE_KV)
    for _ in range(3):
        core.step()
    assert core.block_ids("p") and core.block_ids("d") and core.take_reservations()
    assert core.abort("p").finish_reason == "abort"
    assert core.abort("d").finish_reason == "abort"
    assert not core.release("p")
    assert {o.request_id: o.finish_reason for o in core.step()} == {"p": "abort", "d": "abort"}
    assert not core.has_unfinished()
    core.assert_no_leaks()


def test_abort_before_take_reservations_drops_the_reservation(model_dir) -> None:
    """Blocks of an aborted request go back to the pool: no transfer may be started into them."""
    core = make_core(model_dir, num_blocks=4)
    core.add_request("d", list(range(1, 13)), greedy(2), mode=RequestMode.REMOTE_KV)
    core.step()
    reserved = core.block_ids("d")
    core.abort("d")
    core.add_request("other", list(range(20, 32)), greedy(2))
    core.step()
    assert set(core.block_ids("other")) & set(reserved)  # "other" now owns blocks "d" had reserved
    assert core.take_reservations() == []
    run(core)
    core.assert_no_leaks()


# --- dtypes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logprobs_close_to_hf(model_dir, dtype: torch.dtype) -> None:
    name = str(dtype).removeprefix("torch.")
    prompts = random_prompts([5, 17, 30], VOCAB, seed=30)
    llm = make_llm(model_dir, dtype=name)
    assert llm.engine.runner.kv_caches[0].dtype == dtype
    outputs = llm.generate(prompt_token_ids=prompts, sampling=greedy(4, logprobs=20))
    hf_half = load_hf(model_dir, dtype)
    for prompt, out in zip(prompts, outputs):
        assert len(out.token_ids) == 4
        with torch.inference_mode():
            ref = hf_half(torch.tensor([prompt])).logits[0, -1].float().log_softmax(-1)
        first = out.logprobs[0]
        assert abs(first.logprob - float(ref[first.token_id])) < 0.1
        diffs = [abs(v - float(ref[t])) for t, v in zip(first.top_ids, first.top_logprobs)]
        assert max(diffs) < 0.1 and sum(diffs) / len(diffs) < 0.03
        assert first.token_id in ref.topk(5).indices.tolist()
    llm.engine.assert_no_leaks()
