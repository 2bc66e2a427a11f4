"""EngineConfig validation and the defaults < environment < CLI flags < overrides precedence."""

from __future__ import annotations

import argparse

import pytest

from common.config import EngineConfig, add_config_args, build_config, config_from_env, env_prefix
from common.errors import ConfigError


@pytest.mark.parametrize("field, value", [
    ("dtype", "float8"),
    ("device", "tpu"),
    ("block_size", 0),
    ("block_size", 3),
    ("block_size", -16),
    ("num_blocks", 0),
    ("kv_cache_memory_gib", 0.0),
    ("gpu_memory_utilization", 0.0),
    ("gpu_memory_utilization", 1.5),
    ("max_model_len", 0),
    ("max_num_batched_tokens", 0),
    ("max_num_requests", -1),
    ("attention_backend", "cudnn"),
])
def test_invalid_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        EngineConfig(**{field: value})
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")
    assert repr(value) in err.value.message or str(value) in err.value.message


@pytest.mark.parametrize("field, value", [
    ("dtype", "bfloat16"), ("device", "cuda:1"), ("block_size", 1), ("block_size", 256), ("num_blocks", 1),
    ("gpu_memory_utilization", 1.0), ("max_model_len", None), ("attention_backend", "torch"),
])
def test_valid_edge_values(field: str, value: object) -> None:
    assert getattr(EngineConfig(**{field: value}), field) == value


def test_config_is_frozen() -> None:
    config = EngineConfig()
    with pytest.raises(AttributeError):
        config.block_size = 32  # type: ignore[misc]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_args(parser, EngineConfig)
    return parser.parse_args(argv)


def test_env_prefix_and_names() -> None:
    assert env_prefix(EngineConfig) == "PDSERVE_ENGINE_"
    env = {"PDSERVE_ENGINE_MAX_NUM_BATCHED_TOKENS": "64", "PDSERVE_ENGINE_ENABLE_PREFIX_CACHING": "off",
           "PDSERVE_ENGINE_MAX_MODEL_LEN": "none", "PDSERVE_ENGINE_GPU_MEMORY_UTILIZATION": "0.5",
           "PDSERVE_ENGINE_DTYPE": "bfloat16", "PDSERVE_OTHER_BLOCK_SIZE": "8", "BLOCK_SIZE": "8"}
    assert config_from_env(EngineConfig, env) == {
        "max_num_batched_tokens": 64, "enable_prefix_caching": False, "max_model_len": None,
        "gpu_memory_utilization": 0.5, "dtype": "bfloat16"}


def test_precedence_defaults_env_flags_overrides() -> None:
    env = {"PDSERVE_ENGINE_BLOCK_SIZE": "32", "PDSERVE_ENGINE_MAX_NUM_REQUESTS": "7"}
    assert build_config(EngineConfig, environ={}).block_size == 16
    from_env = build_config(EngineConfig, _parse([]), environ=env)
    assert (from_env.block_size, from_env.max_num_requests) == (32, 7)
    flags = build_config(EngineConfig, _parse(["--block-size", "8"]), environ=env)
    assert (flags.block_size, flags.max_num_requests) == (8, 7)  # the flag wins; env fills the rest
    assert build_config(EngineConfig, _parse(["--block-size", "8"]), environ=env, block_size=64).block_size == 64
    assert build_config(EngineConfig, _parse([]), environ=env, block_size=None).block_size == 32


def test_real_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_ENGINE_BLOCK_SIZE", "4")
    assert build_config(EngineConfig).block_size == 4
    assert build_config(EngineConfig, _parse(["--block-size", "2"])).block_size == 2


def test_boolean_and_optional_flags() -> None:
    env = {"PDSERVE_ENGINE_ENABLE_PREFIX_CACHING": "false", "PDSERVE_ENGINE_NUM_BLOCKS": "100"}
    assert build_config(EngineConfig, _parse([]), environ=env).enable_prefix_caching is False
    config = build_config(EngineConfig, _parse(["--enable-prefix-caching", "--num-blocks", "none"]), environ=env)
    assert config.enable_prefix_caching is True and config.num_blocks is None
    assert build_config(EngineConfig, _parse(["--no-enforce-eager"]), environ={}).enforce_eager is False


@pytest.mark.parametrize("env, argv, field", [
    ({"PDSERVE_ENGINE_BLOCK_SIZE": "abc"}, [], "block_size"),  # unparsable
    ({"PDSERVE_ENGINE_BLOCK_SIZE": "3"}, [], "block_size"),  # parsed, then invalid
    ({}, ["--max-num-requests", "1.5"], "max_num_requests"),
    ({}, ["--gpu-memory-utilization", "2"], "gpu_memory_utilization"),
    ({"PDSERVE_ENGINE_ENABLE_PREFIX_CACHING": "maybe"}, [], "enable_prefix_caching"),
    ({"PDSERVE_ENGINE_DTYPE": "int8"}, ["--block-size", "8"], "dtype"),
])
def test_bad_values_from_env_or_flags_name_the_field(env: dict, argv: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(EngineConfig, _parse(argv), environ=env)
    assert err.value.field == field


def test_a_good_flag_overrides_a_bad_env_value() -> None:
    env = {"PDSERVE_ENGINE_BLOCK_SIZE": "3"}
    assert build_config(EngineConfig, _parse(["--block-size", "8"]), environ=env).block_size == 8


def test_unknown_override_names_the_option() -> None:
    with pytest.raises(ConfigError) as err:
        build_config(EngineConfig, environ={}, blocksize=8)
    assert err.value.field == "blocksize"


def test_config_flags_is_the_inverse_of_the_parser() -> None:
    """What ray_serve passes a worker's command line parses back to the same values (None left out)."""
    from common.config import WorkerConfig, config_flags

    values = {"port": 5123, "kv_checksum": False, "prefill_peers": ("10.0.0.1:5001", "10.0.0.2:5001"),
              "kv_lease_s": 2.5, "redis_url": None}
    flags = config_flags(values)
    assert "--no-kv-checksum" in flags and "--redis-url" not in flags
    parser = argparse.ArgumentParser()
    add_config_args(parser, WorkerConfig)
    config = build_config(WorkerConfig, parser.parse_args(flags), environ={})
    assert {name: getattr(config, name) for name in values} == {**values, "redis_url": WorkerConfig().redis_url}
