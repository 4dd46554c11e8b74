"""Causal next-request estimators tried as eviction values, outside the engine.

`python -m bench.gap_estimators [--estimators E,...] [--prediction off|on] [--json FILE]` replays
the README's Azure sweep (K = 8 and 16, seeds 1–3, 1.5×/2×/3× the largest model) with LRU,
`cost-aware`, Belady, and value functions that rank a model by reload seconds per GB ÷ its
estimated wait until its next request, estimated from the requests before now only. They use
the lowest value first, with no cover. An estimator is `name:prior_weight:heat_weight`:
- `lindy`: the wait ahead is the idle time (at least RECENCY_FLOOR_S): cost-aware's rule;
- `mean`, `med`, `med25`, `hmean`, `p120`/`p300`: the mean, median, lower quartile, E[1/wait],
  or H / chance within H, of the waits that the model's own past gaps longer than its idle time
  leave ahead, mixed with the same from every model's gaps (prior_weight pseudo-observations);
- `confN`: the own gaps' mean wait once N of them are longer than the idle time, else `lindy`;
- `minN`: the shorter of that and `lindy` (what cost-aware now does, from its gap histogram).
heat_weight × the model's heat (its requests decayed with a one-hour half-life) adds to the rate.
"""
from __future__ import annotations

import argparse
import bisect
import json
import logging
import math
import multiprocessing
from dataclasses import asdict
from typing import Callable

from proxy.engine.policy import GB, HEAT_RATE_PER_S, RECENCY_FLOOR_S, Candidate

from . import eviction
from .offline import belady_value
from .simulate import Variant, arrivals_by_model, run_variant
from .workload import Workload

POOL_MAX = 4000          # every model's latest gaps kept for the prior
MIN_GAP_S = 1.0          # repeats within a second say nothing about lulls


class Waits:
    """Each model's past gaps, and every model's, as of the replay's now (which only grows)."""

    def __init__(self, workload: Workload) -> None:
        arrivals = arrivals_by_model(workload)
        self.events = sorted((t, k) for k, ts in arrivals.items() for t in ts)
        self.next_event = 0
        self.own: dict[str, list[float]] = {k: [] for k in arrivals}     # sorted
        self.pool: list[float] = []                                      # arrival order
        self.pool_sorted: list[float] = []
        self.last: dict[str, float] = {}

    def advance(self, now_s: float) -> None:
        while self.next_event < len(self.events) and self.events[self.next_event][0] <= now_s:
            t, key = self.events[self.next_event]
            self.next_event += 1
            if key in self.last and t - self.last[key] >= MIN_GAP_S:
                gap = t - self.last[key]
                bisect.insort(self.own[key], gap)
                self.pool.append(gap)
                bisect.insort(self.pool_sorted, gap)
                if len(self.pool) > POOL_MAX:
                    old = self.pool.pop(0)
                    del self.pool_sorted[bisect.bisect_left(self.pool_sorted, old)]
            self.last[key] = t

    def ahead(self, key: str, now_s: float, mode: str, prior_weight: float) -> float:
        """The estimated wait until key's next request."""
        self.advance(now_s)
        if key not in self.last:
            return math.inf
        age = max(now_s - self.last[key], 1.0)
        lindy = max(age, RECENCY_FLOOR_S)
        own = [g - age for g in self.own[key][bisect.bisect_right(self.own[key], age):]]
        pop = [g - age for g in self.pool_sorted[bisect.bisect_right(self.pool_sorted, age):]]
        if mode == "lindy":
            return lindy
        if mode.startswith(("conf", "min")):
            if len(own) < int(mode[4:] if mode.startswith("conf") else mode[3:]):
                return lindy
            mean = sum(own) / len(own)
            return mean if mode.startswith("conf") else min(mean, lindy)
        if mode.startswith("med"):
            q = float(mode[3:] or 50) / 100
            points = [(x, 1.0) for x in own] + \
                ([(x, prior_weight / len(pop)) for x in pop] if pop else [(age, prior_weight)])
            points.sort()
            total, acc = sum(w for _, w in points), 0.0
            for x, w in points:
                acc += w
                if acc >= q * total:
                    return max(x, 1.0)
            return points[-1][0]
        if mode.startswith("p"):
            h = float(mode[1:])
            prior = sum(x <= h for x in pop) / len(pop) if pop else h / (age + h)
            p = (sum(x <= h for x in own) + prior_weight * prior) / (len(own) + prior_weight)
            return h / max(p, 1e-6)
        if mode == "hmean":
            prior = sum(1 / max(x, 1.0) for x in pop) / len(pop) if pop else 1 / age
            inv = (sum(1 / max(x, 1.0) for x in own) + prior_weight * prior) / \
                (len(own) + prior_weight)
            return 1 / max(inv, 1e-9)
        if mode == "mean":
            prior = sum(pop) / len(pop) if pop else age
            return (sum(own) + prior_weight * prior) / (len(own) + prior_weight)
        raise ValueError(f"unknown estimator {mode!r}")


