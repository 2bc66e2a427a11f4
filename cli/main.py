"""The ``pdserve`` command: one subcommand per process kind or tool.

Subcommands import their component lazily, so ``pdserve --help`` and the
torch-free ones (router, autoscaler, simulator) never import torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from common.config import EngineConfig, add_config_args, build_config
from common.errors import PdserveError

Handler = Callable[[argparse.Namespace], int]


def _cmd_demo_model(args: argparse.Namespace) -> int:
    from engine.demo_model import write_demo_model

    path = write_demo_model(args.dir)
    print(path)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from common.sampling import SamplingParams
    from engine import LLM
    from engine.demo_model import ensure_demo_model

    if not args.model:
        args.model = str(ensure_demo_model())
    config = build_config(EngineConfig, args)
    llm = LLM(config.model, **{k: v for k, v in vars(config).items() if k != "model"})
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed_request, stop=args.stop or None,
                              ignore_eos=args.ignore_eos)
    prompts = args.prompt or ["Hello, my name is"]
    if args.chat:
        assert llm.tokenizer is not None
        token_ids = [llm.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
        outputs = llm.generate(prompt_token_ids=token_ids, sampling=sampling)
    else:
        outputs = llm.generate(prompts, sampling=sampling)
    for prompt, out in zip(prompts, outputs):
        print(f"{prompt!r} -> {out.text!r} ({len(out.token_ids)} tokens, finish_reason={out.finish_reason})")
    return 0


def _cmd_router(args: argparse.Namespace) -> int:
    from common.config import RouterConfig
    from router.routing_config import RoutingConfig
    from router.server import run

    if not args.model:
        from engine.demo_model import ensure_demo_model

        args.model = str(ensure_demo_model())
    from common.tls import load_tls

    return run(build_config(RouterConfig, args), build_config(RoutingConfig, args), load_tls(args))


def _worker_handler(role: str) -> Handler:
    def handle(args: argparse.Namespace) -> int:
        from common.config import WorkerConfig
        from worker.server import run

        if not args.model:
            from engine.demo_model import ensure_demo_model

            args.model = str(ensure_demo_model())
        from common.tls import load_tls

        return run(role, build_config(EngineConfig, args), build_config(WorkerConfig, args), load_tls(args))
    return handle


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-model", help="write a small random Llama model with a working tokenizer")
    p.add_argument("dir", help="directory to write the checkpoint to")
    p.set_defaults(handler=_cmd_demo_model)

    p = sub.add_parser("generate", help="generate completions offline with the engine")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed-request", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    add_config_args(p, EngineConfig)
    p.set_defaults(handler=_cmd_generate)

    from common.config import RouterConfig, WorkerConfig
    from common.tls import add_tls_args

    p = sub.add_parser("router", help="serve the OpenAI-compatible API and route to workers")
    add_config_args(p, RouterConfig, skip=("api_keys",))
    from router.routing_config import RoutingConfig

    add_config_args(p, RoutingConfig)
    add_tls_args(p)
    p.set_defaults(handler=_cmd_router)

    from router import profile

    p = sub.add_parser("profile", help="measure running workers and fit the router's cost model (JSON)")
    profile.add_arguments(p)
    p.set_defaults(handler=profile.run)

    from autoscaler import cli as autoscaler_cli

    p = sub.add_parser("autoscaler", help="size the prefill and decode pools from Prometheus signals")
    autoscaler_cli.add_arguments(p)
    p.set_defaults(handler=autoscaler_cli.run)

    from simulator import cli as simulator_cli

    p = sub.add_parser("simulate", help="replay a trace through the routing and scaling policies, simulated")
    simulator_cli.add_arguments(p)
    p.set_defaults(handler=simulator_cli.run)

    from cli import up

    p = sub.add_parser("up", help="run router + prefill + decode workers locally (the embedded default)")
    up.add_arguments(p)
    p.set_defaults(handler=up.run)

    for role in ("prefill", "decode"):
        p = sub.add_parser(f"{role}-worker", help=f"serve an engine in the {role} role over gRPC")
        add_config_args(p, EngineConfig)
        add_config_args(p, WorkerConfig)
        add_tls_args(p)
        p.set_defaults(handler=_worker_handler(role))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))  # a line per request
    try:
        return args.handler(args)
    except PdserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
