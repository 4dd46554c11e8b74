"""The engine's per-request work — acquire, release, record — with 1,000 known models.

    python -m bench.engine_micro [--models 1000] [--requests 20000] [--rounds 7]
                                 [--state-url redis://HOST:PORT/0]

Runs the real engine (EngineCore, as the proxy holds it) with every model loaded (the hot path),
with the proxy's Prometheus listener attached and persistence batching on (as the proxy runs
it), then also with the event hub behind /proxy/events and the dashboard listening, and with
--state-url also as one replica of `state.backend: redis` (its Replica attached, its loop
batching lease renewals to that Redis), and reports the median over rounds of microseconds per
request. The cases run round by round in rotating order. The loop yields to the event loop every
YIELD_EVERY requests, as a server does between requests, so background work the requests cause
(a replica's lease batches: here every request takes a model the last batch did not hold, the
worst case for them) runs inside the timed rounds.
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

from proxy.configload import load_config
from proxy.engine.core import EngineCore
from proxy.engine.replica import create_replica
from proxy.engine.shared import SINGLE_HOST
from proxy.engine.usage import RequestRecord
from proxy.observe.events import EventHub
from proxy.observe.metrics import ProxyMetrics
from proxy.store import UsageStore
from proxy.upstream.base import ApiLevel, Capabilities, LoadResult, UpstreamModel

GB = 1_000_000_000
DEFAULT_MODELS = 1000
YIELD_EVERY = 64


class LoadedBackend:
    """A ModelBackend listing every model, with `loaded` of them loaded (default: all)."""

    def __init__(self, keys: list[str], loaded: set[str] | None = None) -> None:
        self.keys = keys
        self.loaded = set(keys) if loaded is None else loaded

    capabilities = Capabilities(manages_loading=True, reports_memory=False, self_evicts=False,
                                multi_instance=False, native_clients=False)

    async def detect(self) -> ApiLevel:
        return ApiLevel.MANAGED

    async def list_models(self) -> list[UpstreamModel]:
        return [UpstreamModel(key=k, size_bytes=GB // 100,
                              instance_ids=(k,) if k in self.loaded else ())
                for k in self.keys]

    async def load(self, key: str, options: Mapping[str, Any]) -> LoadResult:
        self.loaded.add(key)
        return LoadResult(key)

    async def unload(self, instance_id: str) -> None:
        self.loaded.discard(instance_id)


async def run(models: int, requests: int, rounds: int, store_dir: Path,
              state_url: str | None = None) -> dict[str, float]:
    keys = [f"publisher/model-{i:04d}" for i in range(models)]
    config = load_config({"memory": {"sampler": "budget", "budget_gb": 1000,
                                     "min_free_memory_gb": 0},
                          "state": {"backend": "redis", "url": state_url,
                                    "key_prefix": "bench-micro:"} if state_url else {}})
    cases = [("acquire+release", False, False, False),
             ("acquire+release+record", True, False, False),
             ("acquire+release+record, event hub listening", True, True, False)]
    if state_url:
        cases.append(("acquire+release+record, state: redis", True, False, True))
    cores = []
    for label, with_listeners, with_events, shared in cases:
        replica = create_replica(config.state) if shared else None
        mgr = EngineCore(config, LoadedBackend(keys),
                         store=UsageStore(store_dir / f"{label}.sqlite3"),
                         shared=replica.host(SINGLE_HOST) if replica is not None else None)
        await mgr.start()
        if replica is not None:
            await replica.start()
        if with_listeners:
            ProxyMetrics(mgr)
        cores.append((label, mgr, with_listeners, EventHub(mgr) if with_events else None,
                      replica))
    per_round: dict[str, list[float]] = {label: [] for label, *_ in cases}
    for rnd in range(rounds):
        # Every case once per round, in rotating order: the figures compared are seconds apart.
        for label, mgr, with_listeners, hub, _ in cores[rnd % len(cores):] + \
                cores[:rnd % len(cores)]:
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
                if i % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
            per_round[label].append((time.perf_counter() - started) / requests * 1e6)
            await mgr.flush()
            if hub is not None:
                hub.tick()   # what its ticker does once a second, outside the timed loop
    for _, mgr, _, _, replica in cores:
        await mgr.cleanup()
        if replica is not None:
            await replica.close()
    return {label: statistics.median(v) for label, v in per_round.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engine_micro",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=int, default=DEFAULT_MODELS)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--state-url", help="also as a replica sharing this Redis")
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(run(args.models, args.requests, args.rounds, Path(tmp),
                                  args.state_url))
    print(f"| engine work per request, {args.models} known models | µs (median of "
          f"{args.rounds} rounds) |\n|---|---|")
    for label, us in results.items():
        print(f"| {label} | {us:.1f} |")
    print(f"\n{platform.machine()}, Python {platform.python_version()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
