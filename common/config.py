"""The configuration tree: frozen dataclasses validated on construction.

Every component's options live here as one dataclass each. A CLI flag, an
environment variable and a Helm value map one-to-one onto a field:
``EngineConfig.max_num_batched_tokens`` is ``--max-num-batched-tokens`` and
``PDSERVE_ENGINE_MAX_NUM_BATCHED_TOKENS``. This is the only module that reads
environment variables (:func:`config_from_env`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from common.errors import ConfigError

T = TypeVar("T")

DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash_attn")
ROLES = ("colocated", "prefill", "decode")


def _check(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(message, field=field)


def check_field_types(obj: object) -> None:
    """Raise ConfigError naming the first field whose value does not have its annotated type."""
    cls = type(obj)
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        typ, optional = _field_type(cls, f)
        if value is None:
            ok = optional
        elif typ is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif typ is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif typing.get_origin(typ) is tuple:
            ok = isinstance(value, tuple)
        else:
            ok = isinstance(value, typ)
        if not ok:
            name = getattr(typ, "__name__", str(typ))
            raise ConfigError(f"must be {name}, got {type(value).__name__} {value!r}", field=f.name)


@dataclass(frozen=True)
class EngineConfig:
    """Options of one engine instance (one model replica on one device)."""

    model: str = ""
    """Hugging Face checkpoint directory (config.json, safetensors, tokenizer)."""
    dtype: str = "auto"
    """Weight and KV dtype: auto (the checkpoint's), float32, bfloat16, float16."""
    device: str = "auto"
    """auto (cuda if present, else cpu), cpu, cuda or cuda:N."""
    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = None
    """KV blocks to allocate; overrides kv_cache_memory_gib when set."""
    kv_cache_memory_gib: float | None = None
    """KV cache size; default: 256 MiB on CPU, gpu_memory_utilization of free memory on GPU."""
    gpu_memory_utilization: float = 0.9
    """Fraction of the GPU's memory the engine may use (weights + activations + KV)."""
    max_model_len: int | None = None
    """Longest context (prompt + output); default: the model's max_position_embeddings."""
    max_num_batched_tokens: int = 2048
    """Token budget of one engine step (decode tokens + prefill chunks)."""
    max_num_requests: int = 128
    """Most requests in the running batch (the static batch-size limit)."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes across requests."""
    attention_backend: str = "auto"
    """auto, torch (reference), triton or flash_attn."""
    batch_policy: str = "static"
    """Batch-size policy name (see common.batch_policy)."""
    enforce_eager: bool = False
    """Never use CUDA graphs."""
    seed: int = 0
    """Seed of the sampler's generator for unseeded random requests."""
    load_format: str = "safetensors"
    """safetensors (the checkpoint's weights) or dummy (random weights of the config's shape, for benchmarks)."""
    max_graph_batch_size: int = 256
    """Largest decode batch run under a CUDA graph (larger batches run eagerly)."""

    def __post_init__(self) -> None:
        check_field_types(self)
        _check(self.load_format in ("safetensors", "dummy"), "load_format",
               f"must be safetensors or dummy, got {self.load_format!r}")
        _check(self.max_graph_batch_size >= 1, "max_graph_batch_size", "must be positive")
        _check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               "device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _check(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0, "block_size",
               f"must be a positive power of two, got {self.block_size}")
        _check(self.num_blocks is None or self.num_blocks > 0, "num_blocks",
               f"must be positive, got {self.num_blocks}")
        _check(self.kv_cache_memory_gib is None or self.kv_cache_memory_gib > 0, "kv_cache_memory_gib",
               f"must be positive, got {self.kv_cache_memory_gib}")
        _check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization",
               f"must be in (0, 1], got {self.gpu_memory_utilization}")
        _check(self.max_model_len is None or self.max_model_len > 0, "max_model_len",
               f"must be positive, got {self.max_model_len}")
        _check(self.max_num_batched_tokens > 0, "max_num_batched_tokens",
               f"must be positive, got {self.max_num_batched_tokens}")
        _check(self.max_num_requests > 0, "max_num_requests",
               f"must be positive, got {self.max_num_requests}")
        _check(self.attention_backend in ATTENTION_BACKENDS, "attention_backend",
               f"must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        _check(bool(self.batch_policy), "batch_policy", "must name a policy")


KV_TRANSPORTS = ("grpc", "local", "nccl")


@dataclass(frozen=True)
class WorkerConfig:
    """Options of a prefill or decode worker process (the engine's are in EngineConfig)."""

    host: str = "127.0.0.1"
    """Address to serve gRPC on: the pod IP in Kubernetes; loopback by default."""
    port: int = 50051
    """gRPC port (0 picks a free one, printed at start)."""
    instance_id: str = ""
    """Name in load reports and KV events; default host:port."""
    metrics_port: int | None = None
    """Serve Prometheus /metrics on this port (same host)."""
    prefill_peers: tuple[str, ...] = ()
    """Decode role: the prefill workers (host:port) it may pull KV from; any other address is refused."""
    kv_transport: str = "grpc"
    """Default KV transport when a request names none: grpc, local or nccl."""
    kv_num_streams: int = 1
    """Parallel gRPC streams per KV transfer when a request names none."""
    kv_checksum: bool = True
    """Checksum KV payloads (headers are always checksummed)."""
    kv_transfer_timeout_s: float = 30.0
    """Deadline of one KV transfer, prefill compute included."""
    kv_lease_s: float = 30.0
    """Prefill role: how long a finished prefill's blocks wait for their consumer before being freed."""
    kv_nccl_message_mib: int = 64
    """Prefill role, nccl transport: a step's KV goes out in messages of about this size (whole layers)."""
    local_prefill_max_tokens: int = 32
    """Decode role: prompts with at most this many uncached tokens are prefilled locally."""
    local_prefill_min_cached_ratio: float = 0.9
    """Decode role: prompts at least this fraction cached locally are prefilled locally."""
    max_message_mib: int = 512
    """Largest gRPC message, both ways."""
    drain_timeout_s: float = 60.0
    """How long a drain waits for in-flight requests before giving up."""
    redis_url: str = ""
    """Register in this Redis (heartbeats) so routers discover the worker; decode workers also accept
    KV from every prefill worker registered there."""
    registry_ttl_s: float = 10.0
    """A registration not refreshed for this long expires."""
    advertise_address: str = ""
    """Address routers and peers should use (default host:port; set to the pod IP in Kubernetes)."""

    def __post_init__(self) -> None:
        check_field_types(self)
        _check(0 <= self.port < 65536, "port", f"must be in [0, 65535], got {self.port}")
        _check(self.metrics_port is None or 0 <= self.metrics_port < 65536, "metrics_port",
               f"must be in [0, 65535], got {self.metrics_port}")
        _check(self.kv_transport in KV_TRANSPORTS, "kv_transport",
               f"must be one of {KV_TRANSPORTS}, got {self.kv_transport!r}")
        _check(1 <= self.kv_num_streams <= 16, "kv_num_streams", f"must be in [1, 16], got {self.kv_num_streams}")
        _check(self.kv_transfer_timeout_s > 0, "kv_transfer_timeout_s", "must be positive")
        _check(self.kv_lease_s > 0, "kv_lease_s", "must be positive")
        _check(self.kv_nccl_message_mib > 0, "kv_nccl_message_mib", "must be positive")
        _check(self.local_prefill_max_tokens >= 0, "local_prefill_max_tokens", "must be >= 0")
        _check(0 < self.local_prefill_min_cached_ratio <= 1, "local_prefill_min_cached_ratio",
               "must be in (0, 1]")
        _check(self.max_message_mib > 0, "max_message_mib", "must be positive")
        _check(self.registry_ttl_s > 0, "registry_ttl_s", "must be positive")
        for peer in self.prefill_peers:
            host, sep, port = peer.rpartition(":")
            _check(bool(sep and host and port.isdigit()), "prefill_peers", f"{peer!r} is not host:port")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


DISCOVERY_KINDS = ("static", "redis", "kubernetes", "file")


@dataclass(frozen=True)
class RouterConfig:
    """Options of a router process (the routing policy's knobs are router.routing_config.RoutingConfig)."""

    host: str = "127.0.0.1"
    """Address of the HTTP (OpenAI) API."""
    port: int = 8000
    """HTTP port (0 picks a free one)."""
    grpc_port: int | None = None
    """Serve the gRPC API on this port too."""
    model: str = ""
    """Checkpoint directory the tokenizer, chat template and context length come from."""
    served_model_name: str = ""
    """Model id clients send (default: the checkpoint directory's name)."""
    max_model_len: int | None = None
    """Context limit to enforce (default: the model's max_position_embeddings)."""
    api_keys: tuple[str, ...] = ()
    """API keys (set only through PDSERVE_ROUTER_API_KEYS, comma-separated, never a flag)."""
    api_keys_file: str = ""
    """File with one API key per line."""
    max_body_bytes: int = 8 * 2**20
    """Largest request body (413 above)."""
    max_n: int = 8
    """Largest `n` a request may ask for."""
    max_concurrency: int = 256
    """Requests (choices) in flight before new ones get 429."""
    max_migrations: int = 2
    """Times a request may move to another decode worker after one fails."""
    request_timeout_s: float = 600.0
    """Deadline of one request on a decode worker."""
    keep_alive_s: float = 75.0
    """How long an idle HTTP connection stays open. Longer than the idle timeouts of the load balancers and
    clients in front (60 s is common), so the router never closes a connection a client is about to reuse."""
    discovery: str = "static"
    """Where workers come from: static, redis, kubernetes or file."""
    workers: str = ""
    """Static discovery: 'prefill=host:port,...;decode=host:port,...'."""
    workers_file: str = ""
    """File discovery: a JSON list of {instance_id, role, address}, re-read when it changes."""
    redis_url: str = ""
    """Redis for discovery (redis) and for state shared between router replicas."""
    router_id: str = ""
    """This replica's name in shared state (default: host:port)."""
    k8s_namespace: str = ""
    """Kubernetes discovery: namespace of the worker EndpointSlices (default: this pod's, else the kubeconfig
    context's, else ``default``)."""
    k8s_prefill_selector: str = "app.kubernetes.io/component=prefill"
    k8s_decode_selector: str = "app.kubernetes.io/component=decode"
    k8s_port_name: str = "grpc"
    cost_model: str = ""
    """JSON cost model written by `pdserve profile` (default: router/cost_models/demo_cpu.json, the demo
    model measured on a small CPU)."""
    kv_transport: str = "grpc"
    """KV transport asked of decode workers: grpc, local or nccl."""
    kv_num_streams: int = 1
    load_interval_ms: int = 100
    """How often workers send load reports."""

    def __post_init__(self) -> None:
        check_field_types(self)
        _check(0 <= self.port < 65536, "port", f"must be in [0, 65535], got {self.port}")
        _check(self.grpc_port is None or 0 <= self.grpc_port < 65536, "grpc_port", "must be in [0, 65535]")
        _check(self.max_body_bytes >= 1024, "max_body_bytes", "must be at least 1024")
        _check(1 <= self.max_n <= 128, "max_n", f"must be in [1, 128], got {self.max_n}")
        _check(self.max_concurrency >= 1, "max_concurrency", "must be positive")
        _check(self.max_migrations >= 0, "max_migrations", "must be >= 0")
        _check(self.request_timeout_s > 0, "request_timeout_s", "must be positive")
        _check(self.keep_alive_s > 0, "keep_alive_s", "must be positive")
        _check(self.discovery in DISCOVERY_KINDS, "discovery", f"must be one of {DISCOVERY_KINDS}")
        _check(self.discovery != "redis" or bool(self.redis_url), "redis_url", "required with discovery=redis")
        _check(self.kv_transport in KV_TRANSPORTS, "kv_transport", f"must be one of {KV_TRANSPORTS}")
        _check(1 <= self.kv_num_streams <= 16, "kv_num_streams", "must be in [1, 16]")
        _check(10 <= self.load_interval_ms <= 10_000, "load_interval_ms", "must be in [10, 10000]")


# --- mapping onto CLI flags and environment variables -------------------------------------------


def _field_type(cls: type, f: dataclasses.Field) -> tuple[type, bool]:
    """(scalar type, optional) of a dataclass field, resolving string annotations."""
    hint = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return hint, False


def _parse_value(cls: type, f: dataclasses.Field, raw: str) -> Any:
    typ, optional = _field_type(cls, f)
    if optional and raw.lower() in ("", "none", "null"):
        return None
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ in (int, float, str):
            return typ(raw)
        if typing.get_origin(typ) is tuple:
            elem = typing.get_args(typ)[0]
            return tuple(elem(x) for x in raw.split(",") if x.strip())
    except ValueError as e:
        raise ConfigError(f"cannot parse {raw!r} as {getattr(typ, '__name__', typ)}",
                          field=f.name) from e
    raise ConfigError(f"unsupported field type {typ}", field=f.name)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                    prefix: str = "", title: str | None = None) -> None:
    """Add one ``--flag`` per field of ``cls``; defaults stay unset so env and file can fill them.

    ``prefix`` goes before every flag and ``args`` attribute (``prefix="tls_"``: ``--tls-cert``);
    pass the same one to :func:`build_config`."""
    group = parser.add_argument_group(title or cls.__name__)
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        typ, _ = _field_type(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = f"{docs.get(f.name, '')} (default: {default})"
        name = prefix + f.name
        if typ is bool:
            group.add_argument(_flag(name), dest=name, default=None,
                               action=argparse.BooleanOptionalAction, help=help_)
        else:
            group.add_argument(_flag(name), dest=name, default=None, metavar=f.name.upper(), help=help_)


def config_flags(values: Mapping[str, Any]) -> list[str]:
    """The inverse of :func:`add_config_args`: ``{"max_num_batched_tokens": 512, "enable_prefix_caching":
    False}`` -> ``["--max-num-batched-tokens", "512", "--no-enable-prefix-caching"]`` (None is left out,
    lists are joined with commas as the parser splits them)."""
    flags: list[str] = []
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(_flag(name if value else "no_" + name))
        elif isinstance(value, (list, tuple)):
            flags += [_flag(name), ",".join(str(v) for v in value)]
        else:
            flags += [_flag(name), str(value)]
    return flags


def _field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal under each field) for --help."""
    import ast
    import inspect

    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name)
                and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            docs[prev.target.id] = node.value.value.strip()
    return docs


def env_prefix(cls: type) -> str:
    """``EngineConfig`` -> ``PDSERVE_ENGINE_``."""
    name = cls.__name__.removesuffix("Config")
    snake = "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
    return f"PDSERVE_{snake.upper()}_"


def config_from_env(cls: type[T], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Field values set through ``PDSERVE_<COMPONENT>_<FIELD>`` environment variables."""
    environ = os.environ if environ is None else environ
    prefix = env_prefix(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        raw = environ.get(prefix + f.name.upper())
        if raw is not None:
            out[f.name] = _parse_value(cls, f, raw)
    return out


def build_config(cls: type[T], args: argparse.Namespace | None = None, *,
                 environ: Mapping[str, str] | None = None, prefix: str = "", **overrides: Any) -> T:
    """Defaults < environment < CLI flags (``args``, attributes named ``prefix + field``) < overrides."""
    values: dict[str, Any] = config_from_env(cls, environ)
    if args is not None:
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            raw = getattr(args, prefix + f.name, None)
            if raw is not None:
                values[f.name] = raw if not isinstance(raw, str) else _parse_value(cls, f, raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(f"unknown option for {cls.__name__}", field=name)
    return cls(**values)
