"""The fleet's per-request work — Fleet.acquire, release, record — for a resident model, with
1,000 models on each of 4 hosts, beside one EngineCore's (bench/engine_micro.py).

    python -m bench.fleet_micro [--models 1000] [--hosts 4] [--requests 20000] [--rounds 7]
                                [--baseline DIR] [--json FILE]

Every host lists every model; each model is loaded on one host (model i on host i mod hosts), so
each request takes the fleet's quick path: a look at every host's entry, the placer on the
resident one, then that host's own hot path. The Prometheus listener is attached, as the proxy
runs it. Reports the median over rounds of microseconds per request.

With --baseline DIR (a checkout of another revision, e.g. `git worktree add DIR main`), each
round runs this checkout's bench and DIR's in fresh processes, in alternating order, so that on a
shared machine both see the same load; reports the median of the rounds' figures for each and
their ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from proxy.configload import load_config
from proxy.engine.core import EngineCore
from proxy.engine.usage import RequestRecord
from proxy.fleet import Fleet, Host, host_config
from proxy.liveconfig import LiveConfig
from proxy.observe.metrics import ProxyMetrics

from .engine_micro import LoadedBackend

TARGET_US = 10.0
ROUNDS_PER_PROCESS = 3     # --baseline: each process's figure is the median of these
ROW = re.compile(r"^\| ([^|]+?) \| ([\d.]+) \|$", re.M)


def fleet(keys: list[str], hosts: int) -> Fleet:
    config = load_config({
        "upstreams": [{"name": f"h{i}", "url": f"http://h{i}.invalid:1234", "budget_gb": 1000}
                      for i in range(hosts)],
        "memory": {"min_free_memory_gb": 0}, "storage": {"enabled": False}})
    members = []
    for i, spec in enumerate(config.upstreams):
        narrowed = LiveConfig(host_config(config, spec))
        backend = LoadedBackend(keys, {k for j, k in enumerate(keys) if j % hosts == i})
        members.append(Host(spec, EngineCore(narrowed, backend, host_name=spec.name), backend, narrowed))
    return Fleet(LiveConfig(config), members)


def single(keys: list[str]) -> EngineCore:
    config = load_config({"memory": {"sampler": "budget", "budget_gb": 1000,
                                     "min_free_memory_gb": 0}, "storage": {"enabled": False}})
    return EngineCore(config, LoadedBackend(keys, set(keys)))


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


def side_by_side(baseline: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Rounds alternating between the baseline checkout and this one, each in a fresh process
    running that checkout's own bench; per label, the median over rounds and the ratio."""
    checkouts = {"baseline": baseline.resolve(), "this": Path(__file__).resolve().parents[1]}
    per_round: dict[str, dict[str, list[float]]] = {name: {} for name in checkouts}
    for rnd in range(args.rounds):
        for name in (list(checkouts) if rnd % 2 == 0 else list(reversed(checkouts))):
            where = checkouts[name]
            out = subprocess.run(
                [sys.executable, "-m", "bench.fleet_micro", "--models", str(args.models),
                 "--hosts", str(args.hosts), "--requests", str(args.requests),
                 "--rounds", str(ROUNDS_PER_PROCESS)],
                cwd=where, env={**os.environ, "PYTHONPATH": str(where)}, check=True,
                capture_output=True, text=True).stdout
            for label, us in ROW.findall(out):
                per_round[name].setdefault(label, []).append(float(us))
    rows = {}
    for label, this in per_round["this"].items():
        base = per_round["baseline"].get(label)
        if base:
            rows[label] = {"baseline_us": statistics.median(base),
                           "this_us": statistics.median(this),
                           "ratio": statistics.median(this) / statistics.median(base),
                           "baseline_rounds_us": base, "this_rounds_us": this}
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet_micro",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=int, default=1000)
    p.add_argument("--hosts", type=int, default=4)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--baseline", type=Path, metavar="DIR",
                   help="a checkout of another revision, run side by side with this one")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    args = p.parse_args(argv)
    if min(args.models, args.hosts, args.requests, args.rounds) < 1:
        p.error("--models, --hosts, --requests and --rounds must be at least 1")
    if args.baseline is not None and not (args.baseline / "bench" / "fleet_micro.py").is_file():
        p.error(f"--baseline {args.baseline}: not a checkout of this project (no "
                "bench/fleet_micro.py)")
    meta = {"models": args.models, "hosts": args.hosts, "requests": args.requests,
            "rounds": args.rounds, "machine": platform.machine(),
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_average": os.getloadavg()}
    if args.baseline is not None:
        rows = side_by_side(args.baseline, args)
        print(f"| µs per request, {args.models} models (median of {args.rounds} rounds, each "
              f"the median of {ROUNDS_PER_PROCESS}) | baseline | this | ratio |\n|---|---|---|---|")
        for label, r in rows.items():
            print(f"| {label} | {r['baseline_us']:.1f} | {r['this_us']:.1f} | {r['ratio']:.2f} |")
        if args.json:
            args.json.write_text(json.dumps({**meta, "baseline": str(args.baseline),
                                             "rounds_per_process": ROUNDS_PER_PROCESS,
                                             "rows": rows}, indent=1) + "\n")
        return 0
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
    if args.json:
        args.json.write_text(json.dumps({**meta, "us_per_request": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
