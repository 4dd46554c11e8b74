"""The engine's per-request work — acquire, release, record — with 1,000 known models.

    python -m bench.engine_micro [--models 1000] [--requests 20000] [--rounds 7]

Runs the real engine (EngineCore, as the proxy holds it) with every model loaded (the hot path),
with the proxy's Prometheus listener attached and persistence batching on (as the proxy runs
it), then also with the event hub behind /proxy/events and the dashboard listening, and
reports the median over rounds of microseconds per request.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from proxy.config import load_config
from proxy.engine.core import EngineCore
from proxy.engine.usage import RequestRecord
from proxy.observe.events import EventHub
from proxy.observe.metrics import ProxyMetrics
from proxy.store import UsageStore
from proxy.upstream.base import ApiLevel, Capabilities, LoadResult, UpstreamModel

GB = 1_000_000_000


class LoadedBackend:
    """A ModelBackend with every model already loaded."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    capabilities = Capabilities(manages_loading=True, reports_memory=False, self_evicts=False,
                                multi_instance=False, native_clients=False)

    async def detect(self) -> ApiLevel:
        return ApiLevel.MANAGED

    async def list_models(self) -> list[UpstreamModel]:
        return [UpstreamModel(key=k, size_bytes=GB // 100, instance_ids=(k,)) for k in self.keys]

    async def load(self, key: str, options: Mapping[str, Any]) -> LoadResult:
        return LoadResult(key)

    async def unload(self, instance_id: str) -> None:
        return None


async def run(models: int, requests: int, rounds: int, store_dir: Path) -> dict[str, float]:
    keys = [f"publisher/model-{i:04d}" for i in range(models)]
    config = load_config({"memory": {"sampler": "budget", "budget_gb": 1000,
                                     "min_free_memory_gb": 0}})
    results: dict[str, float] = {}
    for label, with_listeners, with_events in (
            ("acquire+release", False, False), ("acquire+release+record", True, False),
            ("acquire+release+record, event hub listening", True, True)):
        mgr = EngineCore(config, LoadedBackend(keys),
                         store=UsageStore(store_dir / f"{label}.sqlite3"))
        await mgr.start()
        if with_listeners:
            ProxyMetrics(mgr)
        hub = EventHub(mgr) if with_events else None
        per_round = []
        for _ in range(rounds):
            started = time.perf_counter()
            for i in range(requests):
                key = keys[(i * 7919) % models]
                lease = await mgr.acquire(key)
                lease.release()
                if with_listeners:
                    mgr.record(RequestRecord(model=key, ok=True, latency_s=0.25,
                                             at_s=mgr.clock.now(), endpoint="/v1/chat/completions",
                                             status=200, ttft_s=0.05, prompt_tokens=20,
                                             completion_tokens=40))
            per_round.append((time.perf_counter() - started) / requests * 1e6)
            await mgr.flush()
            if hub is not None:
                hub.tick()   # what its ticker does once a second, outside the timed loop
        results[label] = statistics.median(per_round)
        await mgr.cleanup()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engine_micro",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=int, default=1000)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(run(args.models, args.requests, args.rounds, Path(tmp)))
    print(f"| engine work per request, {args.models} known models | µs (median of "
          f"{args.rounds} rounds) |\n|---|---|")
    for label, us in results.items():
        print(f"| {label} | {us:.1f} |")
    print(f"\n{platform.machine()}, Python {platform.python_version()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
