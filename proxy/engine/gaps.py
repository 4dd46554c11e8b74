"""The distribution of the gaps between a model's requests, in bounded memory (learning.py).

Log-spaced bins from half a second to about nine days; counts are halved past COUNT_CAP so
that old habits fade. Pure code.
"""
from __future__ import annotations

import bisect
import math

GAP_RATIO = 1.25
# 0.5 s … ~9 days, log-spaced: about 65 bins.
GAP_BOUNDS_S = tuple(0.5 * GAP_RATIO ** i for i in range(int(math.log(8e5 / 0.5, GAP_RATIO)) + 2))
COUNT_CAP = 4096            # counts are halved beyond this: old habits fade


def bin_of(gap_s: float) -> int:
    return bisect.bisect_left(GAP_BOUNDS_S, gap_s)


class GapHistogram:
    __slots__ = ("counts", "total")

    def __init__(self, counts: list[int] | None = None) -> None:
        self.counts = counts if counts is not None else [0] * (len(GAP_BOUNDS_S) + 1)
        self.total = sum(self.counts)

    def add(self, gap_s: float) -> None:
        self.counts[bisect.bisect_left(GAP_BOUNDS_S, gap_s)] += 1   # bin_of, without its call
        self.total += 1
        if self.total > COUNT_CAP:
            self.counts = [c // 2 for c in self.counts]
            self.total = sum(self.counts)

    def survival(self, x_s: float) -> float:
        """How many gaps were longer than x_s (interpolated within its bin, log scale)."""
        if self.total == 0:
            return 0.0
        i = bin_of(x_s)
        above = float(sum(self.counts[i + 1:]))
        if i >= len(GAP_BOUNDS_S):
            return above + self.counts[i]          # past the last bound: count it all
        hi = GAP_BOUNDS_S[i]
        if i == 0:
            frac = (hi - x_s) / hi
        else:
            lo = GAP_BOUNDS_S[i - 1]
            frac = (math.log(hi) - math.log(x_s)) / (math.log(hi) - math.log(lo))
        return above + self.counts[i] * min(1.0, max(0.0, frac))

    def remove(self, gap_s: float) -> None:
        """Takes back one gap added before (a request heard late fell inside it: learning.py).
        After a halving the bin may hold none: then there is nothing to take."""
        i = bin_of(gap_s)
        if self.counts[i] > 0:
            self.counts[i] -= 1
            self.total -= 1
