"""The ``pdserve`` command as a user runs it: subprocesses of ``python -m cli.main``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import build_parser, main

REPO_ROOT = Path(__file__).resolve().parents[2]


def pdserve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDSERVE_")}
    clean.update(env or {})
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO_ROOT, env=clean,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "demo"
    result = pdserve("demo-model", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(path)
    return path


def test_demo_model_writes_a_checkpoint(demo_dir: Path) -> None:
    assert {p.name for p in demo_dir.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_generate_prints_a_completion(demo_dir: Path) -> None:
    result = pdserve("generate", "--model", str(demo_dir), "--prompt", "hi", "--max-tokens", "4",
                     "--num-blocks", "64", "--ignore-eos")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.strip().splitlines()
    assert line.startswith("'hi' -> '") and line.endswith("(4 tokens, finish_reason=length)")


def test_environment_applies_and_flags_win(demo_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("PDSERVE_ENGINE_BLOCK_SIZE", "3")
    assert main(["generate", "--model", str(demo_dir), "--max-tokens", "1"]) == 2
    assert "error: block_size:" in capsys.readouterr().err
    result = pdserve("generate", "--model", str(demo_dir), "--prompt", "a", "--prompt", "b c", "--max-tokens",
                     "2", "--block-size", "8", "--num-blocks", "64", "--ignore-eos",
                     env={"PDSERVE_ENGINE_BLOCK_SIZE": "3"})
    assert result.returncode == 0, result.stderr
    assert [line.split(" -> ")[0] for line in result.stdout.strip().splitlines()] == ["'a'", "'b c'"]


def test_bad_flag_value_exits_non_zero_naming_the_field(tmp_path: Path) -> None:
    result = pdserve("generate", "--model", str(tmp_path), "--block-size", "3")
    assert result.returncode != 0
    assert "error: block_size:" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("argv, field", [
    (["--block-size", "abc"], "block_size"),
    (["--dtype", "float8"], "dtype"),
    (["--max-num-batched-tokens", "0"], "max_num_batched_tokens"),
    (["--gpu-memory-utilization", "1.01"], "gpu_memory_utilization"),
    (["--enable-prefix-caching", "--device", "tpu"], "device"),
])
def test_bad_flag_values_in_process(argv: list[str], field: str, tmp_path: Path, capsys) -> None:
    assert main(["generate", "--model", str(tmp_path), *argv]) == 2
    assert f"error: {field}:" in capsys.readouterr().err


def test_parser_maps_every_engine_field_to_a_flag() -> None:
    args = build_parser().parse_args(["generate", "--max-num-batched-tokens", "64", "--no-enable-prefix-caching"])
    assert args.max_num_batched_tokens == "64" and args.enable_prefix_caching is False
    assert args.block_size is None  # unset flags leave room for the environment
