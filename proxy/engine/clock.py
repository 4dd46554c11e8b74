"""Injected time: the engine reads `clock.now()` (seconds, monotonic) and never time.* itself."""
from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...          # monotonic seconds: durations, ages, timeouts
    def wall(self) -> float: ...         # Unix seconds: history that outlives the process


class SystemClock:
    # The C functions themselves: no Python frame on the request path, which reads them often.
    now = staticmethod(time.monotonic)
    wall = staticmethod(time.time)


class ManualClock:
    """A clock that moves only when told to; for tests of timeouts and rates."""

    def __init__(self, start_s: float = 1_000.0, wall_at_zero_s: float = 1_700_000_000.0
                 ) -> None:
        self._now_s = start_s
        self._wall_at_zero_s = wall_at_zero_s   # another process's clock: another zero

    def now(self) -> float:
        return self._now_s

    def wall(self) -> float:
        return self._wall_at_zero_s + self._now_s

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not run backwards")
        self._now_s += seconds
