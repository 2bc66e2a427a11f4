"""The engine on a GPU: parity with transformers in fp32, CUDA-graph decode equal to eager, NCCL KV bit-exact."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from engine import LLM, SamplingParams
from tests.hf_reference import hf_greedy, load_hf, random_prompts

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
LENGTHS = [1, 7, 16, 33, 100, 250, 17, 64]


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2", "qwen3", "mistral_window"])
def test_fp32_greedy_parity_with_transformers_on_gpu(tiny_model_factory, kind):
    model_dir = tiny_model_factory(kind)
    prompts = random_prompts(LENGTHS, 512, seed=11)
    llm = LLM(str(model_dir), dtype="float32", device="cuda", block_size=16, num_blocks=512)
    assert llm.engine.runner.backend.name in ("triton", "flash_attn")
    outputs = llm.generate(prompt_token_ids=prompts, sampling=GREEDY)
    hf = load_hf(model_dir)
    for prompt, out in zip(prompts, outputs):
        want, _ = hf_greedy(hf, prompt, 32)
        assert out.token_ids == want
    llm.engine.assert_no_leaks()


def test_cuda_graph_decode_equals_eager(tiny_model_factory):
    """fp32: a padded graph batch and an exact eager batch tile their matmuls differently, so in bf16 the
    last bits (and, on a random model's near-ties, greedy tokens) may differ; in fp32 tokens must not."""
    model_dir = tiny_model_factory("llama_gqa")
    prompts = random_prompts([5, 40, 77, 120, 9, 200, 31, 64, 3, 90, 18], 512, seed=12)
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    graph = LLM(str(model_dir), dtype="float32", device="cuda", num_blocks=1024)
    eager = LLM(str(model_dir), dtype="float32", device="cuda", num_blocks=1024, enforce_eager=True)
    assert graph.engine.runner.graphs is not None and eager.engine.runner.graphs is None
    a = graph.generate(prompt_token_ids=prompts, sampling=params)
    b = eager.generate(prompt_token_ids=prompts, sampling=params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attn_engine_agrees_with_triton(tiny_model_factory):
    """The engine on flash_attn (bf16, 256-token blocks, CUDA-graph decode) against the same engine on triton.
    Both round differently in bf16, so this asks for the same first token everywhere (prefill, including a
    prefix hit) and the same greedy tokens almost everywhere after it."""
    model_dir = tiny_model_factory("llama_gqa")
    prompts = random_prompts([3, 200, 300, 600, 900, 257, 40, 512], 512, seed=14)
    prompts.append(prompts[4][:700] + prompts[1][:50])  # a prefix hit on 2 whole blocks
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outputs = {}
    for backend in ("flash_attn", "triton"):
        llm = LLM(str(model_dir), dtype="bfloat16", device="cuda", block_size=256, num_blocks=64,
                  attention_backend=backend)
        assert llm.engine.runner.backend.name == backend
        outputs[backend] = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling=params)]
        llm.engine.assert_no_leaks()
    flash, triton = outputs["flash_attn"], outputs["triton"]
    assert [f[0] for f in flash] == [t[0] for t in triton]
    same = sum(a == b for f, t in zip(flash, triton) for a, b in zip(f, t))
    assert same / sum(len(t) for t in triton) >= 0.9


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("step_tokens", [2048, 200])
def test_nccl_disaggregated_equals_colocated(tmp_path, step_tokens):
    """Prefill on cuda:0, decode on cuda:1, KV over NCCL: the same tokens as one GPU alone. With a 200-token
    step budget the long prompts take several chunked steps, each announced in its own header."""
    from cli.processes import worker
    from common.rpc import worker_pb2 as pb
    from engine.demo_model import write_demo_model
    from tests.grpc_clients import generate, wait_idle

    model = write_demo_model(tmp_path / "model")
    prefill = worker("prefill", model, tmp_path, "--device", "cuda:0", "--dtype", "float32",
                     "--max-num-batched-tokens", str(step_tokens))
    decode = worker("decode", model, tmp_path, "--device", "cuda:1", "--dtype", "float32", "--prefill-peers",
                    prefill.address, "--local-prefill-max-tokens", "0")
    try:
        prompts = random_prompts([3, 64, 500, 1500], 2048, seed=13)
        remote = [generate(decode.address, f"n{i}", p, prefill=prefill.address, transport=pb.KV_TRANSPORT_NCCL)
                  for i, p in enumerate(prompts)]
        reference = LLM(str(model), dtype="float32", device="cuda:1", num_blocks=512).generate(
            prompt_token_ids=prompts, sampling=SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
        for r, want in zip(remote, reference):
            assert r.info.mode == pb.PrefillInfo.MODE_REMOTE, r.info
            assert r.token_ids == want.token_ids
        for w in (prefill, decode):
            report = wait_idle(w.address)
            assert report.num_free_blocks == report.num_total_blocks
    finally:
        prefill.stop()
        decode.stop()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.07)])
