"""python -m proxy.emulator: serve an emulated LM Studio (or, with --flavor, another model
server) until interrupted."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from pathlib import Path
from typing import Any, Awaitable

from .catalog import GB, CatalogModel, load_catalog
from .server import VERSIONS, EmulatorOptions
from . import start_emulator

FLAVORS = ("lmstudio", "ollama", "llamacpp")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m proxy.emulator",
                                description="Serve an emulated LM Studio API.")
    p.add_argument("--flavor", choices=FLAVORS, default="lmstudio",
                   help="the server to emulate (default: lmstudio)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int,
                   help="default: 1234 (LM Studio), 11434 (Ollama), 8080 (llama.cpp)")
    p.add_argument("--catalog", help="YAML catalogue of models (default: built-in demo)")
    p.add_argument("--load-time-scale", type=float, default=1.0,
                   help="multiply every model's load time (0 = instant)")
    p.add_argument("--tokens-per-s", type=float, default=50.0,
                   help="streaming pace (0 = as fast as possible)")
    p.add_argument("--capacity-gb", type=float, default=24.0,
                   help="memory the emulated guardrails allow for loaded models")
    p.add_argument("--real-memory", action="store_true",
                   help="allocate and touch each loaded model's bytes (scaled)")
    p.add_argument("--real-memory-scale", type=float, default=0.05,
                   help="fraction of a model's size actually allocated with --real-memory")
    p.add_argument("--version", choices=VERSIONS, default="0.4")
    p.add_argument("--api-token", help="require this bearer token (LM Studio 0.4 auth)")
    p.add_argument("--no-jit", action="store_true", help="turn JIT loading off")
    p.add_argument("--zero-embedding-usage", action="store_true",
                   help="report 0 tokens for embeddings, as LM Studio 0.4.3 did")
    ollama = p.add_argument_group("--flavor ollama (Ollama's environment variables)")
    ollama.add_argument("--max-loaded-models", type=int, default=3,
                        help="OLLAMA_MAX_LOADED_MODELS: beyond it Ollama evicts by itself")
    ollama.add_argument("--max-queue", type=int, default=512,
                        help="OLLAMA_MAX_QUEUE: requests waiting past it get a 503")
    ollama.add_argument("--keep-alive-s", type=float, default=300.0,
                        help="OLLAMA_KEEP_ALIVE in seconds (negative: forever)")
    router = p.add_argument_group("--flavor llamacpp (the router's own flags)")
    router.add_argument("--models-max", type=int, default=4,
                        help="loaded models beyond which the router evicts by LRU (0: no limit)")
    router.add_argument("--no-models-autoload", action="store_true",
                        help="a request for an unloaded model is refused, not loaded")
    router.add_argument("--models-dir", type=Path,
                        help="write a sparse .gguf file per model here (sizes on disk)")
    router.add_argument("--broken", action="append", default=[], metavar="MODEL",
                        help="a model whose file fails to load (exit code 1); repeatable")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        catalog = load_catalog(args.catalog)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start = {"lmstudio": _lmstudio, "ollama": _ollama, "llamacpp": _llamacpp}[args.flavor]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(start(args, catalog)))
    return 0


async def _serve(started: Awaitable[tuple[Any, str]]) -> None:
    """Start one emulator, say where it is, serve until interrupted."""
    emu, banner = await started
    print(banner, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await emu.close()


async def _lmstudio(args: argparse.Namespace, catalog: list[CatalogModel]) -> tuple[Any, str]:
    opts = EmulatorOptions(version=args.version, api_token=args.api_token,
                           tokens_per_s=args.tokens_per_s,
                           zero_embedding_usage=args.zero_embedding_usage)
    emu = await start_emulator(
        catalog, host=args.host, port=1234 if args.port is None else args.port,
        capacity_bytes=int(args.capacity_gb * GB), load_time_scale=args.load_time_scale,
        real_memory_scale=args.real_memory_scale if args.real_memory else None,
        jit=not args.no_jit, options=opts)
    return emu, f"LM Studio emulator {args.version} on {emu.url} ({len(catalog)} models)"


async def _ollama(args: argparse.Namespace, catalog: list[CatalogModel]) -> tuple[Any, str]:
    from .ollama import start_ollama_emulator
    emu = await start_ollama_emulator(
        catalog, host=args.host, port=11434 if args.port is None else args.port,
        max_loaded_models=args.max_loaded_models, max_queue=args.max_queue,
        vram_bytes=int(args.capacity_gb * GB), default_keep_alive_s=args.keep_alive_s
        if args.keep_alive_s >= 0 else float("inf"), load_time_scale=args.load_time_scale)
    return emu, f"Ollama emulator on {emu.url} ({len(catalog)} models)"


async def _llamacpp(args: argparse.Namespace, catalog: list[CatalogModel]) -> tuple[Any, str]:
    from .llamacpp import start_router_emulator
    emu = await start_router_emulator(
        catalog, host=args.host, port=8080 if args.port is None else args.port,
        tokens_per_s=args.tokens_per_s, models_max=args.models_max,
        autoload=not args.no_models_autoload, load_time_scale=args.load_time_scale,
        broken=frozenset(args.broken), models_dir=args.models_dir)
    return emu, (f"llama.cpp router emulator on {emu.url} ({len(catalog)} models, "
                 f"--models-max {args.models_max})")


if __name__ == "__main__":
    sys.exit(main())
