"""Command line: `radixlm generate` to try a model, `radixlm serve` to run the HTTP server,
`radixlm router` to route across servers."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any, cast

from radixlm.engine.args import EngineArgs
from radixlm.router.args import LOAD_METRICS, POLICIES, RayArgs, RouterArgs
from radixlm.server.args import (
    ACCEPTED_SGLANG_ARGS,
    LOG_LEVELS,
    REASONING_PARSERS,
    TOOL_CALL_PARSERS,
    ServerArgs,
)

_ENGINE_FLAGS: list[tuple[str, dict[str, Any]]] = [
    (
        "--model-path",
        {"help": "HF model folder or .gguf file (default: embedded SmolLM2-135M-Instruct)"},
    ),
    ("--served-model-name", {"help": "model name reported by the API (default: from the path)"}),
    (
        "--disable-radix-cache",
        {"action": "store_true", "help": "turn prefix caching off (ablation)"},
    ),
    (
        "--schedule-policy",
        {
            "default": "lpm",
            "choices": ["lpm", "fcfs", "dfs-weight"],
            "help": "admission order of waiting requests",
        },
    ),
    (
        "--max-wait-s",
        {
            "type": float,
            "default": 10.0,
            "help": "seconds after which a waiting request is admitted before cache-aware order",
        },
    ),
    (
        "--max-total-tokens",
        {"type": int, "help": "KV pool size in tokens (default: from free memory)"},
    ),
    (
        "--mem-fraction-static",
        {
            "type": float,
            "help": "share of the available memory (GPU, or RAM on the CPU) for the weights "
            "plus the KV pool",
        },
    ),
    ("--chunked-prefill-size", {"type": int, "help": "max tokens per forward pass"}),
    (
        "--target-itl-ms",
        {
            "type": float,
            "default": 0.0,
            "help": "while requests decode, cap prefill chunks to keep a step near this many "
            "ms (default 0: off)",
        },
    ),
    ("--max-running-requests", {"type": int, "help": "max requests decoding at once"}),
    (
        "--context-length",
        {"type": int, "help": "cap on prompt + output tokens (default: the model's)"},
    ),
    ("--device", {"default": "auto", "help": "cpu, cuda, cuda:N or auto"}),
    (
        "--dtype",
        {
            "default": "auto",
            "choices": ["auto", "float32", "bfloat16", "float16"],
            "help": "weight and KV dtype",
        },
    ),
    (
        "--kv-cache-dtype",
        {
            "default": "auto",
            "choices": ["auto", "bfloat16", "float16", "float32"],
            "help": "KV cache dtype (auto = --dtype); bfloat16 halves KV memory and decode traffic",
        },
    ),
    ("--random-seed", {"type": int, "help": "seed of the sampler's RNG"}),
    (
        "--request-timeout",
        {"type": float, "help": "seconds after which a request still running is aborted"},
    ),
    (
        "--disable-jump-forward",
        {"action": "store_true", "help": "decode forced grammar tokens one by one (ablation)"},
    ),
    (
        "--speculative-algorithm",
        {
            "choices": ["ngram", "radix", "both"],
            "help": "speculative decoding from the sequence itself (ngram), the radix tree, or both",
        },
    ),
    (
        "--speculative-num-draft-tokens",
        {"type": int, "default": 8, "help": "the longest speculative draft, in tokens"},
    ),
    (
        "--chat-template",
        {"metavar": "FILE", "help": "a Jinja file that replaces the model's chat template"},
    ),
    (
        "--kv-cache-dir",
        {
            "metavar": "DIR",
            "help": "disk tier for evicted KV, reused after a restart (default: none)",
        },
    ),
    (
        "--kv-disk-size",
        {"type": float, "default": 16.0, "metavar": "GB", "help": "disk tier size bound (LRU)"},
    ),
    (
        "--kv-disk-policy",
        {
            "default": "selective",
            "choices": ["selective", "write_through", "off"],
            "help": "which evicted prefixes the disk tier writes (see docs/architecture.md)",
        },
    ),
    (
        "--tp-size",
        {"type": int, "default": 1, "help": "tensor-parallel ranks the model is cut over"},
    ),
]
# Other spellings of an engine flag (SGLang's).
_ENGINE_ALIASES = {"--tp-size": ("--tp",)}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The flags that build an EngineArgs."""
    for flag, kw in _ENGINE_FLAGS:
        parser.add_argument(flag, *_ENGINE_ALIASES.get(flag, ()), **kw)


