"""Trace-replay benchmark of eviction policies through the real engine on virtual time.

    python -m bench.eviction                      # default sweep, one table
    python -m bench.eviction --k 16 --seed 1 --budget-gb 30 --policy lru,cost-aware
    python -m bench.eviction --requests r.csv --catalog c.csv --budget-gb 24,48

Every online policy runs the real ModelMemoryManager (admission, single-flight loads, drain
before unload, policy) against a simulated LM Studio whose loads take the catalogue's load time
and block the requests behind them. Baselines are configurations of the same engine:
`lru` (evict least recently used until the model fits), `lru-count` (LRU under a model-count
limit, as Ollama and llama.cpp's router do), `lmstudio-default` (one JIT model at a time, 60 min
TTL). References with future knowledge: `offline-belady` (feasible; an upper bound on the
optimum) and `offline-bound` (LP relaxation; a lower bound on load seconds).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import multiprocessing
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

from proxy.config import EvictionConfig

from .offline import belady_value, lp_lower_bound
from .simulate import RunResult, Variant, run_variant
from .workload import Workload, from_azure_functions, from_files

TRACES = Path(__file__).resolve().parent.parent.parent / "shared" / "traces"
DEFAULT_TRACE = TRACES / "azure_functions_2019_invitro_sample" / "100_inv.csv"
ALL_POLICIES = ("lru", "lru-count", "lmstudio-default", "priority", "cost-aware",
                "offline-belady", "offline-bound")
PROJECT_DEFAULT = EvictionConfig().policy


def variant(name: str, workload: Workload, budget_gb: float) -> Variant:
    residency = EvictionConfig().min_residency_s   # the proxy's policies run as configured
    if name == "lru":
        return Variant(name, "lru")
    if name == "lru-count":
        typical_gb = statistics.median(m.size_gb for m in workload.models.values())
        return Variant(name, "lru", count_limit=max(1, math.floor(budget_gb / typical_gb)))
    if name == "lmstudio-default":
        return Variant(name, "lru", count_limit=1, idle_ttl_s=3600.0)
    if name == "offline-belady":
        return Variant(name, name)
    return Variant(name, name, min_residency_s=residency)


@functools.lru_cache(maxsize=8)
def build_workload(spec: tuple) -> Workload:
    kind = spec[0]
    if kind == "files":
        return from_files(Path(spec[1]), Path(spec[2]))
    _, trace, k, seed, mapping, cap, minutes = spec
    return from_azure_functions(Path(trace), k=k, seed=seed, mapping=mapping,
                                max_per_minute=cap, minutes=minutes, trace_dir=TRACES)


def run_job(job: tuple) -> dict:
    previous = logging.root.manager.disable      # a replay logs every load: keep it quiet,
    logging.disable(logging.CRITICAL)            # and give the caller its logging back
    try:
        return _run_job(job)
    finally:
        logging.disable(previous)


def _run_job(job: tuple) -> dict:
    spec, budget_mult, budget_gb, policy = job
    w = build_workload(spec)
    if budget_gb is None:
        budget_gb = round(budget_mult * max(m.size_gb for m in w.models.values()), 1)
    started = time.perf_counter()
    if policy == "offline-bound":
        r = RunResult(policy, None, lp_lower_bound(w, budget_gb), None, None, None, None)
    elif policy == "offline-belady":
        # Two feasible schedules with future knowledge, with and without anti-thrash
        # residency; the better one is the tighter upper bound on the optimum.
        extra = {"offline-belady": belady_value(w)}
        residency = EvictionConfig().min_residency_s
        r = min((run_variant(w, budget_gb, Variant(policy, policy, min_residency_s=res), extra)
                 for res in (0.0, residency)), key=lambda x: x.load_seconds)
    else:
        r = run_variant(w, budget_gb, variant(policy, w, budget_gb))
    out = asdict(r)
    k = spec[2] if spec[0] == "azure" else len(w.models)
    out.update(workload=w.name, k=k, seed=spec[3] if spec[0] == "azure" else None,
               mapping=spec[4] if spec[0] == "azure" else None, budget_gb=budget_gb,
               default=policy == PROJECT_DEFAULT, requests=len(w.requests),
               wall_s=round(time.perf_counter() - started, 2))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.eviction", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--trace", default=str(DEFAULT_TRACE), help="an {N}_inv.csv")
    p.add_argument("--k", default="8,16", help="identities (models), comma-separated")
    p.add_argument("--seed", default="1,2,3")
    p.add_argument("--mapping", default="random",
                   help="random | popular-small | popular-large (comma-separated)")
    p.add_argument("--budget-gb", default=None,
                   help="budgets in GB; default: 1.5x, 2x, 3x the largest model")
    p.add_argument("--policy", default=",".join(ALL_POLICIES))
    p.add_argument("--max-per-minute", type=int, default=4,
                   help="thin each identity's invocations per minute to at most this")
    p.add_argument("--minutes", type=int, default=1440, help="minutes of the day to replay")
    p.add_argument("--requests", help="CSV t_s,model[,prompt_tokens,completion_tokens]")
    p.add_argument("--catalog", help="CSV model,size_gb,load_s (with --requests)")
    p.add_argument("--jobs", type=int, default=multiprocessing.cpu_count())
    p.add_argument("--json", help="write the runs to this file")
    p.add_argument("--render", metavar="JSON", help="print the tables of runs saved with --json")
    args = p.parse_args(argv)
    if args.render:
        runs = json.loads(Path(args.render).read_text())["runs"]
        print(render(runs, [x for x in ALL_POLICIES if any(r["policy"] == x for r in runs)]))
        return 0

    policies = [x for x in args.policy.split(",") if x]
    unknown = set(policies) - set(ALL_POLICIES)
    if unknown:
        p.error(f"unknown policies {sorted(unknown)}; known: {', '.join(ALL_POLICIES)}")
    if args.requests:
        if not args.catalog:
            p.error("--requests needs --catalog")
        specs = [("files", args.requests, args.catalog)]
    else:
        specs = [("azure", args.trace, int(k), int(s), m, args.max_per_minute, args.minutes)
                 for k in args.k.split(",") for s in args.seed.split(",")
                 for m in args.mapping.split(",")]
    budgets = ([(None, float(b)) for b in args.budget_gb.split(",")] if args.budget_gb
               else [(1.5, None), (2.0, None), (3.0, None)])
    if args.requests and not args.budget_gb:
        p.error("--requests needs --budget-gb")
    jobs = [(spec, mult, gb, pol) for spec in specs for mult, gb in budgets
            for pol in policies]
    started = time.perf_counter()
    if args.jobs > 1:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            runs = pool.map(run_job, jobs, chunksize=1)
    else:
        runs = [run_job(j) for j in jobs]
    elapsed = time.perf_counter() - started
    print(render(runs, policies))
    print(f"\n{len(runs)} runs in {elapsed:.0f}s on {multiprocessing.cpu_count()} cores "
          f"({platform.processor() or platform.machine()}, Python {platform.python_version()})")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs}, indent=1))
    return 0


def render(runs: list[dict], policies: list[str]) -> str:
    rows: dict[tuple, dict[str, dict]] = {}
    for r in runs:
        rows.setdefault((r["workload"], r["budget_gb"]), {})[r["policy"]] = r
    head = ["workload", "budget GB", "requests"] + [f"{p} load s" for p in policies]
    has_ratio = PROJECT_DEFAULT in policies and "lru" in policies
    if has_ratio:
        head += ["lru p99 delay s", f"{PROJECT_DEFAULT} p99 delay s", f"{PROJECT_DEFAULT} / lru"]
    if has_ratio and "offline-belady" in policies:
        head += [f"{PROJECT_DEFAULT} / belady"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratios_lru, ratios_bel = [], []
    for (name, budget), by_policy in rows.items():
        any_run = next(iter(by_policy.values()))
        cells = [name, f"{budget:g}", str(any_run["requests"])]
        cells += [f"{by_policy[p]['load_seconds']:.0f}" if p in by_policy else "-"
                  for p in policies]
        if has_ratio:
            cells += [f"{by_policy[p]['delay_p99_s'] or 0:.0f}" for p in ("lru", PROJECT_DEFAULT)]
            d, lru = by_policy[PROJECT_DEFAULT]["load_seconds"], by_policy["lru"]["load_seconds"]
            ratios_lru.append(d / lru if lru else 1.0)
            cells.append(f"{ratios_lru[-1]:.3f}")
            if "offline-belady" in by_policy:
                bel = by_policy["offline-belady"]["load_seconds"]
                ratios_bel.append(d / bel if bel else 1.0)
                cells.append(f"{ratios_bel[-1]:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines)
    delays = ["", "| policy | cold loads | load s | delayed requests | median of delay p50 s | "
              "median of delay p99 s | regretted evictions | failed requests | runs over budget |",
              "|---|---|---|---|---|---|---|---|---|"]
    for pol in policies:
        mine = [r for r in runs if r["policy"] == pol]
        if pol == "offline-bound":
            delays.append(f"| {pol} | - | {sum(r['load_seconds'] for r in mine):.0f} | - | - "
                          f"| - | - | - | - |")
            continue
        p50 = [r["delay_p50_s"] for r in mine if r["delay_p50_s"] is not None]
        p99 = [r["delay_p99_s"] for r in mine if r["delay_p99_s"] is not None]
        delays.append(
            f"| {pol}{' (default)' if pol == PROJECT_DEFAULT else ''} | "
            f"{sum(r['cold_loads'] for r in mine)} | "
            f"{sum(r['load_seconds'] for r in mine):.0f} | "
            f"{sum(r['delayed_requests'] for r in mine)} | "
            f"{statistics.median(p50) if p50 else '-':.3g} | "
            f"{statistics.median(p99) if p99 else '-':.3g} | "
            f"{sum(r['regretted_evictions'] for r in mine)} | "
            f"{sum(r['failed_requests'] for r in mine)} | "
            f"{sum(1 for r in mine if r['peak_resident_gb'] > r['budget_gb'] + 1e-6)} |")
    out += "\n" + "\n".join(delays)
    if ratios_lru:
        out += (f"\n\n{PROJECT_DEFAULT} / lru load seconds: median {statistics.median(ratios_lru):.3f}, "
                f"worst {max(ratios_lru):.3f}")
    if ratios_bel:
        out += (f"; {PROJECT_DEFAULT} / offline-belady: median "
                f"{statistics.median(ratios_bel):.3f}, worst {max(ratios_bel):.3f}")
    return out


if __name__ == "__main__":
    sys.exit(main())