def value_of(workload: Workload, spec: str) -> Callable[[Candidate, float], float]:
    mode, prior_weight, heat_weight = spec.split(":")
    waits = Waits(workload)

    def value(c: Candidate, now_s: float) -> float:
        rate = 1.0 / max(waits.ahead(c.key, now_s, mode, float(prior_weight)), 1.0) + \
            float(heat_weight) * c.heat * HEAT_RATE_PER_S
        return max(c.reload_s, 0.01) * rate / max(c.footprint_bytes / GB, 0.05)
    return value


def run_job(job: tuple) -> dict:
    spec, budget_gb, name, prediction = job
    logging.disable(logging.CRITICAL)
    w = eviction.build_workload(spec)
    if name == "lru":
        r = run_variant(w, budget_gb, Variant("lru", "lru"))
    elif name == "cost-aware":
        r = run_variant(w, budget_gb, Variant(name, name, hold="off", prediction=prediction))
    elif name == "offline-belady":
        r = run_variant(w, budget_gb, Variant(name, name, hold="off", prediction=prediction),
                        {name: belady_value(w)})
    else:
        r = run_variant(w, budget_gb, Variant("estimate", "estimate", hold="off",
                                              prediction=prediction),
                        {"estimate": value_of(w, name)})
    out = asdict(r)
    out.pop("delayed_by_model", None)
    out.update(row=f"k{spec[2]}:s{spec[3]}", budget_gb=budget_gb, name=name)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gap_estimators", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--estimators", default="lindy:2:1,min4:2:1,mean:2:1")
    p.add_argument("--prediction", default="off", choices=("off", "on"))
    p.add_argument("--jobs", type=int, default=multiprocessing.cpu_count())
    p.add_argument("--json")
    args = p.parse_args(argv)
    names = ["lru", "cost-aware", "offline-belady", *args.estimators.split(",")]
    jobs = []
    for k in (8, 16):
        for seed in (1, 2, 3):
            spec = ("azure", str(eviction.DEFAULT_TRACE), k, seed, "random", 4, 1440)
            biggest = max(m.size_gb for m in eviction.build_workload(spec).models.values())
            jobs += [(spec, round(mult * biggest, 1), n, args.prediction)
                     for mult in (1.5, 2.0, 3.0) for n in names]
    with multiprocessing.Pool(args.jobs) as pool:
        runs = pool.map(run_job, jobs, chunksize=1)
    rows: dict[tuple, dict[str, dict]] = {}
    for r in runs:
        rows.setdefault((r["row"], r["budget_gb"]), {})[r["name"]] = r
    print("| values | delay / LRU (worst row) | load s / LRU (worst row) |\n|---|---|---|")
    for n in names[1:]:
        delay = [v[n]["delay_total_s"] / v["lru"]["delay_total_s"] for v in rows.values()]
        load = [v[n]["load_seconds"] / v["lru"]["load_seconds"] for v in rows.values()]
        print(f"| {n} | {_gm(delay):.4f} ({max(delay):.3f}) | {_gm(load):.4f} ({max(load):.3f}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs}, f, indent=1)
    return 0


def _gm(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


if __name__ == "__main__":
    raise SystemExit(main())
