"""`flashserve` command line: serve, info, demo, bench."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from .config import ServerConfig


def cmd_serve(args) -> int:
    config = ServerConfig.from_args(args)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.heap_keep_mb > 0:  # this process is ours: tune its allocator for large messages (client/heap.py)
        from flashserve.heap import keep_freed_memory

        keep_freed_memory(config.heap_keep_mb << 20)
    if config.processes > 1 and config.frontends > 0:
        raise SystemExit("--frontends and --processes exclude each other: front ends already share the port")
    if config.processes > 1:
        from .processes import serve_processes

        return serve_processes(config)
    return asyncio.run(_serve(config))


async def _serve(config) -> int:
    from .app import serve

    return await serve(config)


def cmd_info(args) -> int:
    from flashserve import Client
    from flashserve.wire import dtype_name

    with Client(args.target, timeout=args.timeout, token=args.token, tls=args.tls) as client:
        info = client.server_info()
    limits = info.limits
    rows = [
        ("target", args.target), ("version", info.version), ("backend", info.backend), ("device", info.device),
        ("host", info.hostname), ("dtypes", ", ".join(dtype_name(d) for d in info.dtypes)),
        ("max head dim", info.max_head_dim),
        ("head-dim classes", ", ".join(str(c) for c in info.head_dim_classes) or "all"),
        ("features", ", ".join(info.features)),
        ("backward", "yes" if info.backward else "no"), ("shared memory", "yes" if info.shared_memory else "no"),
        ("residuals", "yes" if info.residuals else "no"), ("max tokens / request", limits.max_tokens),
        ("max bytes / request", limits.max_request_bytes), ("max concurrent", limits.max_concurrent_requests),
        ("max message bytes", limits.max_message_bytes), ("chunk bytes", limits.default_chunk_bytes),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(backend=args.backend, dtype=args.dtype, quick=args.quick)


def cmd_bench(args) -> int:
    from .loadtest import run_from_args

    return run_from_args(args)


def _add_target_args(p):
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    p.add_argument("--token", default=None, help="bearer token (default: $FLASHSERVE_TOKEN)")
    p.add_argument("--tls", action="store_true", help="connect with TLS")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashserve", description="FlashAttention as a network service")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gRPC server")
    ServerConfig.add_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("info", help="print a server's GetServerInfo")
    p.add_argument("target", help="host:port or unix:/path")
    _add_target_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="start a local server, run forward+backward through the client, check, report")
    p.add_argument("--backend", default="auto", help="auto | flash | torch")
    p.add_argument("--dtype", default=None, help="float16 | bfloat16 | float32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--quick", action="store_true", help="a smaller workload")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="load-test a server (concurrency sweep)")
    try:
        from .loadtest import add_arguments
    except ImportError:  # the load tester is optional at import time
        add_arguments = None
    if add_arguments is not None:
        add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "token", None) is None and hasattr(args, "token"):
        import os

        args.token = os.environ.get("FLASHSERVE_TOKEN") or None
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