def _dest(flag: str) -> str:
    """The argument name of a flag (`--max-total-tokens` -> `max_total_tokens`)."""
    return flag[2:].replace("-", "_")


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    """Collect the engine flags of a parsed command line."""
    return EngineArgs(**{_dest(flag): getattr(ns, _dest(flag)) for flag, _ in _ENGINE_FLAGS})


def _generate(ns: argparse.Namespace) -> None:
    from radixlm.engine.engine import Engine

    t0 = time.perf_counter()
    with Engine(**engine_args_from(ns).to_dict()) as engine:
        prompt = ns.prompt
        if ns.chat:
            prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        params = {"max_new_tokens": ns.max_new_tokens, "temperature": ns.temperature}
        stream = cast(Iterator[dict[str, Any]], engine.generate(prompt, params, stream=True))
        last: dict[str, Any] = {}
        for chunk in stream:
            if not last:
                print(f"[first token after {time.perf_counter() - t0:.2f}s]", file=sys.stderr)
            sys.stdout.write(chunk["text"][len(last.get("text", "")) :])
            sys.stdout.flush()
            last = chunk
        print()
        print(json.dumps(last["meta_info"]), file=sys.stderr)


_SERVER_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--host", {"help": "address to listen on"}),
    ("--port", {"type": int, "help": "port to listen on (0: any free port)"}),
    ("--api-key", {"help": "require `Authorization: Bearer KEY` (health and metrics stay open)"}),
    (
        "--api-key-file",
        {
            "help": 'keys with tenants and roles: JSON {"KEY": {"tenant": T, "role": "user"|"admin"}}'
        },
    ),
    ("--pin-quota-tokens", {"type": int, "help": "tokens each tenant may pin (default: pool/4)"}),
    (
        "--max-queued-requests",
        {"type": int, "help": "requests waiting beyond --max-running-requests before 503"},
    ),
    (
        "--max-queued-tokens",
        {"type": int, "help": "prompt tokens of the requests in flight before new ones get 503"},
    ),
    (
        "--max-engine-restarts",
        {"type": int, "help": "engine restarts within the window before the server stays down"},
    ),
    (
        "--engine-restart-window-s",
        {"type": float, "help": "the window of --max-engine-restarts, in seconds"},
    ),
    ("--log-level", {"choices": LOG_LEVELS, "help": "logging level of the server and its engine"}),
    (
        "--tool-call-parser",
        {"choices": TOOL_CALL_PARSERS, "help": "tool-call format (default: the chat template's)"},
    ),
    (
        "--reasoning-parser",
        {"choices": REASONING_PARSERS, "help": "move <think>...</think> to reasoning_content"},
    ),
    ("--image-dir", {"help": "read local image paths (image_data) only under this folder"}),
    (
        "--allow-image-urls",
        {"action": "store_true", "help": "fetch http(s) image URLs sent in requests"},
    ),
]


def server_args_from(ns: argparse.Namespace) -> ServerArgs:
    """Collect the server flags of a parsed command line."""
    return ServerArgs(**{_dest(flag): getattr(ns, _dest(flag)) for flag, _ in _SERVER_FLAGS})


