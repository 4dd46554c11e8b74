"""Two replicas behind a balancer, as users feel the usage they learn together.

    python -m bench.replicas_usage --scenario idle|pipeline [--root CHECKOUT] [--sessions N]
                                   [--seed S] [--json FILE]

Starts, each in its own process on loopback: a throwaway `redis-server`, the LM Studio emulator
(24 GB, load times × 0.5) and two proxy replicas sharing the Redis (the first leads), run from
`--root` (another checkout, e.g. a worktree of an older commit, to compare side by side).

- `idle`: the replica that does not lead is asked for qwen3-4b every 15 s; its idle timeout
  is 25 s. Counts the requests that waited for a load, and the leader's idle unloads of it.
- `pipeline`: sessions every 45 s, each the planner (qwen3-4b), then 5 s later the coder
  (gemma-3-12b), each request to a replica picked at random; both models unload after 20 s
  idle. Reports each model's mean wait after the first three sessions, and the preloads.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from .jobs import machine_facts
from .overhead import free_port

PLANNER, CODER = "qwen/qwen3-4b", "google/gemma-3-12b"
ROOT = Path(__file__).resolve().parents[1]


def _config(port: int, upstream: int, redis: int, replica: str, scenario: str) -> str:
    ttls = {PLANNER: 25} if scenario == "idle" else {PLANNER: 20, CODER: 20}
    models = ", ".join(f'"{k}": {{ttl_s: {v}}}' for k, v in ttls.items())
    return f"""
server: {{host: 127.0.0.1, port: {port}}}
upstream: {{url: "http://127.0.0.1:{upstream}", reconcile_interval_s: 5}}
state: {{backend: redis, url: "redis://127.0.0.1:{redis}/0", replica_id: {replica},
         lease_ttl_s: 6}}
memory: {{sampler: budget, budget_gb: 24, min_free_memory_gb: 0,
          max_memory_usage_percent: 100, monitoring_interval: 2}}
models: {{{models}}}
storage: {{enabled: false}}
"""


async def _ready(http: aiohttp.ClientSession, url: str) -> None:
    for _ in range(300):
        try:
            async with http.get(url):
                return
        except aiohttp.ClientError:
            await asyncio.sleep(0.1)
    raise SystemExit(f"{url} never answered")


async def _ask(http: aiohttp.ClientSession, port: int, model: str) -> float:
    """Seconds until the (short) answer: mostly the wait for the model."""
    started = time.monotonic()
    async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4}) as r:
        body = await r.read()
        if r.status != 200:
            raise SystemExit(f"{model}: {r.status} {body[:200]!r}")
    return round(time.monotonic() - started, 2)


async def _idle(http: aiohttp.ClientSession, ports: list[int], sessions: int, logs: Path
                ) -> dict:
    waits = []
    for _ in range(sessions):
        started = time.monotonic()
        waits.append(await _ask(http, ports[1], PLANNER))
        await asyncio.sleep(max(0.0, 15 - (time.monotonic() - started)))
    return {"requests": sessions, "waited_for_a_load": sum(w > 0.5 for w in waits),
            "leader_idle_unloads": (logs / "p1.log").read_text().count(f"{PLANNER} (idle)"),
            "waits_s": waits}


async def _pipeline(http: aiohttp.ClientSession, ports: list[int], sessions: int,
                    seed: int) -> dict:
    rng = random.Random(seed)
    waits: dict[str, list[float]] = {PLANNER: [], CODER: []}
    for _ in range(sessions):
        started = time.monotonic()
        waits[PLANNER].append(await _ask(http, rng.choice(ports), PLANNER))
        await asyncio.sleep(max(0.0, 5 - (time.monotonic() - started)))
        waits[CODER].append(await _ask(http, rng.choice(ports), CODER))
        await asyncio.sleep(max(0.0, 45 - (time.monotonic() - started)))
    preload = []
    for port in ports:
        async with http.get(f"http://127.0.0.1:{port}/proxy/stats") as r:
            preload.append((await r.json()).get("preload"))
    return {"sessions": sessions, "seed": seed,
            "coder_wait_mean_s_after_3": round(statistics.mean(waits[CODER][3:]), 2),
            "planner_wait_mean_s_after_3": round(statistics.mean(waits[PLANNER][3:]), 2),
            "waits_s": waits, "preload": preload}


async def run(scenario: str, root: Path, sessions: int, seed: int) -> dict:
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)

        def start(args: list[str], log: str) -> None:
            procs.append(subprocess.Popen(args, cwd=root, stdout=open(logs / log, "w"),
                                          stderr=subprocess.STDOUT, start_new_session=True))
        redis, emulator = free_port(), free_port()
        ports = [free_port(), free_port()]
        try:
            start(["redis-server", "--port", str(redis), "--save", "", "--appendonly", "no"],
                  "redis.log")
            start([sys.executable, "-m", "proxy.emulator", "--port", str(emulator),
                   "--capacity-gb", "24", "--load-time-scale", "0.5", "--tokens-per-s", "2000"],
                  "emulator.log")
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
                await _ready(http, f"http://127.0.0.1:{emulator}/v1/models")
                for i, port in enumerate(ports, 1):
                    (logs / f"p{i}.yaml").write_text(
                        _config(port, emulator, redis, f"r{i}", scenario))
                    start([sys.executable, "-m", "proxy", "--config", str(logs / f"p{i}.yaml")],
                          f"p{i}.log")
                    await _ready(http, f"http://127.0.0.1:{port}/healthz")
                    await asyncio.sleep(1)        # the first one leads
                result = await (_idle(http, ports, sessions, logs) if scenario == "idle"
                                else _pipeline(http, ports, sessions, seed))
        finally:
            for p in procs:
                os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
    return {"scenario": scenario, "root": str(root), **result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replicas_usage",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", choices=("idle", "pipeline"), required=True)
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout the proxies run from")
    p.add_argument("--sessions", type=int, default=0,
                   help="requests (idle, default 12) or sessions (pipeline, default 9)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args(argv)
    sessions = args.sessions or (12 if args.scenario == "idle" else 9)
    result = asyncio.run(run(args.scenario, args.root.resolve(), sessions, args.seed))
    result["machine"] = machine_facts()
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
