"""The proxy with `state.backend: redis` beside the same proxy with `state: memory`.

    python -m bench.overhead --state redis [--rounds 5] [--duration-s 3] [--json FILE]
    python -m bench.state_overhead ...            (the same)

Starts, each in its own process on loopback: the LM Studio emulator (no load time, no per-token
delay), a throwaway `redis-server`, and two proxies that differ only in `state:` — one alone
(`memory`), one a replica sharing the Redis (`redis`), both with the model loaded. The method is
bench/overhead.py's: the same wrk load at concurrency 1, 16 and 64 and the same streaming
client, each load level on both proxies (and on the emulator directly) back to back in rotating
order for several rounds; medians of rounds, and the ratio redis / memory, which is the figure
that holds on a noisy machine. CPU seconds per 1,000 requests are counted per proxy, and
Redis's own CPU beside them. Then bench/engine_micro.py's engine work per request, in memory
and with a Replica attached to the same Redis.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import psutil
import redis

from . import engine_micro
from .jobs import machine_facts
from .overhead import (BODY, CONCURRENCY, MODEL, STREAM_CONCURRENCY, Servers, free_port,
                       one_round, post_json)

TARGETS = ("direct", "memory", "redis")
PROXIES = ("memory", "redis")
PREFIX = "bench:"


def start(workdir: Path) -> tuple[Servers, object]:
    from tests.redis_server import RedisServer
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("no redis-server on this machine (apt-get install redis-server)")
    (workdir / "redis").mkdir()
    server = RedisServer(binary, workdir / "redis").start()
    servers = Servers(workdir, [], "asyncio")
    servers.ports = {t: free_port() for t in TARGETS}
    py = sys.executable
    emu = servers.url("direct")
    servers._spawn("direct", [py, "-m", "proxy.emulator", "--port", str(servers.ports["direct"]),
                              "--load-time-scale", "0", "--tokens-per-s", "0",
                              "--capacity-gb", "64"], f"{emu}/lmstudio-greeting")
    for target in PROXIES:
        state = {"backend": "memory"} if target == "memory" else \
            {"backend": "redis", "url": server.url, "key_prefix": PREFIX}
        config = workdir / f"{target}.yaml"
        config.write_text(json.dumps({"storage": {"path": str(workdir / f"{target}.sqlite3")},
                                      "upstream": {"url": emu}, "state": state,
                                      "logging": {"level": "WARNING"}}))
        servers._spawn(target, [py, "-m", "proxy", "--config", str(config), "--port",
                                str(servers.ports[target])], f"{servers.url(target)}/readyz")
        post_json(f"{servers.url(target)}/proxy/models/load", {"model": MODEL})
    return servers, server


def measure(servers: Servers, redis_pid: int, rounds: int, duration_s: float,
            stream_per_worker: int, script: Path) -> dict:
    results: dict[str, dict[str, list[float]]] = {t: {} for t in TARGETS}
    procs = {t: servers.process(t) for t in PROXIES}
    procs["redis-server"] = psutil.Process(redis_pid)
    cpu_s = {t: 0.0 for t in procs}
    served = {t: 0 for t in TARGETS}
    for rnd in range(rounds):
        order = TARGETS[rnd % 3:] + TARGETS[:rnd % 3]
        before = {t: sum(p.cpu_times()[:2]) for t, p in procs.items()}
        one_round(servers, order, duration_s, script, stream_per_worker, results, served)
        for t, p in procs.items():
            cpu_s[t] += sum(p.cpu_times()[:2]) - before[t]
        print(f"round {rnd + 1}/{rounds} done", file=sys.stderr, flush=True)
    # Redis serves only the redis proxy: its CPU is counted per request of that proxy.
    per_1000 = {t: 1000 * cpu_s[t] / served["redis" if t == "redis-server" else t]
                for t in procs}
    medians = {t: {k: statistics.median(v) for k, v in m.items()} for t, m in results.items()}
    return {"medians": medians, "rounds": results, "cpu_s_per_1000": per_1000,
            "requests": {t: served[t] for t in PROXIES}}


def render(data: dict) -> str:
    m = data["medians"]
    mem, red, d = m["memory"], m["redis"], m["direct"]
    rows = ["| metric (median of rounds) | direct | state: memory | state: redis | "
            "redis / memory |", "|---|---|---|---|---|"]

    def row(label: str, key: str, fmt: str = "{:.2f}") -> None:
        rows.append(f"| {label} | {fmt.format(d[key])} | {fmt.format(mem[key])} | "
                    f"{fmt.format(red[key])} | {red[key] / mem[key]:.3f} |")
    for c in CONCURRENCY:
        row(f"requests/s, c={c}", f"rps_c{c}", "{:.0f}")
    for c in CONCURRENCY:
        row(f"latency p50 ms, c={c}", f"p50_ms_c{c}")
        row(f"latency p99 ms, c={c}", f"p99_ms_c{c}")
    row(f"stream TTFB p50 ms, c={STREAM_CONCURRENCY}", "ttfb_p50_ms")
    row(f"stream last byte p50 ms, c={STREAM_CONCURRENCY}", "ttlb_p50_ms")
    cpu = data["cpu_s_per_1000"]
    ratio = min(red[f"rps_c{c}"] / mem[f"rps_c{c}"] for c in CONCURRENCY)
    engine = data["engine_us"]
    mem_us = engine["acquire+release+record"]
    red_us = engine["acquire+release+record, state: redis"]
    rows += [
        "",
        f"- throughput redis / memory, lowest over c: {ratio:.2f}× (target ≥ 0.8×): "
        + ("met" if ratio >= 0.8 else "NOT met"),
        f"- CPU seconds per 1,000 requests: state: memory {cpu['memory']:.3f}, state: redis "
        f"{cpu['redis']:.3f} (+ redis-server {cpu['redis-server']:.3f})",
        f"- Redis keys under the prefix after the run: {data['redis_keys']}; commands Redis "
        f"served: {data['redis_commands']} ({data['redis_commands'] / data['requests']['redis']:.3f}"
        " per request through the redis proxy)",
        "- wrk errors (non-2xx): " + ", ".join(
            f"{t} {sum(sum(v) for k, v in data['rounds'][t].items() if k.startswith('errors'))}"
            for t in TARGETS),
        "",
        f"| engine work per request, {engine_micro.DEFAULT_MODELS} known models | µs "
        "(median of rounds) |", "|---|---|",
        *(f"| {label} | {us:.1f} |" for label, us in engine.items()),
        "",
        f"- engine work per request, state: redis {red_us:.1f} µs vs memory {mem_us:.1f} µs "
        "(target ≤ 20 µs): " + ("met" if red_us <= 20 else "NOT met"),
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.overhead --state redis",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration-s", type=float, default=3.0, help="per wrk measurement")
    ap.add_argument("--stream-requests", type=int, default=25,
                    help="streaming requests per client worker per round")
    ap.add_argument("--engine-requests", type=int, default=20000,
                    help="requests per round of the engine micro-benchmark")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install wrk", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        script = workdir / "post.lua"
        script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = '
                          f'"application/json"\nwrk.body = \'{json.dumps(BODY)}\'\n')
        servers, server = start(workdir)
        try:
            client = redis.Redis(port=server.port)
            commands_before = client.info("stats")["total_commands_processed"]
            data = measure(servers, server.proc.pid, args.rounds, args.duration_s,
                           args.stream_requests, script)
            data["redis_commands"] = (client.info("stats")["total_commands_processed"]
                                      - commands_before)
            data["redis_keys"] = len(client.keys(PREFIX + "*"))
            client.close()
            servers.stop()      # the engine micro-benchmark runs alone, on the same Redis
            logging.disable(logging.WARNING)
            data["engine_us"] = asyncio.run(engine_micro.run(
                engine_micro.DEFAULT_MODELS, args.engine_requests, 7, workdir,
                state_url=server.url))
        finally:
            servers.stop()
            server.stop()
    data["machine"] = machine_facts()
    print(render(data))
    print(f"\n{data['machine']['cores']} cores (shared), {data['machine']['memory_gb']} GB, "
          f"{data['machine']['cpu']}, Python {data['machine']['python']}; {args.rounds} rounds "
          f"× {args.duration_s:g}s per wrk run; Redis on the same machine, over loopback")
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