def test_fused_kernels_match_their_references(dtype, tol):
    from engine.models import fused
    from engine.models.config import RopeConfig
    from engine.models.layers import _inv_freq

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(37, 4096, device="cuda", dtype=dtype, generator=g)
    r = torch.randn(37, 4096, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(4096, device="cuda", dtype=dtype, generator=g)
    res = r.clone()
    out, res = fused.add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(res, x + r)  # the residual sum is exact in either dtype
    assert torch.allclose(out.float(), fused.rms_norm_ref(x + r, w, 1e-5).float(), atol=tol, rtol=tol)
    inv, _ = _inv_freq(RopeConfig(theta=500000.0), 128, 4096)
    freqs = torch.arange(4096).float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), -1).cuda()
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    q = torch.randn(37, 32, 128, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(37, 8, 128, device="cuda", dtype=dtype, generator=g)
    pos = torch.randint(0, 4096, (37,), device="cuda", generator=g)
    (fq, fk), (rq, rk) = fused.rotary(q.clone(), k.clone(), cos, sin, pos), fused.rotary_ref(q, k, cos, sin, pos)
    assert torch.allclose(fq.float(), rq.float(), atol=tol, rtol=tol)
    assert torch.allclose(fk.float(), rk.float(), atol=tol, rtol=tol)
    gu = torch.randn(37, 2 * 14336, device="cuda", dtype=dtype, generator=g)
    ref = torch.nn.functional.silu(gu[:, :14336]) * gu[:, 14336:]
    assert torch.allclose(fused.silu_and_mul(gu).float(), ref.float(), atol=tol, rtol=tol)


def test_penalties_and_logit_bias_on_gpu(tiny_model_factory):
    """fp32 on CUDA, CUDA-graph decode (sampling runs after the graph, on its output): the same greedy tokens
    as transformers' generate with the OpenAI formula, in a batch mixing requests with and without them; and
    applying them adds no host sync (their inputs go through the runner's pinned staging buffers)."""
    from engine.sampler import _add_logit_bias, _LogitBiasArrays, _penalize
    from tests.hf_reference import OpenAIPenalties, hf_generate_greedy

    model_dir = tiny_model_factory("llama_gqa")
    settings = [(0.0, 0.0, {}), (0.0, 1.5, {}), (2.0, 0.0, {}), (0.7, 0.4, {7: 4.0, 100: -100.0}),
                (-1.0, -0.5, {}), (0.0, 0.0, {3: 6.5})]
    prompts = random_prompts([5, 17, 33, 1, 48, 9], 512, seed=15)
    llm = LLM(str(model_dir), dtype="float32", device="cuda", num_blocks=512)
    assert llm.engine.runner.graphs is not None
    sampling = [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, presence_penalty=p,
                               frequency_penalty=f, logit_bias=b) for p, f, b in settings]
    outputs = llm.generate(prompt_token_ids=prompts, sampling=sampling)
    hf = load_hf(model_dir)
    for prompt, s, out in zip(prompts, settings, outputs):
        assert out.token_ids == hf_generate_greedy(hf, prompt, 40, OpenAIPenalties(len(prompt), *s))[0], s
    llm.engine.assert_no_leaks()

    to_device = llm.engine.runner.sampler.to_device
    logits = torch.randn(len(sampling), 512, device="cuda")
    generated = [o.token_ids for o in outputs]
    torch.cuda.synchronize()
    with torch.inference_mode():  # as in the runner: the staging buffers are inference tensors
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = _add_logit_bias(_penalize(logits, sampling, generated, to_device), sampling, to_device,
                                  _LogitBiasArrays())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ref = torch.stack([OpenAIPenalties(0, *s)(torch.tensor([g], device="cuda"), logits[i:i + 1])[0]
                       for i, (s, g) in enumerate(zip(settings, generated))])
    assert torch.equal(out, ref)
