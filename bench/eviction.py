"""Trace-replay benchmark of eviction policies through the real engine on virtual time.

    python -m bench.eviction                      # default sweep, one table
    python -m bench.eviction --k 16 --seed 1 --budget-gb 30 --policy lru,cost-aware
    python -m bench.eviction --requests r.csv --catalog c.csv --budget-gb 24,48

Every online policy runs the real engine (admission, single-flight loads, drain
before unload, policy) against a simulated LM Studio whose loads take the catalogue's load time
and block the requests behind them. Baselines are configurations of the same engine:
`lru` (evict least recently used until the model fits), `lru-count` (LRU under a model-count
limit, as Ollama and llama.cpp's router do), `lmstudio-default` (one JIT model at a time, 60 min
TTL). References with future knowledge: `offline-belady` (the engine with Belady's rule for
victims and no hold: the delay reference), `offline-optimal` (the exact optimum of the
instant-load model, where every request is served the moment it arrives: an integer program
over the intervals between a model's requests, scipy's HiGHS MILP; skipped with a note where an
instance is too large) and `offline-bound` (its LP relaxation; its delay column is the delay
every schedule without preloading pays for the first requests). `--prediction oracle` preloads
exactly the next request's model in time, through the engine's own admission and eviction
rule: the ceiling of preloading; `--prediction oracle-seen` the same, but only once a model
has been asked for (nothing learned from the past foresees a model's first request): the
ceiling of a predictor. The real engine may delay requests while a load runs and serve them
together, which the instant-load model forbids: an online policy can spend fewer load seconds
than `offline-optimal`, paying in delay. Every table gives load seconds, the total delay
(arrival until the model is ready), its 99th percentile and the mean of its slowest 1 %.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import multiprocessing
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

from proxy.config import EvictionConfig
from proxy.engine.policy import cost_aware_cover, cost_aware_value

from .jobs import machine_line, run_all
from .offline import belady_value, exact_optimum, lp_lower_bound
from .simulate import RunResult, Variant, run_variant
from . import pipeline
from .workload import Workload, from_azure_functions, from_files

# The traces live beside the checkout (`../shared/traces`), found from any worktree depth.
TRACES = next((d / "shared" / "traces" for d in Path(__file__).resolve().parents
               if (d / "shared" / "traces").is_dir()),
              Path(__file__).resolve().parent.parent.parent / "shared" / "traces")
DEFAULT_TRACE = TRACES / "azure_functions_2019_invitro_sample" / "100_inv.csv"
ALL_POLICIES = ("lru", "lru-count", "lmstudio-default", "priority", "cost-aware", "predictive",
                "offline-belady", "offline-optimal", "offline-bound")
# cost-aware as it was before its victims became the cheapest cover (the lowest cost per GB
# first): named with --policy, for a before-and-after in one run.
GREEDY = "cost-aware-greedy"
# cost-aware with the cheapest cover of the shortfall always, however little it saves.
COVER = "cost-aware-cover"
KNOWN = ALL_POLICIES + (GREEDY, COVER)
PROJECT_DEFAULT = EvictionConfig().policy


HOLD_POLICIES = ("priority", "cost-aware", "predictive", GREEDY, COVER)   # the proxy's: --hold
PREDICTING = HOLD_POLICIES + ("offline-belady",)             # --prediction applies
PREDICTIONS = ("off", "on", "oracle", "oracle-seen")


def variant(name: str, workload: Workload, budget_gb: float,
            hold: float | str | None = None) -> Variant:
    if hold is None:
        hold = EvictionConfig().hold   # the proxy's policies run as configured
    if name == "lru":
        return Variant(name, "lru")
    if name == "lru-count":
        typical_gb = statistics.median(m.size_gb for m in workload.models.values())
        return Variant(name, "lru", count_limit=max(1, math.floor(budget_gb / typical_gb)))
    if name == "lmstudio-default":
        return Variant(name, "lru", count_limit=1, idle_ttl_s=3600.0)
    if name == "offline-belady":
        return Variant(name, name)
    return Variant(name, name, hold=hold)


@functools.lru_cache(maxsize=8)
def build_workload(spec: tuple) -> Workload:
    kind = spec[0]
    if kind == "files":
        return from_files(Path(spec[1]), Path(spec[2]))
    if kind == "pipeline":
        return pipeline.generate(seed=spec[1])
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
    spec, budget_mult, budget_gb, policy, hold, prediction, pinned = job
    w = build_workload(spec)
    if budget_gb is None:
        budget_gb = round(budget_mult * max(m.size_gb for m in w.models.values()), 1)
    started = time.perf_counter()
    note = None
    if policy == "offline-bound":
        r = RunResult(policy, None, lp_lower_bound(w, budget_gb), None, None, None, None,
                      delay_total_s=compulsory_delay_s(w))
    elif policy == "offline-optimal":
        value, note = exact_optimum(w, budget_gb)
        r = RunResult(policy, None, value, None, None, None, None)   # type: ignore[arg-type]
    elif policy == "offline-belady":
        # Future knowledge in the choice of victims, no hold: the delay reference.
        r = run_variant(w, budget_gb, Variant(policy, policy, hold="off", prediction=prediction),
                        {"offline-belady": belady_value(w)})
    else:
        v = dataclasses.replace(variant(policy, w, budget_gb, hold), prediction=prediction,
                                pinned=pinned if policy in HOLD_POLICIES else ())
        if policy == GREEDY:
            r = run_variant(w, budget_gb, v, {GREEDY: cost_aware_value})
        elif policy == COVER:
            r = run_variant(w, budget_gb, v, {COVER: cost_aware_value}, {COVER: cost_aware_cover})
        else:
            r = run_variant(w, budget_gb, v)
    out = asdict(r)
    out["hold"] = hold if policy in HOLD_POLICIES else None
    out["pinned"] = list(pinned) if policy in HOLD_POLICIES else []
    if note is not None:
        out["note"] = note
    out["prediction"] = prediction
    k = spec[2] if spec[0] == "azure" else len(w.models)
    out.update(workload=w.name, k=k, seed=spec[3] if spec[0] == "azure" else None,
               mapping=spec[4] if spec[0] == "azure" else None, budget_gb=budget_gb,
               default=policy == PROJECT_DEFAULT, requests=len(w.requests),
               wall_s=round(time.perf_counter() - started, 2))
    return out


def compulsory_delay_s(w: Workload) -> float:
    """A lower bound on the total delay of any schedule that does not preload: the first
    request of each model inside the evaluated span waits at least its whole load."""
    first: dict[str, float] = {}
    for req in w.requests:
        first.setdefault(req.model, req.t_s)
    return round(sum(w.models[k].load_s for k, t in first.items() if t >= w.evaluate_from_s), 1)


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
    p.add_argument("--policy", default=",".join(ALL_POLICIES),
                   help=f"comma-separated, of: {', '.join(KNOWN)}")
    p.add_argument("--max-per-minute", type=int, default=4,
                   help="thin each identity's invocations per minute to at most this")
    p.add_argument("--minutes", type=int, default=1440, help="minutes of the day to replay")
    p.add_argument("--requests", help="CSV t_s,model[,prompt_tokens,completion_tokens]")
    p.add_argument("--catalog", help="CSV model,size_gb,load_s (with --requests)")
    p.add_argument("--jobs", type=int, default=multiprocessing.cpu_count())
    p.add_argument("--workload", choices=("azure", "pipeline"), default="azure",
                   help="azure: the trace (default); pipeline: agent pipelines (bench/pipeline.py)")
    p.add_argument("--prediction", default="off",
                   help="off, on, oracle, oracle-seen (comma-separated): the proxy's policies "
                   "and offline-belady without preloading, with the engine's preloader, with "
                   "preloads of exactly the next requests (the ceiling of preloading), or of "
                   "every next request but a model's first (the ceiling of prediction)")
    p.add_argument("--hold", help="eviction.hold settings to run the proxy's policies with, "
                   "comma-separated (seconds, adaptive, expected, off); default: the "
                   "configured one")
    p.add_argument("--pin", help="models to pin (comma-separated) in the proxy's policies' runs, "
                   "e.g. to measure keeping a pipeline's models resident")
    p.add_argument("--json", help="write the runs to this file")
    p.add_argument("--render", metavar="JSON", help="print the tables of runs saved with --json")
    args = p.parse_args(argv)
    if args.render:
        runs = json.loads(Path(args.render).read_text())["runs"]
        named = {r["policy"].split(" ")[0] for r in runs}   # "<policy> <variant>" renders too
        print(render(runs, [x for x in KNOWN if x in named]))
        return 0

    policies = [x for x in args.policy.split(",") if x]
    unknown = set(policies) - set(KNOWN)
    if unknown:
        p.error(f"unknown policies {sorted(unknown)}; known: {', '.join(KNOWN)}")
    if args.requests:
        if not args.catalog:
            p.error("--requests needs --catalog")
        specs = [("files", args.requests, args.catalog)]
    elif args.workload == "pipeline":
        specs = [("pipeline", int(s)) for s in args.seed.split(",")]
    else:
        specs = [("azure", args.trace, int(k), int(s), m, args.max_per_minute, args.minutes)
                 for k in args.k.split(",") for s in args.seed.split(",")
                 for m in args.mapping.split(",")]
    budgets = ([(None, float(b)) for b in args.budget_gb.split(",")] if args.budget_gb
               else [(1.5, None), (2.0, None), (3.0, None)])
    if args.requests and not args.budget_gb:
        p.error("--requests needs --budget-gb")
    holds = [_hold(h) for h in args.hold.split(",")] if args.hold else [None]
    predictions = [x for x in args.prediction.split(",") if x]
    if set(predictions) - set(PREDICTIONS):
        p.error(f"--prediction: {', '.join(PREDICTIONS)}, not {args.prediction!r}")
    pinned = tuple(x for x in (args.pin or "").split(",") if x)
    jobs = [(spec, mult, gb, pol, hold, pred, pinned) for spec in specs for mult, gb in budgets
            for pol in policies for hold in (holds if pol in HOLD_POLICIES else [None])
            for pred in (predictions if pol in PREDICTING else ["off"])]
    runs, elapsed_s = run_all(run_job, jobs, args.jobs)
    print(render(runs, policies))
    print("\n" + machine_line(len(runs), elapsed_s))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs}, indent=1))
    return 0


def _hold(text: str) -> float | str:
    return text if text in ("adaptive", "expected", "off") else float(text)


def _label(r: dict) -> str:
    hold = r.get("hold")
    label = r["policy"]
    if hold is not None and hold != EvictionConfig().hold:
        label += f" hold={hold:g}" if isinstance(hold, (int, float)) else f" hold={hold}"
    if r.get("pinned"):
        label += f" pinned={len(r['pinned'])}"
    mode = r.get("prediction")
    if mode is True or mode == "on":       # (runs saved before the oracle stored a bool)
        return label + "+prediction"
    return label + (f"+{mode}" if mode in ("oracle", "oracle-seen") else "")


def _geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x > 0]
    return statistics.geometric_mean(xs) if xs else None


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _ratios(rows: dict, lab: str, ref: str, field: str) -> list[float]:
    """Per row where both ran: lab's field over ref's."""
    out = []
    for by in rows.values():
        if lab in by and ref in by:
            mine, theirs = by[lab].get(field), by[ref].get(field)
            if mine is not None and theirs:
                out.append(mine / theirs)
    return out


def _above(rows: dict, lab: str, field: str, tolerance: float) -> int:
    """Rows where lab's field exceeds LRU's by more than tolerance (relative)."""
    n = 0
    for by in rows.values():
        if lab in by and "lru" in by:
            mine, lru = by[lab].get(field), by["lru"].get(field)
            if mine is not None and lru is not None and mine > lru * (1 + tolerance) + 1e-9:
                n += 1
    return n


def render(runs: list[dict], policies: list[str]) -> str:
    """Per row: every policy's load seconds, total delay and p99 delay; per policy: totals,
    ratios to LRU and to the references (geometric means over rows), rows worse than LRU."""
    rows: dict[tuple, dict[str, dict]] = {}
    for r in runs:
        label = _label(r)
        rows.setdefault((r["workload"], r["budget_gb"]), {})[label] = r
    labels = list(dict.fromkeys(lab for by in rows.values() for lab in by
                                if lab.split("+")[0].split(" ")[0] in policies))
    labels.sort(key=lambda lab: (policies.index(lab.split("+")[0].split(" ")[0]), lab))
    head = ["workload", "budget GB", "requests"] + [f"{lab}: load s / delay s / p99 s"
                                                    for lab in labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (name, budget), by in rows.items():
        any_run = next(iter(by.values()))
        cells = [name, f"{budget:g}", str(any_run["requests"])]
        for lab in labels:
            r = by.get(lab)
            cells.append("-" if r is None else " / ".join(
                (_fmt(r.get("load_seconds"), ".0f"), _fmt(r.get("delay_total_s"), ".0f"),
                 _fmt(r.get("delay_p99_s"), ".0f"))))
        lines.append("| " + " | ".join(cells) + " |")
    ref = "offline-belady" if any(
        "offline-belady" in by for by in rows.values()) else None
    summary = ["", "| policy | load s | load / lru (geo. mean of rows) | worst row load / lru "
               "| load / optimal (geo. mean) | delay s in all | delay / lru (geo. mean) "
               "| worst row delay / lru | delay / belady (geo. mean) "
               "| rows: load > lru, p99 > lru, p99 of all requests > lru, slowest 1 % > lru "
               "| delayed requests "
               "| median of delay p99 s | worst delay p99 s "
               "| failed requests | runs over budget | preloads (wasted, GB wasted) |",
               "|" + "---|" * 16]
    for lab in labels:
        mine = [by[lab] for by in rows.values() if lab in by]
        loads = [r["load_seconds"] for r in mine if r["load_seconds"] is not None]
        to_lru = _ratios(rows, lab, "lru", "load_seconds")
        to_opt = _ratios(rows, lab, "offline-optimal", "load_seconds")
        d_lru = _ratios(rows, lab, "lru", "delay_total_s")
        d_ref = _ratios(rows, lab, ref, "delay_total_s") if ref else []
        delays = [r["delay_total_s"] for r in mine if r.get("delay_total_s") is not None]
        p99 = [r["delay_p99_s"] for r in mine if r.get("delay_p99_s") is not None]
        pre = sum(r.get("preloads") or 0 for r in mine)
        wasted = sum(r.get("wasted_preloads") or 0 for r in mine)
        wasted_gb = sum(r.get("wasted_preload_gb") or 0 for r in mine)
        summary.append(
            f"| {lab}{' (default)' if lab == PROJECT_DEFAULT else ''} | {sum(loads):.0f} | "
            f"{_fmt(_geomean(to_lru))} | {_fmt(max(to_lru) if to_lru else None)} | "
            f"{_fmt(_geomean(to_opt))} | "
            f"{_fmt(sum(delays) if delays else None, '.0f')} | {_fmt(_geomean(d_lru))} | "
            f"{_fmt(max(d_lru) if d_lru else None)} | {_fmt(_geomean(d_ref))} | "
            f"{_above(rows, lab, 'load_seconds', 0.0)}, "
            f"{_above(rows, lab, 'delay_p99_s', 0.0)}, "
            f"{_above(rows, lab, 'delay_p99_all_s', 0.0)}, "
            f"{_above(rows, lab, 'delay_tail_mean_s', 0.0)} | "
            f"{sum(r.get('delayed_requests') or 0 for r in mine)} | "
            f"{_fmt(statistics.median(p99) if p99 else None, '.3g')} | "
            f"{_fmt(max(p99) if p99 else None, '.3g')} | "
            f"{sum(r.get('failed_requests') or 0 for r in mine)} | "
            f"{sum(1 for r in mine if (r.get('peak_resident_gb') or 0) > r['budget_gb'] + 1e-6)}"
            f" | {pre} ({wasted}, {wasted_gb:.0f}) |")
    skipped = [f"{k[0]} {k[1]:g} GB: {by['offline-optimal'].get('note')}"
               for k, by in rows.items() if "offline-optimal" in by
               and by["offline-optimal"]["load_seconds"] is None]
    out = "\n".join(lines) + "\n" + "\n".join(summary)
    if any("offline-bound" in by for by in rows.values()):
        out += ("\n\noffline-bound's delay is a lower bound for schedules that do not "
                "preload: the first request of each model in the evaluated span waits its "
                "whole load.")
    if skipped:
        out += "\n\noffline-optimal not computed for: " + "; ".join(skipped)
    return out


if __name__ == "__main__":
    sys.exit(main())
