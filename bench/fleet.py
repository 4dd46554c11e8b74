"""Trace-replay benchmark of model placement over several hosts, through the real fleet on
virtual time.

    python -m bench.fleet                                  # default sweep, tables
    python -m bench.fleet --workload pipeline --layout three --rounds 5
    python -m bench.fleet --json bench/results/fleet.json

Replays the workloads of bench/eviction.py (a day of the Azure Functions trace; the agent
pipelines) over 2–4 simulated hosts of unequal memory and load speed (bench/fleet_sim.py). The
project's placer (proxy/fleet: the real Fleet over one real EngineCore per host) is compared with
the choices teams make today, plugged into the same Fleet and engines: `round-robin` (a load
balancer's rotation), `least-busy` (LiteLLM's: fewest requests in flight for the model on each
host), `hash` (model → host by a stable hash, sticky), `static` (each model bound to one host by
hand, as with LM Link or llama-swap's peers: largest first to the host with the most memory left)
and `single-host`: one host with the fleet's memory summed, loading at its fastest host's speed
(a bound, not a baseline). Baselines send a model only to hosts it fits. Strategies that break
ties at random run `--rounds` times (seeds); the median is reported.

References for that bound (bench/fleet_oracle.py): `oracle`, the fleet placing and evicting with
knowledge of the future (Belady); `oracle-place`, placing with it while the hosts evict by the
engine's policy; `single-oracle`, the summed host evicting by Belady; and
`single-mean` / `single-slowest`, the summed host loading at the fleet's mean or slowest speed.
The last table splits the gap to the bound into what partitioned memory costs even with the
future known (oracle ÷ single-oracle) and what the fastest speed alone is worth.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .eviction import DEFAULT_TRACE, build_workload
from .fleet_sim import RANDOM, REFERENCES, STRATEGIES, HostSpec, run_strategy
from .jobs import machine_line, run_all
from .workload import Workload

BASELINES = ("round-robin", "least-busy", "hash", "static")
# Host memory as a multiple of the workload's largest model, and each host's load time ÷ the
# catalogue's: a fast workstation, a roomy but slower machine, a small box in the closet.
LAYOUTS: dict[str, list[tuple[str, float, float]]] = {
    "two": [("pc", 1.2, 1.0), ("mac", 0.8, 2.0)],
    "three": [("pc", 1.0, 1.0), ("mac", 0.8, 1.5), ("closet", 0.6, 2.5)],
    "three-roomy": [("pc", 1.5, 1.0), ("mac", 1.2, 1.5), ("closet", 1.0, 2.5)],
    "four": [("pc", 1.0, 1.0), ("mac", 0.8, 1.3), ("laptop", 0.7, 2.0), ("closet", 0.5, 3.0)],
}
TARGET_TO_BASELINE, TARGET_TO_SINGLE = 0.7, 1.3
# What the single-host target is made of (bench/fleet_oracle.py): ratio name → (numerator,
# denominator) strategies, each per row.
BOUND_RATIOS = {
    "placer ÷ single host": ("placer", "single-host"),
    "oracle ÷ single host": ("oracle", "single-host"),
    "oracle ÷ single host, Belady": ("oracle", "single-oracle"),
    "placer ÷ oracle": ("placer", "oracle"),
    "placer ÷ oracle placing only": ("placer", "oracle-place"),
    "placer ÷ single host at the mean speed": ("placer", "single-mean"),
    "placer ÷ single host at the slowest speed": ("placer", "single-slowest"),
    "single host at the mean ÷ fastest speed": ("single-mean", "single-host"),
}


def host_specs(layout: str, w: Workload) -> list[HostSpec]:
    largest_gb = max(m.size_gb for m in w.models.values())
    return [HostSpec(name, round(mult * largest_gb, 1), factor)
            for name, mult, factor in LAYOUTS[layout]]


def run_job(job: tuple) -> dict:
    spec, layout, strategy, seed = job
    previous = logging.root.manager.disable    # a replay logs every load: keep it quiet
    logging.disable(logging.CRITICAL)
    try:
        w = build_workload(spec)
        hosts = host_specs(layout, w)
        started = time.perf_counter()
        out = asdict(run_strategy(w, hosts, strategy, seed))
    finally:
        logging.disable(previous)
    out.update(workload=w.name, layout=layout, wall_s=round(time.perf_counter() - started, 2),
               hosts=[asdict(h) for h in hosts])
    return out


def median_runs(runs: list[dict]) -> dict[tuple, dict[str, dict]]:
    """Per (workload, layout) and strategy: the run of median total delay over its seeds."""
    grouped: dict[tuple, dict[str, list[dict]]] = {}
    for r in runs:
        grouped.setdefault((r["workload"], r["layout"]), {}).setdefault(
            r["strategy"], []).append(r)
    out: dict[tuple, dict[str, dict]] = {}
    for row, by in grouped.items():
        out[row] = {}
        for strategy, rs in by.items():
            rs = sorted(rs, key=lambda r: r["delay_total_s"])
            out[row][strategy] = rs[(len(rs) - 1) // 2]   # the lower median: a real run
    return out


def ratios(rows: dict[tuple, dict[str, dict]]) -> dict[tuple, dict[str, float | None]]:
    out = {}
    for row, by in rows.items():
        mine = by.get("placer", {}).get("delay_total_s")
        base = [by[b]["delay_total_s"] for b in BASELINES if b in by]
        best = min(base) if base else None
        single = by.get("single-host", {}).get("delay_total_s")
        out[row] = {"to_best_baseline": _div(mine, best), "to_single_host": _div(mine, single),
                    "best_baseline": min((b for b in BASELINES if b in by),
                                         key=lambda b: by[b]["delay_total_s"], default=None)}
    return out


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return a / b if b > 0 else (1.0 if a == 0 else float("inf"))


def _geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and 0 < x < float("inf")]
    return statistics.geometric_mean(xs) if xs else None


def _f(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def bound_ratios(rows: dict[tuple, dict[str, dict]]) -> dict[str, dict[tuple, float | None]]:
    """Each of BOUND_RATIOS per row, where both strategies ran."""
    return {name: {row: _div(by[a]["delay_total_s"], by[b]["delay_total_s"])
                   for row, by in rows.items() if a in by and b in by}
            for name, (a, b) in BOUND_RATIOS.items()}


def render_bounds(rows: dict[tuple, dict[str, dict]]) -> list[str]:
    ratios_ = {n: r for n, r in bound_ratios(rows).items() if r}
    if len(ratios_) <= 1:
        return []
    names = list(ratios_)
    lines = ["", "| workload | hosts | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for row in rows:
        lines.append(f"| {row[0]} | {row[1]} | " + " | ".join(
            _f(ratios_[n].get(row), ".2f") for n in names) + " |")
    lines += ["", f"| ratio of total delay | geo. mean | rows ≤ {TARGET_TO_SINGLE} | worst "
              "(row) |", "|---|---|---|---|"]
    for n in names:
        xs = {row: x for row, x in ratios_[n].items() if x is not None}
        worst = max(xs, key=lambda row: xs[row]) if xs else None
        lines.append(f"| {n} | {_f(_geomean(list(xs.values())), '.2f')} | "
                     f"{sum(1 for x in xs.values() if x <= TARGET_TO_SINGLE)} of {len(xs)} | "
                     + ("-" if worst is None else f"{xs[worst]:.2f} ({worst[0]}, {worst[1]})")
                     + " |")
    return lines


def render(runs: list[dict]) -> str:
    rows = median_runs(runs)
    strategies = [s for s in STRATEGIES + REFERENCES if any(s in by for by in rows.values())]
    head = ["workload", "hosts (GB × load factor)"] + [f"{s}: delay s / p99 s / load s"
                                                       for s in strategies]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (name, layout), by in rows.items():
        hosts = next(iter(by.values()))["hosts"]
        cells = [name, f"{layout}: " + ", ".join(
            f"{h['budget_gb']:g}×{h['load_factor']:g}" for h in hosts)]
        for s in strategies:
            r = by.get(s)
            cells.append("-" if r is None else " / ".join(
                (_f(r["delay_total_s"]), _f(r["delay_p99_s"], ".1f"), _f(r["load_seconds"]))))
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "| strategy | delay s in all | geo. mean delay / placer | rows with less delay "
              "than the placer | load s in all | refused | duplicate loads | max models "
              "duplicated | duplicate copy-hours | served while duplicated (by extra "
              "capacity) | waited though resident on another host |", "|" + "---|" * 11]
    for s in strategies:
        mine = [by[s] for by in rows.values() if s in by]
        to_placer = [_div(by[s]["delay_total_s"], by["placer"]["delay_total_s"])
                     for by in rows.values() if s in by and "placer" in by]
        better = sum(1 for by in rows.values() if s in by and "placer" in by
                     and by[s]["delay_total_s"] < by["placer"]["delay_total_s"])
        lines.append(
            f"| {s} | {sum(r['delay_total_s'] for r in mine):.0f} | "
            f"{_f(_geomean(to_placer), '.2f')} | {better} | "
            f"{sum(r['load_seconds'] for r in mine):.0f} | {sum(r['refused'] for r in mine)} | "
            f"{sum(r['duplicate_loads'] for r in mine)} | "
            f"{max(r['duplicates_max'] for r in mine)} | "
            f"{sum(r['duplicate_copy_s'] for r in mine) / 3600:.1f} | "
            f"{sum(r['served_while_duplicated'] for r in mine)} "
            f"({sum(r['served_by_extra_capacity'] for r in mine)}) | "
            f"{sum(r['waited_though_resident_elsewhere'] for r in mine)} |")

    rs = ratios(rows)
    lines += ["", "| workload | hosts | best baseline | placer ÷ best baseline (target ≤ "
              f"{TARGET_TO_BASELINE}) | placer ÷ single host (target ≤ {TARGET_TO_SINGLE}) |",
              "|---|---|---|---|---|"]
    for (name, layout), x in rs.items():
        lines.append(f"| {name} | {layout} | {x['best_baseline'] or '-'} | "
                     f"{_f(x['to_best_baseline'], '.2f')} | {_f(x['to_single_host'], '.2f')} |")
    to_base = [x["to_best_baseline"] for x in rs.values()]
    to_single = [x["to_single_host"] for x in rs.values()]
    met_base = sum(1 for x in to_base if x is not None and x <= TARGET_TO_BASELINE)
    met_single = sum(1 for x in to_single if x is not None and x <= TARGET_TO_SINGLE)
    lines.append(
        f"\nplacer ÷ best baseline: geo. mean {_f(_geomean(to_base), '.2f')}, worst "
        f"{_f(max((x for x in to_base if x is not None), default=None), '.2f')}; target met "
        f"in {met_base} of {len(rs)} rows.\nplacer ÷ single host: geo. mean "
        f"{_f(_geomean(to_single), '.2f')}, worst "
        f"{_f(max((x for x in to_single if x is not None), default=None), '.2f')}; target "
        f"met in {met_single} of {len(rs)} rows.")
    return "\n".join(lines + render_bounds(rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--workload", default="azure,pipeline", help="azure, pipeline (comma-sep.)")
    p.add_argument("--trace", default=str(DEFAULT_TRACE), help="an {N}_inv.csv (azure)")
    p.add_argument("--k", default="16", help="azure: identities (models), comma-separated")
    p.add_argument("--seed", default="1,2,3", help="workload seeds")
    p.add_argument("--minutes", type=int, default=1440, help="azure: minutes of the day")
    p.add_argument("--layout", default=",".join(LAYOUTS),
                   help=f"host layouts, comma-separated: {', '.join(LAYOUTS)}")
    p.add_argument("--requests", help="CSV t_s,model[,prompt_tokens,completion_tokens] "
                   "instead of the workloads")
    p.add_argument("--catalog", help="CSV model,size_gb,load_s (with --requests)")
    p.add_argument("--strategy", default=",".join(STRATEGIES + REFERENCES),
                   help="strategies, comma-separated: " + ", ".join(STRATEGIES + REFERENCES)
                   + " (the last five: references with future knowledge or other speeds)")
    p.add_argument("--rounds", type=int, default=3,
                   help="seeds of the random tie-breaks (placer, least-busy): median reported")
    p.add_argument("--jobs", type=int, default=multiprocessing.cpu_count())
    p.add_argument("--json", help="write the runs to this file")
    p.add_argument("--render", metavar="JSON", help="print the tables of runs saved with --json")
    args = p.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())["runs"]))
        return 0
    strategies = [s for s in args.strategy.split(",") if s]
    layouts = [x for x in args.layout.split(",") if x]
    workloads = [x for x in args.workload.split(",") if x]
    for name, chosen, known in (("strategies", strategies, STRATEGIES + REFERENCES),
                                ("layouts", layouts, LAYOUTS), ("workloads", workloads,
                                                                ("azure", "pipeline"))):
        unknown = set(chosen) - set(known)
        if unknown:
            p.error(f"unknown {name} {sorted(unknown)}; known: {', '.join(known)}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    seeds = [int(s) for s in args.seed.split(",")]
    specs: list[tuple] = []
    if args.requests:
        if not args.catalog:
            p.error("--requests needs --catalog")
        specs.append(("files", args.requests, args.catalog))
    elif "azure" in workloads:
        specs += [("azure", args.trace, int(k), s, "random", 4, args.minutes)
                  for k in args.k.split(",") for s in seeds]
    if "pipeline" in workloads and not args.requests:
        specs += [("pipeline", s) for s in seeds]
    jobs = [(spec, layout, strategy, seed) for spec in specs for layout in layouts
            for strategy in strategies
            for seed in (range(1, args.rounds + 1) if strategy in RANDOM else [1])]
    runs, elapsed_s = run_all(run_job, jobs, args.jobs)
    print(render(runs))
    print("\n" + machine_line(len(runs), elapsed_s))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
