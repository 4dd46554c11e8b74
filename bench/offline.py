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
    """Minimum load seconds of any schedule, relaxed to fractional evictions (see
    `_interval_program`); concurrency and load durations are relaxed away too, so this bounds
    every real schedule from below."""
    from scipy.optimize import linprog

    compulsory, program = _interval_program(workload, budget_gb)
    if program is None:
        return round(compulsory, 1)
    cost, a_ub, rhs = program
    result = linprog(cost, A_ub=a_ub, b_ub=rhs, bounds=(0, 1), method="highs")
    if not result.success:
        raise RuntimeError(f"LP bound failed: {result.message}")
    return round(compulsory + result.fun, 1)


OPTIMAL_TIME_LIMIT_S = 120.0
OPTIMAL_MAX_VARIABLES = 200_000


def exact_optimum(workload: Workload, budget_gb: float) -> tuple[float | None, str]:
    """The least load seconds of any schedule in the instant-load model, exactly: the same
    program as the LP bound with every eviction whole (an integer program, HiGHS MILP).
    Returns (load seconds, note); None with the reason when the instance is too large or
    the solver ran out of time."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    compulsory, program = _interval_program(workload, budget_gb)
    if program is None:
        return round(compulsory, 1), "optimal"
    cost, a_ub, rhs = program
    if len(cost) > OPTIMAL_MAX_VARIABLES:
        return None, f"skipped: {len(cost)} variables"
    result = milp(cost, constraints=LinearConstraint(a_ub, -np.inf, rhs),
                  integrality=np.ones(len(cost)), bounds=Bounds(0, 1),
                  options={"time_limit": OPTIMAL_TIME_LIMIT_S})
    if result.status != 0 or result.x is None:
        return None, f"not solved: {result.message}"
    return round(compulsory + float(cost @ np.round(result.x)), 1), "optimal"


def _interval_program(workload: Workload, budget_gb: float) -> tuple[float, tuple | None]:
    """Each model's first request costs a full load. Between two consecutive requests of a
    model, x ∈ [0, 1] is the fraction of it evicted (and reloaded, at its load cost). At every
    request of model q, the models whose interval spans that moment must fit beside q:
        Σ size_m · (1 − x_m) ≤ budget − size_q.
    Returns (compulsory load seconds, (cost, A_ub, b_ub) or None when nothing binds)."""
    import numpy as np
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
        return compulsory, None
    cost = np.zeros(len(var_of))
    for (k, _), col in var_of.items():
        cost[col] = models[k].load_s
    a_ub = csr_matrix((vals, (rows, cols)), shape=(len(rhs), len(var_of)))
    return compulsory, (cost, a_ub, np.array(rhs))