def _serve(ns: argparse.Namespace) -> int:
    if ns.ray:
        from radixlm.router.launch import serve_ray

        ray_args = RayArgs(ns.ray_address, ns.ray_num_cpus, ns.ray_num_gpus)
        return serve_ray(engine_args_from(ns), server_args_from(ns), ns.dp, ray_args)
    if ns.dp > 1:
        from radixlm.router.launch import serve_dp

        return serve_dp(engine_args_from(ns), server_args_from(ns), ns.dp)
    from radixlm.server.launch import serve

    return serve(engine_args_from(ns), server_args_from(ns))


_ROUTER_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--worker-urls", {"nargs": "+", "metavar": "URL", "help": "the workers' base URLs"}),
    ("--host", {"help": "address to listen on"}),
    ("--port", {"type": int, "help": "port to listen on (0: any free port)"}),
    ("--api-key", {"help": "require `Authorization: Bearer KEY`; also sent to the workers"}),
    ("--policy", {"choices": POLICIES, "help": "how a worker is picked for a request"}),
    (
        "--cache-threshold",
        {"type": float, "help": "cache_aware: cached share of the prompt below which work decides"},
    ),
    (
        "--balance-abs-threshold",
        {"type": int, "help": "cache_aware: load is unbalanced when max - min exceeds this ..."},
    ),
    (
        "--balance-rel-threshold",
        {"type": float, "help": "... and max exceeds this times min (requests in flight)"},
    ),
    (
        "--load-metric",
        {"choices": LOAD_METRICS, "help": "cache_aware: estimated work, or requests in flight"},
    ),
    ("--health-check-interval-s", {"type": float, "help": "seconds between health checks"}),
    ("--tokenizer-path", {"help": "tokenizer to route with (default: the workers' model)"}),
    ("--log-level", {"choices": LOG_LEVELS, "help": "logging level"}),
]


def _router(ns: argparse.Namespace) -> int:
    from radixlm.router.launch import serve_router

    values = {_dest(flag): getattr(ns, _dest(flag)) for flag, _ in _ROUTER_FLAGS}
    values["worker_urls"] = tuple(values["worker_urls"] or ())
    return serve_router(RouterArgs(**values))


def build_parser() -> argparse.ArgumentParser:
    """The `radixlm` command line: `generate` and `serve`."""
    parser = argparse.ArgumentParser(prog="radixlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    add_engine_args(gen)
    srv = sub.add_parser("serve", help="run the HTTP server (SGLang's native API and OpenAI's)")
    defaults = ServerArgs()
    for flag, kw in _SERVER_FLAGS:
        srv.add_argument(flag, **kw, default=getattr(defaults, _dest(flag)))
    for name, why in ACCEPTED_SGLANG_ARGS.items():
        srv.add_argument(
            "--" + name.replace("_", "-"), action="store_true", help=f"accepted (SGLang's): {why}"
        )
    srv.add_argument(
        "--dp", type=int, default=1, help="engine servers behind a router on this port"
    )
    ray_defaults = RayArgs()
    srv.add_argument("--ray", action="store_true", help="run the --dp servers as Ray actors")
    srv.add_argument(
        "--ray-address", help="the Ray cluster (default: RAY_ADDRESS, else this machine's)"
    )
    srv.add_argument(
        "--ray-num-cpus", type=float, default=ray_defaults.num_cpus, help="CPUs per Ray replica"
    )
    srv.add_argument(
        "--ray-num-gpus", type=float, default=ray_defaults.num_gpus, help="GPUs per Ray replica"
    )
    add_engine_args(srv)
    rtr = sub.add_parser("router", help="route requests across `radixlm serve` workers")
    router_defaults = RouterArgs()
    for flag, kw in _ROUTER_FLAGS:
        rtr.add_argument(flag, **kw, default=getattr(router_defaults, _dest(flag)))
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `radixlm` command."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(ns, "log_level", "info").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if ns.command == "generate":
        _generate(ns)
    else:
        try:
            code = _serve(ns) if ns.command == "serve" else _router(ns)
        except KeyboardInterrupt:  # a second Ctrl-C, or the one uvicorn re-raises after shutdown
            code = 130
        sys.exit(code)
