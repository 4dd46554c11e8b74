"""Callers driven by a clock, found from a model's "starts" (the first request after a lull of a
minute or more). Pure code.

- A **period**: the starts fall on a grid of one period (a caller every five minutes, every
  hour), within a phase window learnt from them (`detect_period`). The window says when the
  next start is due, to the second, which a histogram of gaps with bins 25 % wide cannot.
- A **minute of the hour**: the starts fall in one minute of the hour far more often than in
  the others (a job run by cron at :00 or at :30, though not every hour: a period's grid breaks
  on the hours it skips). The chance of a start there is counted per hour observed
  (`ClockMinute`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MIN_PERIOD_STARTS = 8       # a period is believed after this many starts on its grid
PERIOD_SPREAD = 0.5        # the starts' phase may spread over at most this share of it
MAX_SKIPPED_PERIODS = 2     # a gap of more than this many periods breaks the grid
FEW_STARTS = 12             # with fewer starts than this, their phases must lie closer:
FEW_STARTS_SPREAD = 0.3     # within this share of a period (random arrivals' first starts
                            # fit within half of one by chance for over 10 % of callers)
MIN_CLOCK_STARTS = 3        # a minute of the hour is a job's when this many starts fell in it
CLOCK_CONTRAST = 4.0        # and this many times the mean of the other minutes (measured: 2 and
                            # 4 alike; 10 misses jobs)
CLOCK_HOURS_CAP = 168.0     # counts are halved past a week of hours: old habits fade


@dataclass(frozen=True)
class Period:
    """Starts on a grid: anchor_s + k × period_s, each within [early_s, late_s] of its point."""
    period_s: float
    anchor_s: float
    early_s: float
    late_s: float
    confidence: float        # the share of the grid's periods that had a start

    def next_window(self, now_s: float, last_start_s: float) -> tuple[float, float]:
        """The window of the next start: after the one of last_start_s, and not yet over at
        now_s (a period without a start is skipped)."""
        p = self.period_s
        middle = (self.early_s + self.late_s) / 2
        k = max(round((last_start_s - self.anchor_s - middle) / p) + 1,
                math.floor((now_s - self.anchor_s - self.late_s) / p) + 1)
        base = self.anchor_s + k * p
        return base + self.early_s, base + self.late_s


def detect_period(starts: Sequence[float]) -> Period | None:
    """A period if the starts (ascending) lie on one grid: every gap is close to a whole
    number (1 … MAX_SKIPPED_PERIODS) of periods, and the phases spread over at most
    PERIOD_SPREAD of a period (FEW_STARTS_SPREAD while there are fewer than FEW_STARTS).
    Random arrivals mostly fail the first test: a third of their gaps are under half the
    median."""
    if len(starts) < MIN_PERIOD_STARTS:
        return None
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    median = sorted(gaps)[len(gaps) // 2]
    if median <= 0.0:
        return None
    counts = [round(g / median) for g in gaps]
    if min(counts) < 1 or max(counts) > MAX_SKIPPED_PERIODS:
        return None
    periods = sum(counts)
    period = (starts[-1] - starts[0]) / periods     # to within one phase window over periods
    phases, k = [0.0], 0
    for s, n in zip(starts[1:], counts):
        k += n
        phases.append(s - starts[0] - k * period)
    early, late = min(phases), max(phases)
    spread = PERIOD_SPREAD if len(starts) >= FEW_STARTS else FEW_STARTS_SPREAD
    if late - early > spread * period:
        return None
    return Period(period, starts[0], early, late, len(gaps) / periods)


def minute_of_hour(wall_s: float) -> int:
    return int(wall_s // 60.0) % 60


def busiest_minute(minute_starts: Sequence[int]) -> tuple[int, int] | None:
    """The minute of the hour with the most starts, with its count, if it stands out: at least
    MIN_CLOCK_STARTS of them, and CLOCK_CONTRAST times the mean of the other minutes."""
    minute = max(range(60), key=minute_starts.__getitem__)
    hits = minute_starts[minute]
    others = (sum(minute_starts) - hits) / 59.0
    if hits < MIN_CLOCK_STARTS or hits < CLOCK_CONTRAST * others:
        return None
    return minute, hits


@dataclass(frozen=True)
class ClockMinute:
    """A job run by the clock: a start in this minute of the hour, with this chance an hour."""
    minute: int
    chance: float

    def opens_in_s(self, wall_s: float) -> float:
        """Seconds until the minute next begins; zero or less while it is under way."""
        opens = wall_s - wall_s % 3600.0 + self.minute * 60.0
        if opens + 60.0 <= wall_s:
            opens += 3600.0
        return opens - wall_s


@dataclass(frozen=True)
class NextRun:
    """A clock-driven caller's next run: its window opens in opens_in_s (zero or less while it
    is under way), with this chance of a request then."""
    opens_in_s: float
    chance: float
    minute: int | None     # a job's minute of the hour; None: a period's window (to the second)

    @property
    def by_period(self) -> bool:
        return self.minute is None

    @property
    def why(self) -> str:
        return "due by its period" if self.minute is None else \
            f"usually asked for at minute :{self.minute:02d}"
