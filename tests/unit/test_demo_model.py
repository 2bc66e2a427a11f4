"""engine.demo_model: deterministic files that transformers loads as a Llama checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from common.tokenizer import Tokenizer
from engine.demo_model import default_demo_model_dir, ensure_demo_model, write_demo_model

SMALL = {"vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
         "intermediate_size": 128}
EXPECTED_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("demo"))


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_writes_are_byte_identical_and_fast(model_dir: Path, tmp_path: Path) -> None:
    start = time.perf_counter()
    again = write_demo_model(tmp_path / "again")
    assert time.perf_counter() - start < 5.0
    assert set(_files(model_dir)) == EXPECTED_FILES
    assert _files(again) == _files(model_dir)


def test_seed_and_sizes_change_the_weights(model_dir: Path, tmp_path: Path) -> None:
    other = write_demo_model(tmp_path / "seed1", seed=1)
    assert (other / "model.safetensors").read_bytes() != (model_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    small = write_demo_model(tmp_path / "small", **SMALL)
    assert Tokenizer.from_dir(small).vocab_size == 512


def test_config_fields(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_theta"] == 500000.0
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    assert config["tie_word_embeddings"] is False
    hf_config = AutoConfig.from_pretrained(model_dir)
    assert hf_config.rope_parameters["rope_theta"] == 500000.0
    assert hf_config.num_key_value_heads == 4 and hf_config.head_dim == 32


def test_weights_have_the_documented_distribution(model_dir: Path) -> None:
    weights = load_file(str(model_dir / "model.safetensors"))
    assert len(weights) == 2 + 1 + 4 * 9
    assert torch.equal(weights["model.norm.weight"], torch.ones(256))
    assert torch.equal(weights["model.layers.3.post_attention_layernorm.weight"], torch.ones(256))
    embed = weights["model.embed_tokens.weight"]
    assert embed.shape == (2048, 256) and embed.dtype == torch.float32
    assert abs(embed.std().item() - 0.02) < 1e-3
    assert not torch.equal(embed, weights["lm_head.weight"])
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (128, 256)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (256, 768)


def test_hf_model_loads_without_missing_keys_and_runs(model_dir: Path) -> None:
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float32
    saved = load_file(str(model_dir / "model.safetensors"))
    assert torch.equal(model.lm_head.weight, saved["lm_head.weight"])
    tokenizer = Tokenizer.from_dir(model_dir)
    ids = torch.tensor([tokenizer.encode("The KV cache holds keys and values.")])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 2048)
    assert torch.isfinite(logits).all()


def test_bfloat16_checkpoint_loads(tmp_path: Path) -> None:
    path = write_demo_model(tmp_path / "bf16", dtype="bfloat16", **SMALL)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16
    assert load_file(str(path / "model.safetensors"))["lm_head.weight"].dtype == torch.bfloat16


def test_hf_tokenizer_and_generation_config(model_dir: Path) -> None:
    hf = AutoTokenizer.from_pretrained(model_dir)
    assert len(hf) == 2048
    assert hf.bos_token == "<|begin_of_text|>" and hf.eos_token == "<|eot_id|>"
    ids = hf.encode("Hello, world!")
    assert ids[0] == hf.bos_token_id and hf.decode(ids, skip_special_tokens=True) == "Hello, world!"
    for token in ("<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"):
        assert hf.encode(token, add_special_tokens=False) == [hf.convert_tokens_to_ids(token)]
    chat = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                  add_generation_prompt=True)
    assert chat == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    generation = GenerationConfig.from_pretrained(model_dir)
    assert generation.eos_token_id == [hf.convert_tokens_to_ids("<|end_of_text|>"), hf.eos_token_id]
    assert Tokenizer.from_dir(model_dir).eos_token_ids == set(generation.eos_token_id)


def test_ensure_demo_model_writes_once(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "demo-model"
    assert ensure_demo_model(target) == target
    assert set(_files(target)) == EXPECTED_FILES
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model(target) == target
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in target.parent.iterdir()] == ["demo-model"]  # no temporary dirs left


def test_ensure_demo_model_replaces_an_empty_dir(tmp_path: Path) -> None:
    target = tmp_path / "demo-model"
    target.mkdir()
    ensure_demo_model(target)
    assert (target / "config.json").is_file()


def test_default_dir() -> None:
    assert default_demo_model_dir() == Path.home() / ".cache" / "pdserve" / "demo-model"
