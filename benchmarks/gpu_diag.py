"""GPU smoke scenarios, each in its own process (a CUDA fault kills only its scenario).

    CUDA_LAUNCH_BLOCKING=1 python benchmarks/gpu_diag.py [SCENARIO ...]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tiny(kind="llama_gqa", dtype="float32"):
    from tests.conftest import build_tiny_model

    return build_tiny_model(Path(tempfile.mkdtemp()), kind)


def run_llm(model, **kw):
    from engine import LLM, SamplingParams
    from tests.hf_reference import random_prompts

    llm = LLM(str(model), device="cuda", num_blocks=512, **kw)
    prompts = random_prompts([1, 7, 33, 100, 250, 17, 64, 5], 512, seed=1)
    out = llm.generate(prompt_token_ids=prompts, sampling=SamplingParams(max_tokens=24, temperature=0.0,
                                                                         ignore_eos=True))
    return [o.token_ids for o in out]


def s_fused():
    import torch

    from engine.models import fused

    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(37, 4096, device="cuda", dtype=dtype)
        r = torch.randn_like(x)
        w = torch.randn(4096, device="cuda", dtype=dtype)
        out, res = fused.add_rms_norm(x, r.clone(), w, 1e-5)
        ref = fused.rms_norm_ref(x + r, w, 1e-5)
        print("rmsnorm", dtype, (out.float() - ref.float()).abs().max().item(), (res - (x + r)).abs().max().item())
        q = torch.randn(37, 32, 128, device="cuda", dtype=dtype)
        k = torch.randn(37, 8, 128, device="cuda", dtype=dtype)
        cos = torch.randn(4096, 128, device="cuda", dtype=dtype)
        sin = torch.randn_like(cos)
        pos = torch.randint(0, 4096, (37,), device="cuda")
        a = fused.rotary(q.clone(), k.clone(), cos, sin, pos)
        b = fused.rotary_ref(q, k, cos, sin, pos)
        print("rotary", dtype, (a[0].float() - b[0].float()).abs().max().item())
        g = torch.randn(37, 2 * 14336, device="cuda", dtype=dtype)
        print("silu", dtype, (fused.silu_and_mul(g).float() - (torch.nn.functional.silu(g[:, :14336]) * g[:, 14336:])
                                 .float()).abs().max().item())


def s_tiny_fp32_eager():
    print(run_llm(tiny(), dtype="float32", enforce_eager=True)[:2])


def s_tiny_fp32_graph():
    print(run_llm(tiny(), dtype="float32")[:2])


def s_tiny_bf16_graph_vs_eager():
    m = tiny()
    a = run_llm(m, dtype="bfloat16")
    b = run_llm(m, dtype="bfloat16", enforce_eager=True)
    print("graph == eager:", a == b)


def _big(eager: bool, batch: int):
    from benchmarks.gpu_engine import decode_steps, write_config
    from common.config import EngineConfig
    from engine.core import EngineCore

    d = write_config(Path(tempfile.mkdtemp()) / "m")
    core = EngineCore(EngineConfig(model=str(d), dtype="bfloat16", load_format="dummy", device="cuda",
                                   max_num_batched_tokens=8192, max_num_requests=128, max_model_len=16384,
                                   max_graph_batch_size=128, enforce_eager=eager, kv_cache_memory_gib=40))
    for b in (1, batch):
        t, _ = decode_steps(core, b, 1024, 16, seed=b)
        print(f"batch {b} eager={eager}: {t * 1e3:.2f} ms/step")


def s_big_eager():
    _big(True, 8)


def s_big_graph():
    _big(False, 8)


def s_graph_no_fused():
    from engine.models import fused

    fused.enabled = lambda x: False
    print(run_llm(tiny(), dtype="bfloat16")[:1])


def s_graph_one_split():
    import engine.attention.triton_backend as tb

    orig = tb.TritonAttentionBackend.__init__
    tb.TritonAttentionBackend.__init__ = lambda self, **kw: orig(self, max_splits=1)
    print(run_llm(tiny(), dtype="bfloat16")[:1])


def s_graph_replay_warmup_data():
    import torch

    from common.config import EngineConfig
    from engine.core import EngineCore

    core = EngineCore(EngineConfig(model=str(tiny()), dtype="bfloat16", device="cuda", num_blocks=512,
                                   max_graph_batch_size=8))
    g = core.runner.graphs
    for size, (graph, _, _) in g._graphs.items():
        graph.replay()
        torch.cuda.synchronize()
        print("replayed padding-only", size)
    import numpy as np

    logits = g.run(np.array([5]), np.array([0]), [[3]], np.array([48]))
    torch.cuda.synchronize()
    print("one real row", logits.shape)


def s_graph_attention_only():
    import numpy as np
    import torch

    from engine.attention.triton_backend import TritonAttentionBackend

    be = TritonAttentionBackend()
    cache = torch.randn(2, 64, 16, 2, 32, device="cuda", dtype=torch.bfloat16)
    bt = torch.zeros(4, 16, dtype=torch.int32, device="cuda")
    sl = torch.zeros(4, dtype=torch.int32, device="cuda")
    sm = torch.full((4,), -1, dtype=torch.int64, device="cuda")
    meta = be.build_decode_metadata(bt, sl, sm)
    q = torch.randn(4, 8, 32, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4, 2, 32, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    be.forward(q, k, v, cache, meta, scale=0.2, sliding_window=None)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = be.forward(q, k, v, cache, meta, scale=0.2, sliding_window=None)
    bt.copy_(torch.arange(64, dtype=torch.int32, device="cuda").view(4, 16))
    sl.copy_(torch.tensor([5, 20, 0, 33], dtype=torch.int32))
    sm.copy_(torch.tensor([4, 16 * 16 + 19, -1, 32 * 16 + 32], dtype=torch.int64))
    graph.replay()
    torch.cuda.synchronize()
    print("attention graph ok", out.float().abs().sum().item(), np.isfinite(out.float().cpu().numpy()).all())


SCENARIOS = {name[2:]: fn for name, fn in list(globals().items()) if name.startswith("s_")}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        try:
            SCENARIOS[sys.argv[2]]()
            print("SCENARIO OK", flush=True)
        except BaseException:  # noqa: BLE001 (reported, then the next scenario runs)
            traceback.print_exc()
            print("SCENARIO FAILED", flush=True)
        return
    for name in sys.argv[1:] or SCENARIOS:
        start = time.time()
        p = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, timeout=300)
        lines = (p.stdout + p.stderr).splitlines()
        keep = [ln for ln in lines if not ln.startswith("frame #") and "Extension modules" not in ln]
        print(f"=== {name} ({time.time() - start:.0f}s, rc {p.returncode})")
        print("\n".join(keep[-25:]), flush=True)


if __name__ == "__main__":
    main()
