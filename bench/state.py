"""Per-call latency of the shared state's two frequent writes: the batch lease renewal (each
replica's periodic tick) and the check-and-reserve before a load, in memory and in Redis.

    python -m bench.state [--url redis://HOST:PORT/0] [--calls 300] [--rounds 7]

Without --url it starts a throwaway redis-server on a loopback port (Debian's `redis-server`
package; the launcher is the tests' own, so the test extras must be installed). Calls run one
after another (latency, not throughput); the table shows the median over rounds of µs per call,
and Redis's cost as a multiple of a bare PING on the same connection pool.
"""
from __future__ import annotations

import argparse
import asyncio
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Awaitable, Callable

from proxy.state import MemoryState, StateStore
from proxy.state.redis import RedisState

GB = 1_000_000_000
LEASE_BATCHES = (1, 10, 100)
OTHER_RESERVATIONS = 10          # live entries the reserve script walks on the host


async def per_call_us(call: Callable[[], Awaitable[object]], calls: int, rounds: int) -> float:
    for _ in range(min(calls, 50)):          # warm: connections made, scripts loaded
        await call()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            await call()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


async def measure(store: StateStore, calls: int, rounds: int) -> dict[str, float]:
    await store.heartbeat(600)
    for i in range(OTHER_RESERVATIONS):
        await store.reserve("h1", f"held-{i}", GB, 1000 * GB, 600)
    out: dict[str, float] = {"ping": await per_call_us(store.ping, calls, rounds)}
    for n in LEASE_BATCHES:
        leases = [("h1", f"publisher/model-{i:03d}") for i in range(n)]
        out[f"renew_leases ({n})"] = await per_call_us(
            lambda: store.renew_leases(leases, 30), calls, rounds)
    out[f"reserve ({OTHER_RESERVATIONS} held)"] = await per_call_us(
        lambda: store.reserve("h1", "load", GB, 1000 * GB, 30), calls, rounds)
    return out


async def run(url: str | None, calls: int, rounds: int) -> None:
    server = None
    if url is None:
        from tests.redis_server import RedisServer
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("no redis-server on this machine (apt-get install redis-server), "
                     "or give --url")
        server = RedisServer(binary, Path(tempfile.mkdtemp(prefix="bench-redis-")))
        url = server.start().url
    redis = RedisState(url, "bench", prefix=f"bench-{uuid.uuid4().hex[:8]}:")
    try:
        memory = await measure(MemoryState("bench"), calls, rounds)
        shared = await measure(redis, calls, rounds)
    finally:
        await redis.close()
        if server is not None:
            server.stop()
    print(f"# {platform.python_version()}, {platform.machine()}, Redis at {redis.url_shown}, "
          f"{calls} calls × {rounds} rounds, median µs per call")
    print(f"{'operation':<22} {'memory µs':>10} {'redis µs':>10} {'redis / ping':>13}")
    for op in shared:
        print(f"{op:<22} {memory[op]:>10.1f} {shared[op]:>10.1f} "
              f"{shared[op] / shared['ping']:>13.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running Redis (default: start redis-server)")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    asyncio.run(run(args.url, args.calls, args.rounds))


if __name__ == "__main__":
    main()
