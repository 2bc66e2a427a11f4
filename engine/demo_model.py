"""A tiny random Llama checkpoint that needs no model hub.

Owns writing the demo model: a complete Hugging Face Llama checkpoint directory
(``config.json``, ``generation_config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``) with random weights and a byte-level BPE tokenizer trained on
``demo_corpus.txt``. Tests, the quick start and CI use it wherever a real model would
need a download. The output is deterministic: the same arguments give byte-identical
files on every run, so tests can compare against Hugging Face ``transformers`` and
caches keyed by content stay valid.

Lifecycle: ``ensure_demo_model`` writes the checkpoint once into a temporary directory
and renames it into place, so a crash never leaves half a model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

BOS_TOKEN = "<|begin_of_text|>"
END_OF_TEXT_TOKEN = "<|end_of_text|>"
EOT_TOKEN = "<|eot_id|>"
SPECIAL_TOKENS = (BOS_TOKEN, END_OF_TEXT_TOKEN, EOT_TOKEN, "<|start_header_id|>", "<|end_header_id|>")

# Llama 3's pre-tokenizer split: contractions, words, up to 3 digits, punctuation runs, whitespace.
_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = """\
{{- bos_token }}
{%- if tools is not none and tools | length > 0 %}
    {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
    {{- 'You may call these functions. Answer with a JSON object {"name": ..., "arguments": ...}.\\n\\n' }}
    {%- for tool in tools %}
        {{- tool | tojson(indent=2) + '\\n\\n' }}
    {%- endfor %}
    {{- '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] | trim }}
    {%- else %}
        {%- for part in message['content'] %}
            {%- if part['type'] == 'text' %}
                {{- part['text'] | trim }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


def default_demo_model_dir() -> Path:
    """Where ``ensure_demo_model`` puts the demo model unless told otherwise."""
    return Path.home() / ".cache" / "pdserve" / "demo-model"


def ensure_demo_model(path: str | os.PathLike[str] | None = None) -> Path:
    """Return a directory holding the demo model, writing it first if ``config.json`` is missing.

    The model is written to a sibling temporary directory and renamed into place, so
    concurrent callers and crashes never expose a partial checkpoint.
    """
    target = Path(path) if path is not None else default_demo_model_dir()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write_demo_model(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / "config.json").is_file():  # another process won the race
            return target
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_demo_model(
    path: str | os.PathLike[str],
    *,
    vocab_size: int = 2048,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 8,
    num_kv_heads: int = 4,
    intermediate_size: int = 768,
    max_position_embeddings: int = 4096,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write a random Llama checkpoint with a trained tokenizer into ``path`` and return it."""
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    bos_id, end_id, eot_id = write_demo_tokenizer(out, vocab_size, max_position_embeddings)
    head_dim = hidden_size // num_heads
    rope_theta = 500000.0
    _write_json(out / "config.json", {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": end_id,
        "pad_token_id": None,
        "torch_dtype": dtype,
        "dtype": dtype,
    })
    _write_json(out / "generation_config.json", {
        "bos_token_id": bos_id,
        "eos_token_id": [end_id, eot_id],
        "do_sample": False,
    })
    weights = _random_weights(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads,
                              intermediate_size, seed, getattr(torch, dtype))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def write_demo_tokenizer(out: Path, vocab_size: int, model_max_length: int) -> tuple[int, int, int]:
    """Write the demo tokenizer (``tokenizer.json``, ``tokenizer_config.json``); returns (bos, end, eot) ids."""
    tokenizer = build_demo_tokenizer(vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOT_TOKEN,
        "pad_token": END_OF_TEXT_TOKEN,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
    })
    return ids[BOS_TOKEN], ids[END_OF_TEXT_TOKEN], ids[EOT_TOKEN]


def build_demo_tokenizer(vocab_size: int) -> HFTokenizer:
    """Train the demo byte-level BPE and pad it with reserved special tokens to ``vocab_size``.

    The layout follows Llama 3: learned tokens first, then the named special tokens, then
    ``<|reserved_special_token_N|>`` up to the model's vocabulary size.
    """
    corpus = (Path(__file__).parent / "demo_corpus.txt").read_text(encoding="utf-8")
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([corpus], trainer=trainer)
    num_reserved = vocab_size - tokenizer.get_vocab_size() - len(SPECIAL_TOKENS)
    if num_reserved < 0:
        raise ValueError(f"vocab_size {vocab_size} is too small for the byte alphabet and special tokens")
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(num_reserved)]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in (*SPECIAL_TOKENS, *reserved)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, tokenizer.token_to_id(BOS_TOKEN))],
    )
    assert tokenizer.get_vocab_size() == vocab_size
    return tokenizer


def _random_weights(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                    num_kv_heads: int, intermediate_size: int, seed: int,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    head_dim = hidden_size // num_heads

    def normal(*shape: int) -> torch.Tensor:
        return torch.empty(shape).normal_(0.0, 0.02, generator=generator).to(dtype)

    def ones(size: int) -> torch.Tensor:
        return torch.ones(size, dtype=dtype)

    weights = {"model.embed_tokens.weight": normal(vocab_size, hidden_size)}
    for i in range(num_layers):
        prefix = f"model.layers.{i}"
        weights |= {
            f"{prefix}.self_attn.q_proj.weight": normal(num_heads * head_dim, hidden_size),
            f"{prefix}.self_attn.k_proj.weight": normal(num_kv_heads * head_dim, hidden_size),
            f"{prefix}.self_attn.v_proj.weight": normal(num_kv_heads * head_dim, hidden_size),
            f"{prefix}.self_attn.o_proj.weight": normal(hidden_size, num_heads * head_dim),
            f"{prefix}.mlp.gate_proj.weight": normal(intermediate_size, hidden_size),
            f"{prefix}.mlp.up_proj.weight": normal(intermediate_size, hidden_size),
            f"{prefix}.mlp.down_proj.weight": normal(hidden_size, intermediate_size),
            f"{prefix}.input_layernorm.weight": ones(hidden_size),
            f"{prefix}.post_attention_layernorm.weight": ones(hidden_size),
        }
    weights["model.norm.weight"] = ones(hidden_size)
    weights["lm_head.weight"] = normal(vocab_size, hidden_size)
    return weights


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
