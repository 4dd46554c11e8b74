"""Eviction policies: pure functions from frozen inputs to victims. No I/O, no logging.

`select_victims(policy, candidates, need_bytes, now_s, inflation)` returns the models to unload
so that at least `need_bytes` are freed, in eviction order, plus the policy's new inflation value
(only `cost-aware` uses it). An empty selection means the need cannot be met by these candidates.

- `lru`: least recently used first.
- `priority`: the original design's score: priority (1-10), recency and frequency, lowest first.
- `cost-aware`: GreedyDual-Size-Frequency. A model's value is what keeping it saves per byte
  held: H = L + priority_weight × frequency × reload_seconds / GB. The lowest H goes first and L
  (the inflation) rises to the evicted H, so models that stopped being used age out even if
  they were once busy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

GB = 1_000_000_000


@dataclass(frozen=True)
class Candidate:
    key: str
    footprint_bytes: float
    last_used_s: float        # clock time of last use (load time if never used)
    priority: int = 5         # 1..10, higher keeps
    reload_s: float = 1.0     # expected seconds to load again
    uses: int = 0             # requests since it was loaded
    rate_per_h: float = 0.0   # recent request rate
    gdsf_base: float = 0.0    # inflation value at its last use (cost-aware)


@dataclass(frozen=True)
class Selection:
    victims: tuple[str, ...]
    inflation: float

    def __bool__(self) -> bool:
        return bool(self.victims)


def _priority_weight(priority: int) -> float:
    return 2.0 ** ((priority - 5) / 2.5)   # 1 → 0.33, 5 → 1, 10 → 4


def lru_value(c: Candidate, now_s: float, inflation: float) -> float:
    return c.last_used_s


def priority_value(c: Candidate, now_s: float, inflation: float) -> float:
    idle_h = max(0.0, now_s - c.last_used_s) / 3600.0
    recency = 1.0 / (1.0 + idle_h)                 # 1 when just used, → 0 when idle for long
    frequency = math.log1p(c.rate_per_h) / math.log1p(100.0)
    return c.priority / 10.0 * 0.5 + recency * 0.3 + min(frequency, 1.0) * 0.2


def gdsf_value(c: Candidate, now_s: float, inflation: float) -> float:
    frequency = max(1.0, float(c.uses))
    gb = max(c.footprint_bytes / GB, 0.05)
    return c.gdsf_base + _priority_weight(c.priority) * frequency * max(c.reload_s, 0.01) / gb


VALUE_FUNCTIONS: dict[str, Callable[[Candidate, float, float], float]] = {
    "lru": lru_value,
    "priority": priority_value,
    "cost-aware": gdsf_value,
}


def select_victims(policy: str, candidates: Sequence[Candidate], need_bytes: float,
                   now_s: float, inflation: float = 0.0, *, partial: bool = False
                   ) -> Selection:
    """partial=True (relieving pressure): when the need cannot be met, free what can be."""
    if need_bytes <= 0:
        return Selection((), inflation)
    value = VALUE_FUNCTIONS[policy]
    scored = sorted(candidates, key=lambda c: (value(c, now_s, inflation), c.last_used_s,
                                               c.key))
    chosen: list[Candidate] = []
    freed = 0.0
    for c in scored:
        if freed >= need_bytes:
            break
        chosen.append(c)
        freed += c.footprint_bytes
    if freed < need_bytes and not partial:
        return Selection((), inflation)
    # Keep the most valuable of those chosen when the rest already free enough.
    for c in sorted(chosen, key=lambda c: -value(c, now_s, inflation)):
        if freed - c.footprint_bytes >= need_bytes:
            chosen.remove(c)
            freed -= c.footprint_bytes
    if policy == "cost-aware" and chosen:
        inflation = max(inflation, max(value(c, now_s, inflation) for c in chosen))
    return Selection(tuple(c.key for c in chosen), inflation)
