"""A model's requests and failures over the last `health.error_window_s`, sliding.

The engine counts requests and failures per model as running totals (and per minute). Counting
the window in whole minutes made it shrink to a few seconds each time a minute began, so an
alert under steady failure closed and reopened every minute. Here the window is a difference of
totals: now, minus the totals at the newest check at least a window ago, so it spans
error_window_s plus at most one check interval (or 1/64 of the window, whichever is longer:
checks closer than that are not kept), and never less. Until the checks reach that far back
(the monitor's first window, or a window made longer by a reload), the totals at the start of
the minute holding `now - window` come from the per-minute counts instead.
"""
from __future__ import annotations

import collections

from ..engine.usage import WINDOW_MINUTES, ModelUsage

# Checks kept per model: at most about this many per window.
SNAPSHOTS_PER_WINDOW = 64


class ErrorWindow:
    def __init__(self) -> None:
        # per model, its checks' totals, oldest first: (at_s, requests, failures)
        self._models: dict[str, collections.deque[tuple[float, int, int]]] = {}

    def counts(self, key: str, usage: ModelUsage, now_s: float, window_s: float
               ) -> tuple[int, int]:
        """(requests, failures) of `key` over at least the last `window_s`; records this
        check's totals for later ones."""
        requests, failures = usage.requests, usage.failures
        snaps = self._models.setdefault(key, collections.deque())
        if snaps and (requests < snaps[-1][1] or failures < snaps[-1][2]):
            snaps.clear()   # totals went down (a fleet's host left): the history is void
        start_s = now_s - window_s
        while len(snaps) > 1 and snaps[1][0] <= start_s:
            snaps.popleft()   # keep the newest snapshot that is at least a window old
        if snaps and snaps[0][0] <= start_s:
            base_requests, base_failures = snaps[0][1], snaps[0][2]
        else:
            base_requests, base_failures = _from_minutes(usage, now_s, start_s)
        if not snaps or now_s - snaps[-1][0] >= window_s / SNAPSHOTS_PER_WINDOW:
            snaps.append((now_s, requests, failures))
        return requests - base_requests, failures - base_failures

    def forget(self, keep: set[str]) -> None:
        """Drop models no longer known."""
        for key in [k for k in self._models if k not in keep]:
            del self._models[key]


def _from_minutes(usage: ModelUsage, now_s: float, start_s: float) -> tuple[int, int]:
    """The totals at the start of the minute holding start_s: the totals now less the
    per-minute counts from that minute on (as far as the per-minute ring reaches)."""
    minutes = min(WINDOW_MINUTES, int(now_s // 60) - int(start_s // 60) + 1)
    # (never below 0: restored per-minute rows may hold more than the restored totals)
    return (max(0, usage.requests - usage.per_minute.total(now_s, 0, minutes)),
            max(0, usage.failures - usage.failures_per_minute.total(now_s, 0, minutes)))
