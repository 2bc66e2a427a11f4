"""Engine throughput against ``transformers.generate`` on the same model, prompts and machine.

Both generate greedily, a batch of 16 prompts of different lengths, 128 new
tokens each, EOS ignored. Prints output tokens/s of each and the ratio, and
checks that both produced the same tokens (so the comparison is like for like).

    python benchmarks/engine_cpu.py [--model DIR] [--batch 16] [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def hf_generate(model_dir: Path, prompts: list[list[int]], new_tokens: int, threads: int) -> tuple[float, list]:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as HF wants for decoder-only generation
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
        elapsed = time.perf_counter() - start
    return elapsed, out[:, width:].tolist()


def engine_generate(model_dir: Path, prompts: list[list[int]], new_tokens: int, threads: int,
                    **options) -> tuple[float, list]:
    from engine import LLM, SamplingParams

    torch.set_num_threads(threads)
    llm = LLM(str(model_dir), dtype="float32", **options)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompt_token_ids=prompts, sampling=params)
    elapsed = time.perf_counter() - start
    llm.engine.assert_no_leaks()
    return elapsed, [o.token_ids for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint dir (default: the demo model, written to a temp dir)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    tmp = None
    model_dir = Path(args.model) if args.model else None
    if model_dir is None:
        from engine.demo_model import write_demo_model

        tmp = tempfile.TemporaryDirectory()
        model_dir = write_demo_model(Path(tmp.name) / "demo")
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 257, (args.batch,), generator=g).tolist()
    prompts = [torch.randint(10, vocab, (n,), generator=g).tolist() for n in lengths]
    total = args.batch * args.new_tokens

    hf_times, engine_times = [], []
    agree = True
    for _ in range(args.repeats):  # interleaved, so drift on the machine hits both alike
        t, hf_tokens = hf_generate(model_dir, prompts, args.new_tokens, args.threads)
        hf_times.append(t)
        t, our_tokens = engine_generate(model_dir, prompts, args.new_tokens, args.threads)
        engine_times.append(t)
        agree &= hf_tokens == our_tokens
    hf_best, ours_best = min(hf_times), min(engine_times)
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} threads={args.threads}".strip(),
        "model": str(model_dir) if args.model else "demo model (llama, hidden 256, 4 layers, vocab 2048)",
        "batch": args.batch, "new_tokens": args.new_tokens, "prompt_lengths": lengths,
        "transformers_tok_s": round(total / hf_best, 1), "engine_tok_s": round(total / ours_best, 1),
        "ratio": round(hf_best / ours_best, 2), "same_tokens": agree,
        "transformers_s": [round(x, 3) for x in hf_times], "engine_s": [round(x, 3) for x in engine_times],
        "torch": torch.__version__,
    }
    print(f"transformers.generate: {result['transformers_tok_s']:8.1f} tok/s")
    print(f"pdserve engine:        {result['engine_tok_s']:8.1f} tok/s")
    print(f"ratio (engine / transformers): {result['ratio']:.2f}x   identical tokens: {agree}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
