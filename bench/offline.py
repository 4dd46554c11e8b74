"""Offline references with knowledge of the future: a feasible Belady-style schedule (an upper
bound on the optimum) and an LP-relaxation lower bound on load seconds."""
from __future__ import annotations

import bisect
from typing import Callable

from proxy.engine.policy import GB, Candidate

from .simulate import arrivals_by_model
from .workload import Workload


def belady_value(workload: Workload) -> Callable[[Candidate, float], float]:
    """Keep-value of a model = reload seconds saved per GB per second until its next request.
    Models never requested again are worth nothing; the lowest value is evicted first."""
    arrivals = arrivals_by_model(workload)

    def value(c: Candidate, now_s: float) -> float:
        times = arrivals[c.key]
        i = bisect.bisect_right(times, now_s)
        if i >= len(times):
            return 0.0
        return c.reload_s / (max(c.footprint_bytes / GB, 0.05) * max(times[i] - now_s, 1e-3))
    return value


def lp_lower_bound(workload: Workload, budget_gb: float) -> float:
    """Minimum load seconds of any schedule, relaxed to fractional evictions.

    Each model's first request costs a full load. Between two consecutive requests of a model,
    x ∈ [0, 1] is the fraction of it evicted (and reloaded, at its load cost). At every request
    of model q, the models whose interval spans that moment must fit beside q:
        Σ size_m · (1 − x_m) ≤ budget − size_q.
    Concurrency and load durations are relaxed away, so this bounds every real schedule from below.
    """
    import numpy as np
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix

    models = workload.models
    arrivals = arrivals_by_model(workload)
    compulsory = sum(models[k].load_s for k, ts in arrivals.items() if ts)
    # Interval ids: model k's interval j spans (arrivals[k][j], arrivals[k][j + 1]].
    next_index = {k: 0 for k in models}
    var_of: dict[tuple[str, int], int] = {}
    rows, cols, vals, rhs = [], [], [], []
    for req in workload.requests:
        q = req.model
        next_index[q] += 1            # q's current request closes its previous interval
        live = []
        for k, ts in arrivals.items():
            j = next_index[k]
            if k != q and 0 < j < len(ts):   # requested before now and again later
                live.append((k, j - 1))
        size_live = sum(models[k].size_gb for k, _ in live)
        need = size_live - (budget_gb - models[q].size_gb)
        if need <= 1e-9:
            continue
        row = len(rhs)
        for k, j in live:
            col = var_of.setdefault((k, j), len(var_of))
            rows.append(row)
            cols.append(col)
            vals.append(-models[k].size_gb)
        rhs.append(-need)
    if not rhs:
        return round(compulsory, 1)
    cost = np.zeros(len(var_of))
    for (k, _), col in var_of.items():
        cost[col] = models[k].load_s
    a_ub = csr_matrix((vals, (rows, cols)), shape=(len(rhs), len(var_of)))
    result = linprog(cost, A_ub=a_ub, b_ub=np.array(rhs), bounds=(0, 1), method="highs")
    if not result.success:
        raise RuntimeError(f"LP bound failed: {result.message}")
    return round(compulsory + result.fun, 1)
