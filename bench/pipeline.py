"""A workload with sequence structure: agent pipelines amid independent traffic.

A session is a planner request, then — once the plan is generated and a few seconds of tool
work have passed — a coder request, then an embedding request for what was written. Sessions
arrive through a day with a daytime peak (a sine over 24 h, peak at 14:00, none at night
below a tenth of the peak). Independent models get Poisson traffic of their own all day.
The engine learns online; delays are measured from `evaluate_from_h` on (learn on the first
part of the day, evaluate on the rest).

    python -m bench.eviction --workload pipeline --prediction off,on --policy lru,cost-aware
"""
from __future__ import annotations

import math
import random

from .workload import Model, Request, Workload, load_time_s, tokens_per_s

PLANNER, CODER, EMBEDDER = "qwen/qwen3-8b", "qwen/qwen3-14b", "nomic/embed-text-v1.5"
PIPELINE_GB = {PLANNER: 5.6, CODER: 10.0, EMBEDDER: 0.3}
INDEPENDENT_GB = {"google/gemma-3-12b": 9.4, "microsoft/phi-4": 9.9,
                  "meta/llama-3.1-8b": 5.4, "openai/gpt-oss-20b": 13.5}


def generate(*, seed: int = 1, sessions_per_day: int = 400,
             independent_per_hour: float = 6.0, evaluate_from_h: float = 8.0) -> Workload:
    rng = random.Random(seed)
    models = {k: Model(k, gb, load_time_s(gb)) for k, gb in
              {**PIPELINE_GB, **INDEPENDENT_GB}.items()}
    requests: list[Request] = []
    peak_per_s = sessions_per_day / 86400.0 / 0.55   # the sine below averages ~0.55 of peak
    t = 0.0
    while True:                                      # thinning a non-homogeneous Poisson
        t += rng.expovariate(peak_per_s)
        if t >= 86400.0:
            break
        if rng.random() > _daytime(t):
            continue
        plan_s = rng.uniform(150, 600) / tokens_per_s(PIPELINE_GB[PLANNER])
        code_s = rng.uniform(300, 1200) / tokens_per_s(PIPELINE_GB[CODER])
        requests.append(Request(t, PLANNER, plan_s))
        t_code = t + plan_s + rng.uniform(2, 8)
        requests.append(Request(t_code, CODER, code_s))
        requests.append(Request(t_code + code_s + rng.uniform(1, 3), EMBEDDER, 0.2))
    for key, gb in INDEPENDENT_GB.items():
        t = 0.0
        while True:
            t += rng.expovariate(independent_per_hour / 3600.0)
            if t >= 86400.0:
                break
            requests.append(Request(t, key, rng.uniform(100, 800) / tokens_per_s(gb)))
    requests.sort(key=lambda r: r.t_s)
    return Workload(f"pipeline:s{seed}:{sessions_per_day}/day", models, requests,
                    evaluate_from_s=evaluate_from_h * 3600.0)


def _daytime(t_s: float) -> float:
    """Relative session rate over the day: 1 at 14:00, at least 0.1."""
    return max(0.1, 0.5 + 0.5 * math.cos(2 * math.pi * (t_s / 3600.0 - 14.0) / 24.0))
