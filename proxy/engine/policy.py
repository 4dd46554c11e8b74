"""Eviction policies: pure functions from frozen inputs to victims. No I/O, no logging.

`blocker(...)` says why a loaded model may not be evicted now (None: it may), the one rule used
both to pick candidates and to explain a refusal. `select_victims(policy, candidates, need_bytes,
now_s)` returns the models to unload so that at
least `need_bytes` are freed, in eviction order. An empty selection means these candidates cannot
meet the need (unless `partial=True`, used to relieve pressure: then it frees what it can).

Each policy is a value function; the lowest value is evicted first.
- `lru`: least recently used first.
- `priority`: the original design's score: priority (1-10), recency and frequency.
- `cost-aware`: evicting a model is expected to cost priority_weight × reload_seconds × its
  expected request rate (reload seconds of waiting per second), where the rate is 1 / idle
  seconds (recency, idle counted as at least RECENCY_FLOOR_S, or as the wait its own gaps leave
  ahead when that is shorter: a model asked for every 40 s is not idle 30 s in) plus its heat
  (its requests decayed with a one-hour half-life, which remembers popularity across unloads) plus
  its learned chance of being a pipeline's next step. A load's victims are the lowest cost per
  GB first, unless the set that covers the shortfall at the least total cost (`cheapest_cover`)
  costs less than half as much: then a 3 GB model that covers a 2 GB shortfall goes, though a 9 GB
  one is cheaper per GB (`cost_aware_victims`).
- `predictive`: each idle model's expected cost of eviction — priority_weight × reload seconds ×
  the learned probability of a request within PREDICTION_HORIZON_S (engine.learning) — and the
  victim set chosen as a whole, the one that covers the shortfall at the least total cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

GB = 1_000_000_000
HEAT_HALF_LIFE_S = 3600.0
HEAT_RATE_PER_S = math.log(2) / HEAT_HALF_LIFE_S   # heat → requests per second
# One request seconds ago says no more about the next one than a request this long ago: below
# it, 1 / idle seconds outweighs every other fact (heat, followers, reload cost) by far.
# Replayed on the Azure sweep, 10–12 s lowered total delay the most of the floors that did not
# put p99 above LRU's on more rows (15 s and longer did).
RECENCY_FLOOR_S = 12.0


@dataclass(frozen=True)
class Candidate:
    key: str
    footprint_bytes: float
    last_used_s: float        # clock time of last use (load time if never used)
    priority: int = 5         # 1..10, higher keeps
    reload_s: float = 1.0     # expected seconds to load again
    rate_per_h: float = 0.0   # requests in the last hour
    heat: float = 0.0         # requests decayed by age to now (half-life HEAT_HALF_LIFE_S)
    p_reuse: float = 0.0      # learned: probability of a request within PREDICTION_HORIZON_S
    p_due: float = 0.0        # learned: chance it is due within PREDICTION_HORIZON_S as a
                              # recent request's next pipeline step or a clock's next run
    own_wait_s: float = math.inf   # learned: the mean wait ahead by the model's own gaps


ValueFunction = Callable[[Candidate, float], float]

# Why a loaded model cannot be evicted now; the words appear in refusals.
SERVING, PINNED, NOT_OURS, HELD = "serving", "pinned", "not ours", "inside its residency"
CLIENT_CONNECTED = "its SDK client is connected"
CLIENT_KEPT = "an SDK client's (native.evict: never)"
GROUP_SERVING = "a member of its together group is serving"   # engine/groups.py
SERVING_ELSEWHERE = "serving through another replica"          # engine/shared.py
# Blockers that go away by themselves.
TEMPORARY = frozenset({SERVING, HELD, GROUP_SERVING, SERVING_ELSEWHERE})


def client_blocker(mode: str, *, connected: bool, critical: bool) -> str | None:
    """Why a model an SDK client loaded through the proxy is not the proxy's to evict now
    (None: it is). LM Studio itself spares explicitly loaded models; the proxy does while
    their client is connected (`after_disconnect`), except at critical pressure."""
    if mode == "always":
        return None
    if mode == "never":
        return CLIENT_KEPT
    return CLIENT_CONNECTED if connected and not critical else None


def blocker(*, busy: bool, pinned: bool, ours: bool, held: bool, critical: bool,
            not_ours: str = NOT_OURS) -> str | None:
    """The reason a loaded model may not be evicted now, or None. At critical pressure the
    residency rule is waived; nothing ever evicts a model that is serving. The lasting reasons
    come first: a pinned model that is serving is pinned (its memory will not come free).
    `not_ours` names why a model that is not ours is kept (NOT_OURS, or a client_blocker)."""
    if pinned:
        return PINNED
    if not ours:
        return not_ours
    if busy:
        return SERVING
    if held and not critical:
        return HELD
    return None


def in_residency(loaded_at_s: float | None, now_s: float, residency: float,
                 requester_waited_s: float) -> bool:
    """A model inside its residency is spared, but only until the load that wants its memory
    has itself waited as long: the rule delays a waiting request by at most one residency."""
    if loaded_at_s is None or residency <= 0:
        return False
    return now_s - loaded_at_s < residency and requester_waited_s < residency


def expected_hold_s(reload_s: float, p_reuse: float) -> float:
    """`hold: expected`: a fresh model is spared as long as evicting it is expected to cost —
    its reload seconds × the chance it is asked for again soon. The waiting that sparing it
    causes (waiters × seconds waited) is weighed against that, so no request waits longer."""
    return max(reload_s, 0.0) * min(max(p_reuse, 0.0), 1.0)


def decayed_heat(heat: float, heat_at_s: float, now_s: float) -> float:
    """Requests decayed by age with a HEAT_HALF_LIFE_S half-life."""
    return heat * 0.5 ** ((now_s - heat_at_s) / HEAT_HALF_LIFE_S)


def priority_weight(priority: int) -> float:
    return 2.0 ** ((priority - 5) / 2.5)   # 1 → 0.33, 5 → 1, 10 → 4


def lru_value(c: Candidate, now_s: float) -> float:
    return c.last_used_s


def priority_value(c: Candidate, now_s: float) -> float:
    idle_h = max(0.0, now_s - c.last_used_s) / 3600.0
    recency = 1.0 / (1.0 + idle_h)                 # 1 when just used, → 0 when idle for long
    frequency = min(1.0, math.log1p(c.rate_per_h) / math.log1p(100.0))
    return c.priority / 10.0 * 0.5 + recency * 0.3 + frequency * 0.2


def cost_aware_cost(c: Candidate, now_s: float) -> float:
    """Reload seconds per second that evicting c is expected to cause (priority-weighted)."""
    # The wait its own gaps leave ahead, when shorter than its idle time, says more about the
    # next request than the idle time does (a second at least: an overdue wait is not certain).
    idle_s = max(min(max(now_s - c.last_used_s, RECENCY_FLOOR_S), c.own_wait_s), 1.0)
    # A pipeline's next step, or a clock's next run, is due within a minute whatever its idle
    # time says.
    rate_per_s = 1.0 / idle_s + c.heat * HEAT_RATE_PER_S + c.p_due / PREDICTION_HORIZON_S
    return priority_weight(c.priority) * max(c.reload_s, 0.01) * rate_per_s


def cost_aware_value(c: Candidate, now_s: float) -> float:
    """cost_aware_cost per GB held: the order in which pressure relief frees memory."""
    return cost_aware_cost(c, now_s) / max(c.footprint_bytes / GB, 0.05)


PREDICTION_HORIZON_S = 60.0


def expected_cost_s(c: Candidate) -> float:
    """Reload seconds evicting c is expected to cause (priority-weighted)."""
    return priority_weight(c.priority) * max(c.reload_s, 0.01) * max(c.p_reuse, c.p_due)


def predictive_value(c: Candidate, now_s: float) -> float:
    return expected_cost_s(c) / max(c.footprint_bytes / GB, 0.05)


VALUE_FUNCTIONS: dict[str, ValueFunction] = {
    "lru": lru_value,
    "priority": priority_value,
    "cost-aware": cost_aware_value,
    "predictive": predictive_value,
}
# Policies that choose the victim set as a whole, at the least total expected cost.
SET_POLICIES = frozenset({"predictive"})
SET_UNIT_BYTES = GB // 10
# cost-aware's cover is solved over at most this many size units and candidates (the cheapest
# by cost and by cost per GB), so a choice stays a few milliseconds at 1,000 models.
COVER_MAX_UNITS = 400
COVER_MAX_CANDIDATES = 48
# cost-aware takes the cheapest cover over the lowest-cost-per-GB set only when it more than
# halves the expected cost: the per-GB set frees more memory for its price, which preloads and
# the next load use (measured: 2 beat 1.5 and 1.25 on pipelines with preloading, and the pure
# cover, with the Azure sweep within a point; docs/benchmarks.md#waits).
COVER_GAIN_MIN = 2.0


def cheapest_cover(candidates: Sequence[Candidate], need_bytes: float,
                   cost: Callable[[Candidate], float], unit_bytes: float = SET_UNIT_BYTES
                   ) -> tuple[str, ...]:
    """The set of candidates that frees at least need_bytes at the least total cost (a
    covering knapsack over 0.1 GB units, sizes rounded down; among equal costs, the one that
    frees least). Freeing 2 GB of small, busy models rarely helps an incoming 9 GB model: a
    set sees that."""
    units = max(1, math.ceil(need_bytes / unit_bytes))
    if sum(c.footprint_bytes for c in candidates) < need_bytes:
        return ()
    inf = float("inf")
    # best[j]: (cost, freed, chosen) for freeing at least j units
    best: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())] + \
        [(inf, 0.0, ())] * units
    for idx, c in enumerate(sorted(candidates, key=lambda c: c.key)):
        size = max(1, int(c.footprint_bytes // unit_bytes))
        k = cost(c)
        for j in range(units, 0, -1):
            prev = best[max(0, j - size)]
            if prev[0] == inf:
                continue
            cand = (prev[0] + k, prev[1] + c.footprint_bytes, prev[2] + (idx,))
            if (cand[0], cand[1]) < (best[j][0], best[j][1]):
                best[j] = cand
    if best[units][0] == inf:
        return ()
    ordered = sorted(candidates, key=lambda c: c.key)
    return tuple(ordered[i].key for i in best[units][2])


def select_victims(policy: str, candidates: Sequence[Candidate], need_bytes: float,
                   now_s: float, *, partial: bool = False) -> tuple[str, ...]:
    if need_bytes <= 0:
        return ()
    if policy in SET_POLICIES and not partial:
        return cheapest_cover(candidates, need_bytes, expected_cost_s)
    chooser = SET_CHOOSERS.get(policy)
    if chooser is not None and not partial:
        return chooser(candidates, need_bytes, now_s)
    return greedy_victims(VALUE_FUNCTIONS[policy], candidates, need_bytes, now_s,
                          partial=partial)


def greedy_victims(value: ValueFunction, candidates: Sequence[Candidate], need_bytes: float,
                   now_s: float, *, partial: bool = False) -> tuple[str, ...]:
    """The lowest-valued candidates until need_bytes are freed."""
    scored = sorted(candidates, key=lambda c: (value(c, now_s), c.last_used_s, c.key))
    chosen: list[Candidate] = []
    freed = 0.0
    for c in scored:
        if freed >= need_bytes:
            break
        chosen.append(c)
        freed += c.footprint_bytes
    if freed < need_bytes and not partial:
        return ()
    # Spare the most valuable of those chosen when the rest already free enough.
    for c in sorted(chosen, key=lambda c: -value(c, now_s)):
        if freed - c.footprint_bytes >= need_bytes:
            chosen.remove(c)
            freed -= c.footprint_bytes
    return tuple(c.key for c in chosen)


def cost_aware_cover(candidates: Sequence[Candidate], need_bytes: float, now_s: float
                     ) -> tuple[str, ...]:
    """cost-aware's victims: the cheapest cover of need_bytes by cost_aware_cost, among the
    COVER_MAX_CANDIDATES cheapest by cost and by cost per GB, in units of at least 0.1 GB."""
    def cost(c: Candidate) -> float:
        return cost_aware_cost(c, now_s)
    pool: Sequence[Candidate] = candidates
    if len(candidates) > COVER_MAX_CANDIDATES:
        half = COVER_MAX_CANDIDATES // 2
        by_cost = sorted(candidates, key=lambda c: (cost(c), c.key))[:half]
        by_value = sorted(candidates, key=lambda c: (cost_aware_value(c, now_s), c.key))[:half]
        pool = list({c.key: c for c in by_cost + by_value}.values())
        if sum(c.footprint_bytes for c in pool) < need_bytes:   # a shortfall beyond them
            return greedy_victims(cost_aware_value, candidates, need_bytes, now_s)
    cover = cheapest_cover(pool, need_bytes, cost, max(SET_UNIT_BYTES,
                                                       need_bytes / COVER_MAX_UNITS))
    of = {c.key: c for c in pool}
    if sum(of[k].footprint_bytes for k in cover) < need_bytes:
        # A model under one unit counts as one, so a cover of tiny ones may fall short.
        return greedy_victims(cost_aware_value, candidates, need_bytes, now_s)
    return cover


def cost_aware_victims(candidates: Sequence[Candidate], need_bytes: float, now_s: float
                       ) -> tuple[str, ...]:
    """cost-aware's victims when a load needs room: the lowest cost per GB first, unless the
    cheapest cover of the shortfall costs under 1 / COVER_GAIN_MIN of that."""
    by_gb = greedy_victims(cost_aware_value, candidates, need_bytes, now_s)
    cover = cost_aware_cover(candidates, need_bytes, now_s)
    if not cover or not by_gb:
        return cover or by_gb
    of = {c.key: c for c in candidates}

    def total(keys: tuple[str, ...]) -> float:
        return sum(cost_aware_cost(of[k], now_s) for k in keys)
    return cover if COVER_GAIN_MIN * total(cover) < total(by_gb) else by_gb


SetChooser = Callable[[Sequence[Candidate], float, float], tuple[str, ...]]
# Policies whose victims for a load are chosen as a set by a function of their own.
SET_CHOOSERS: dict[str, SetChooser] = {"cost-aware": cost_aware_victims}
