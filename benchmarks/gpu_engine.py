"""The engine on one GPU: decode step time against the memory roofline, prefill throughput and MFU.

A Llama-3-8B-shaped model with random bf16 weights (``load_format=dummy``;
nothing is downloaded). In one run:

* measured ceilings: HBM copy bandwidth (read + write) and bf16 matmul rate;
* decode: the engine's step time at batch 1, 8, 32 and 128 with 1,024-token
  contexts (CUDA graphs, Triton attention), against the memory roofline
  ``(weight bytes + KV bytes read) / copy bandwidth``; beside it
  ``transformers`` ``generate`` on the same model, shape and GPU;
* a check that graph and eager decoding give the same tokens;
* prefill: 1 x 8,192 and 8 x 1,024 tokens, tokens/s and model FLOP utilisation.

    python benchmarks/gpu_engine.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
}


def write_config(directory: Path, overrides: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**LLAMA3_8B, **(overrides or {})}))
    return directory


def ceilings() -> dict:
    n = 1 << 30  # 1 GiB copies
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        dst.copy_(src)
    torch.cuda.synchronize()
    copy_bw = 2 * n * 20 / (time.perf_counter() - start)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    flops = 2 * 8192**3 * 20 / (time.perf_counter() - start)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"copy_bandwidth_tb_s": copy_bw / 1e12, "bf16_matmul_tflop_s": flops / 1e12}


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_steps(core, batch: int, context: int, steps: int, seed: int) -> tuple[float, list[list[int]]]:
    from common.sampling import SamplingParams

    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    ids = [f"b{batch}-{seed}-{i}" for i in range(batch)]
    for rid in ids:
        core.add_request(rid, torch.randint(100, 120000, (context,), generator=g).tolist(), params)
    outputs = {rid: [] for rid in ids}
    while any(not v for v in outputs.values()):  # prefill everything first
        for out in core.step():
            outputs[out.request_id] += out.new_token_ids
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        for out in core.step():
            outputs[out.request_id] += out.new_token_ids
        times.append(time.perf_counter() - start)
    for rid in ids:
        core.abort(rid)
    core.step()
    return statistics.median(times[2:]), [outputs[rid] for rid in ids]


def transformers_decode(model_dir: Path, context: int, new_tokens: int) -> float:
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    prompt = torch.randint(100, 120000, (1, context), device="cuda")
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kwargs)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kwargs)
        torch.cuda.synchronize()
        one = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, **kwargs)
        torch.cuda.synchronize()
        many = time.perf_counter() - start
    del model
    torch.cuda.empty_cache()
    return (many - one) / new_tokens


def prefill(core, lengths: list[int], seed: int) -> float:
    from common.sampling import SamplingParams

    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for i, n in enumerate(lengths):
        core.add_request(f"p{seed}-{i}", torch.randint(100, 120000, (n,), generator=g).tolist(), params)
    torch.cuda.synchronize()
    start = time.perf_counter()
    while core.has_unfinished():
        core.step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--attention-backend", default="auto", help="auto, triton or flash_attn")
    parser.add_argument("--block-size", type=int, default=16, help="KV block size (flash_attn needs 256)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    args = parser.parse_args()
    from common.config import EngineConfig
    from engine.core import EngineCore

    result: dict = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(),
                    "torch": torch.__version__, "host": platform.node()}
    result.update(ceilings())
    print(f"copy {result['copy_bandwidth_tb_s']:.2f} TB/s, bf16 matmul {result['bf16_matmul_tflop_s']:.0f} TFLOP/s",
          flush=True)
    model_dir = write_config(Path(tempfile.mkdtemp()) / "llama3-8b")
    context = 1024
    if not args.no_transformers:
        hf = transformers_decode(model_dir, context, 32)  # first: it must not compete with the engine for memory
        result["transformers_decode_ms_batch1"] = hf * 1e3
        print(f"transformers generate, batch 1: {hf * 1e3:.2f} ms/token", flush=True)
    core = EngineCore(EngineConfig(model=str(model_dir), dtype="bfloat16", load_format="dummy", device="cuda",
                                   max_num_batched_tokens=8192, max_num_requests=128, max_model_len=16384,
                                   max_graph_batch_size=128, attention_backend=args.attention_backend,
                                   block_size=args.block_size))
    weights = param_bytes(core.runner.model)
    mc = core.model_config
    kv_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * 2
    copy_bw = result["copy_bandwidth_tb_s"] * 1e12
    result["weights_gb"] = weights / 1e9
    result["attention_backend"] = core.runner.backend.name
    result["decode"] = []
    for batch in (1, 8, 32, 128):
        step, _ = decode_steps(core, batch, context, args.steps, seed=batch)
        kv_read = batch * (context + args.steps // 2) * kv_per_token
        roofline = (weights + kv_read) / copy_bw
        row = {"batch": batch, "context": context, "step_ms": step * 1e3, "roofline_ms": roofline * 1e3,
               "vs_roofline": step / roofline, "tokens_per_s": batch / step}
        result["decode"].append(row)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"decode batch {batch:3d}: {row['step_ms']:.2f} ms/step, roofline {row['roofline_ms']:.2f} ms "
              f"({row['vs_roofline']:.2f}x), {row['tokens_per_s']:.0f} tok/s", flush=True)
    # graph vs eager: in bf16 a padded graph batch tiles its matmuls differently from an exact eager batch,
    # so this is the share of identical greedy tokens (tests/gpu checks exact identity in fp32)
    _, graph_tokens = decode_steps(core, 8, 256, 16, seed=99)
    graphs, core.runner.graphs = core.runner.graphs, None
    _, eager_tokens = decode_steps(core, 8, 256, 16, seed=99)
    core.runner.graphs = graphs
    same = sum(a == b for ga, ea in zip(graph_tokens, eager_tokens) for a, b in zip(ga, ea))
    result["graph_eager_same_token_share_bf16"] = same / sum(len(g) for g in graph_tokens)
    print(f"graph vs eager decode, bf16: {result['graph_eager_same_token_share_bf16']:.2f} of tokens identical",
          flush=True)
    # prefill throughput and MFU
    layer_params = weights / 2 - mc.vocab_size * mc.hidden_size * 2  # matmul weights of the layers
    result["prefill"] = []
    for lengths in ([8192], [1024] * 8):
        prefill(core, [512], seed=1000 + len(lengths))  # warm (fresh tokens: nothing may hit the prefix cache)
        seconds = prefill(core, lengths, seed=2000 + len(lengths))
        tokens = sum(lengths)
        flops = 2 * layer_params * tokens + sum(2 * mc.num_layers * n * n * mc.q_size for n in lengths)
        flops += 2 * mc.vocab_size * mc.hidden_size * len(lengths)
        row = {"shape": f"{len(lengths)}x{lengths[0]}", "seconds": seconds, "tokens_per_s": tokens / seconds,
               "tflop_s": flops / seconds / 1e12, "mfu_vs_measured_matmul": flops / seconds / 1e12
               / result["bf16_matmul_tflop_s"]}
        result["prefill"].append(row)
        print(f"prefill {row['shape']}: {row['tokens_per_s']:.0f} tok/s, {row['tflop_s']:.0f} TFLOP/s "
              f"(MFU {row['mfu_vs_measured_matmul']:.2f} of the measured matmul rate)", flush=True)
    if not args.no_transformers:
        first = result["decode"][0]
        result["speedup_vs_transformers_batch1"] = hf * 1e3 / first["step_ms"]
        print(f"transformers generate, batch 1: {hf * 1e3:.2f} ms/token; engine {first['step_ms']:.2f} ms "
              f"({result['speedup_vs_transformers_batch1']:.1f}x faster)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
