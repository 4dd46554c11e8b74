"""The fleet's per-request work — Fleet.acquire, release, record — for a resident model, with
1,000 models on each of 4 hosts, beside one EngineCore's (bench/engine_micro.py).

    python -m bench.fleet_micro [--models 1000] [--hosts 4] [--requests 20000] [--rounds 7]

Every host lists every model; each model is loaded on one host (model i on host i mod hosts), so
each request takes the fleet's quick path: a look at every host's entry, the placer on the
resident one, then that host's own hot path. The Prometheus listener is attached, as the proxy
runs it. Reports the median over rounds of microseconds per request.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import platform
import statistics
import sys
import time
from typing import Any, Mapping

from proxy.config import load_config
from proxy.engine.core import EngineCore
from proxy.engine.usage import RequestRecord
from proxy.fleet import Fleet, Host, host_config
from proxy.liveconfig import LiveConfig
from proxy.observe.metrics import ProxyMetrics
from proxy.upstream.base import ApiLevel, Capabilities, LoadResult, UpstreamModel

GB = 1_000_000_000
TARGET_US = 10.0


class HostBackend:
    """A ModelBackend listing every model, with its share of them loaded."""

    def __init__(self, keys: list[str], loaded: set[str]) -> None:
        self.keys = keys
        self.loaded = loaded

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


def fleet(keys: list[str], hosts: int) -> Fleet:
    config = load_config({
        "upstreams": [{"name": f"h{i}", "url": f"http://h{i}.invalid:1234", "budget_gb": 1000}
                      for i in range(hosts)],
        "memory": {"min_free_memory_gb": 0}, "storage": {"enabled": False}})
    members = []
    for i, spec in enumerate(config.upstreams):
        narrowed = LiveConfig(host_config(config, spec))
        backend = HostBackend(keys, {k for j, k in enumerate(keys) if j % hosts == i})
        members.append(Host(spec, EngineCore(narrowed, backend, host_name=spec.name), backend, narrowed))
    return Fleet(LiveConfig(config), members)


def single(keys: list[str]) -> EngineCore:
    config = load_config({"memory": {"sampler": "budget", "budget_gb": 1000,
                                     "min_free_memory_gb": 0}, "storage": {"enabled": False}})
    return EngineCore(config, HostBackend(keys, set(keys)))


async def measure(engine: Any, keys: list[str], requests: int, rounds: int) -> float:
    await engine.start()
    ProxyMetrics(engine)
    per_round = []
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(requests):
            key = keys[(i * 7919) % len(keys)]
            lease = await engine.acquire(key)
            lease.release()
            engine.record(RequestRecord(model=key, ok=True, latency_s=0.25,
                                        at_s=engine.clock.now(), endpoint="/v1/chat/completions",
                                        status=200, ttft_s=0.05, prompt_tokens=20,
                                        completion_tokens=40, host=lease.host))
        per_round.append((time.perf_counter() - started) / requests * 1e6)
    await engine.cleanup()
    return statistics.median(per_round)


async def run(models: int, hosts: int, requests: int, rounds: int) -> dict[str, float]:
    keys = [f"publisher/model-{i:04d}" for i in range(models)]
    return {
        "one EngineCore": await measure(single(keys), keys, requests, rounds),
        f"Fleet of {hosts} hosts": await measure(fleet(keys, hosts), keys, requests, rounds)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet_micro",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=int, default=1000)
    p.add_argument("--hosts", type=int, default=4)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    if min(args.models, args.hosts, args.requests, args.rounds) < 1:
        p.error("--models, --hosts, --requests and --rounds must be at least 1")
    logging.disable(logging.WARNING)
    results = asyncio.run(run(args.models, args.hosts, args.requests, args.rounds))
    print(f"| acquire + release + record, resident model, {args.models} models | µs per "
          f"request (median of {args.rounds} rounds) |\n|---|---|")
    for label, us in results.items():
        print(f"| {label} | {us:.1f} |")
    fleet_us = results[f"Fleet of {args.hosts} hosts"]
    print(f"\ntarget ≤ {TARGET_US:g} µs for the fleet: "
          f"{'met' if fleet_us <= TARGET_US else 'not met'}")
    print(f"{platform.machine()}, Python {platform.python_version()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
