"""Build a :class:`CausalLM` from a Hugging Face checkpoint directory.

Reads one ``*.safetensors`` file or many (through ``model.safetensors.index.json``),
maps Hugging Face parameter names onto ours (q/k/v and gate/up go into slices
of the fused projections), casts to the requested dtype, and refuses a
checkpoint with missing or unexpected weights rather than run with random ones.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from common.errors import ConfigError
from engine.models.config import ModelConfig
from engine.models.transformer import CausalLM

_FUSED = re.compile(r"^(model\.layers\.\d+)\.(self_attn|mlp)\.(q|k|v|gate|up)_proj\.(weight|bias)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(requested: str, config: ModelConfig) -> torch.dtype:
    name = config.torch_dtype if requested == "auto" else requested
    if name not in DTYPES:
        raise ConfigError(f"unsupported dtype {name!r}", field="dtype")
    return DTYPES[name]


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors files in {model_dir}", field="model")
    return files


def iter_checkpoint(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in _checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)


def _target(name: str, config: ModelConfig) -> tuple[str, int, int]:
    """Our parameter name and the row slice [start, end) a checkpoint tensor fills."""
    m = _FUSED.match(name)
    if m is None:
        return name, 0, -1
    prefix, block, proj, kind = m.groups()
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    if block == "self_attn":
        start, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[proj]
        return f"{prefix}.self_attn.qkv_proj.{kind}", start, start + size
    start = 0 if proj == "gate" else inter
    return f"{prefix}.mlp.gate_up_proj.{kind}", start, start + inter


def load_model(model_dir: str | Path, config: ModelConfig, *, dtype: torch.dtype, device: torch.device,
               max_position: int, load_format: str = "safetensors") -> CausalLM:
    """The model with the checkpoint's weights, or random ones of the same shape (``load_format="dummy"``)."""
    model_dir = Path(model_dir)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = CausalLM(config, max_position)
    finally:
        torch.set_default_dtype(default)
    model.rotary.to(dtype)
    if load_format == "dummy":
        return _randomize(model).eval()
    params = dict(model.named_parameters())
    filled: dict[str, int] = {name: 0 for name in params}
    for name, tensor in iter_checkpoint(model_dir):
        if _IGNORED.search(name):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        pname, start, end = _target(name, config)
        param = params.get(pname)
        if param is None:
            raise ConfigError(f"unexpected weight {name!r} in checkpoint", field="model")
        dest = param.data if end < 0 else param.data[start:end]
        if dest.shape != tensor.shape:
            raise ConfigError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected "
                              f"{tuple(dest.shape)}", field="model")
        dest.copy_(tensor.to(dtype))
        filled[pname] += dest.shape[0] if dest.dim() else 1
    missing = [n for n, p in params.items() if filled[n] != (p.shape[0] if p.dim() else 1)]
    if missing:
        raise ConfigError(f"checkpoint lacks weights for {missing[:5]}", field="model")
    return model.eval()


@torch.no_grad()
def _randomize(model: CausalLM) -> CausalLM:
    """Weights drawn as Hugging Face initialises them (normal, std 0.02; norms 1; biases 0)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=generator)
    return model
