"""A timer-driven caller's period, found from the first request after each lull (its
"starts"): the detector, the starts a pattern keeps, and what survives a restart."""
from __future__ import annotations

import random

import pytest

from proxy.engine.learning import SHORT_GAP_S, START_MAX, ModelPattern
from proxy.engine.timers import MAX_SKIPPED_PERIODS, MIN_PERIOD_STARTS, Period, detect_period

MONDAY = 1_700_438_400.0          # 2023-11-20 00:00 UTC, a Monday
PERIOD_S = 300.0


def starts_every(period_s: float, n: int, jitter_s: float = 0.0) -> list[float]:
    rng = random.Random(3)
    return [i * period_s + rng.uniform(-jitter_s, jitter_s) for i in range(n)]


# -- the detector ------------------------------------------------------------------------------
def test_a_timer_with_jitter_has_its_period_and_window():
    p = detect_period(starts_every(PERIOD_S, 12, jitter_s=20.0))
    assert p is not None and p.period_s == pytest.approx(PERIOD_S, abs=5.0)
    assert -25.0 < p.early_s <= 0.0 <= p.late_s < 25.0 and p.confidence == 1.0


def test_a_missed_start_keeps_the_period_with_less_confidence():
    starts = starts_every(PERIOD_S, 13)
    del starts[6]                                   # one window without a request
    p = detect_period(starts)
    assert p is not None and p.period_s == pytest.approx(PERIOD_S)
    assert p.confidence == pytest.approx(11 / 12)


def test_random_arrivals_have_no_period():
    rng = random.Random(5)
    for _ in range(20):
        starts = [0.0]
        for _ in range(15):
            starts.append(starts[-1] + 60.0 + rng.expovariate(1 / 300.0))
        assert detect_period(starts) is None


def test_too_few_starts_or_a_long_silence_make_no_period():
    assert detect_period(starts_every(PERIOD_S, MIN_PERIOD_STARTS)) is not None
    assert detect_period(starts_every(PERIOD_S, MIN_PERIOD_STARTS - 1)) is None
    starts = starts_every(PERIOD_S, 12)
    assert detect_period(starts[:6] + [t + 2 * PERIOD_S for t in starts[6:]]) is None  # 3 gone
    assert detect_period(starts[:6] + [t + PERIOD_S for t in starts[6:]]) is not None  # 2: kept


def test_starts_drifting_off_one_grid_make_no_period():
    """Every gap is about one period, but the phases wander over more than half of one."""
    starts = [i * 300.0 for i in range(7)] + [1800.0 + i * 420.0 for i in range(1, 6)]
    assert detect_period(starts) is None


def test_the_next_window_is_the_one_after_the_last_start_or_the_first_not_over():
    p = Period(period_s=300.0, anchor_s=0.0, early_s=-10.0, late_s=10.0, confidence=1.0)
    assert p.next_window(3100.0, 3000.0) == (3290.0, 3310.0)
    assert p.next_window(3005.0, 3000.0) == (3290.0, 3310.0)   # this window had its start
    assert p.next_window(3305.0, 3000.0) == (3290.0, 3310.0)   # still open
    assert p.next_window(3400.0, 3000.0) == (3590.0, 3610.0)   # passed without a start


def test_a_window_off_its_anchor_is_found_by_its_middle():
    """The window [200, 350] s past each grid point: a start at either edge belongs to its
    point's window, the next one is a period on."""
    p = Period(period_s=300.0, anchor_s=1000.0, early_s=200.0, late_s=350.0, confidence=1.0)
    assert p.next_window(1201.0, 1200.0) == (1500.0, 1650.0)
    assert p.next_window(1351.0, 1350.0) == (1500.0, 1650.0)
    assert p.next_window(1501.0, 1500.0) == (1800.0, 1950.0)   # the window it opened


def pattern_with_starts(starts: list[float], burst: int = 1) -> ModelPattern:
    p = ModelPattern()
    for s in starts:
        for i in range(burst):
            p.observe(s + i, MONDAY + s + i)
    return p


def test_only_the_first_request_after_a_lull_is_a_start():
    p = pattern_with_starts(starts_every(PERIOD_S, 10), burst=3)
    assert list(p.starts) == starts_every(PERIOD_S, 10)


def test_the_period_is_found_again_when_a_start_comes():
    starts = starts_every(PERIOD_S, MIN_PERIOD_STARTS)
    p = pattern_with_starts(starts[:-1])
    assert p.period(starts[-1]) is None                    # one start short
    p.observe(starts[-1], MONDAY + starts[-1])
    assert p.period(starts[-1]) is not None


def test_a_timer_silent_for_more_than_two_periods_has_stopped():
    p = pattern_with_starts(starts_every(PERIOD_S, 10))
    last = p.starts[-1]
    assert p.period(last + 2 * PERIOD_S) is not None
    assert p.period(last + 2 * PERIOD_S + 1.0) is None


def test_a_gap_the_histogram_calls_long_makes_a_start():
    p = ModelPattern()
    for at_s in (0.0, SHORT_GAP_S - 1.0, 2 * SHORT_GAP_S - 1.0):
        p.observe(at_s, MONDAY + at_s)
    assert list(p.starts) == [0.0, 2 * SHORT_GAP_S - 1.0]
    p.observe(2 * SHORT_GAP_S, MONDAY + 2 * SHORT_GAP_S)
    assert p.after_long.total == 1                      # a gap after a long one, there too


def test_only_the_latest_starts_are_kept():
    starts = starts_every(PERIOD_S, 3 * START_MAX)
    p = pattern_with_starts(starts)
    assert list(p.starts) == starts[-START_MAX:]
    again = ModelPattern.restore({"starts_wall_s": [MONDAY + t for t in starts]},
                                 starts[-1], MONDAY + starts[-1])
    assert list(again.starts) == starts[-START_MAX:]


def test_the_period_is_detected_once_per_start():
    p = pattern_with_starts(starts_every(PERIOD_S, 10))
    last = p.starts[-1]
    assert p.period(last + 1.0) is p.period(last + 100.0)


def test_a_jittered_timer_stops_after_two_periods_and_its_window():
    p = pattern_with_starts(starts_every(PERIOD_S, 12, jitter_s=20.0))
    period, last = p.period(p.starts[-1]), p.starts[-1]
    assert period.early_s < -5.0 and period.late_s > 5.0
    silent_s = MAX_SKIPPED_PERIODS * period.period_s + period.late_s - period.early_s
    assert p.period(last + silent_s) == period
    assert p.period(last + silent_s + 1.0) is None


def test_starts_survive_a_snapshot():
    p = pattern_with_starts(starts_every(PERIOD_S, 10))
    last = p.starts[-1]
    # Restarted 100 s of wall time later, on a monotonic clock that now reads 50.
    again = ModelPattern.restore(p.snapshot(last + 10.0, MONDAY + last + 10.0),
                                 50.0, MONDAY + last + 110.0)
    assert [round(s, 6) for s in again.starts] == \
        [round(s - last - 60.0, 6) for s in p.starts]
    assert again.period(50.0) == Period(PERIOD_S, -last - 60.0, 0.0, 0.0, 1.0)


def test_a_pattern_saved_before_starts_were_kept_restores_without_them():
    p = pattern_with_starts(starts_every(PERIOD_S, 10))
    old = p.snapshot(3000.0, MONDAY + 3000.0)
    del old["starts_wall_s"]
    again = ModelPattern.restore(old, 50.0, MONDAY + 3100.0)
    assert not again.starts and again.period(50.0) is None
    again.observe(60.0, MONDAY + 3110.0)                 # and learns them anew
    assert list(again.starts) == [60.0]


def test_starts_after_a_wall_clock_that_went_back_are_now_and_show_no_period():
    """Restored on a wall clock an hour behind the one they were saved on: the starts, all in
    its future, are taken as now (not later), and equal starts make no period."""
    p = pattern_with_starts(starts_every(PERIOD_S, 10))
    last = p.starts[-1]
    again = ModelPattern.restore(p.snapshot(last, MONDAY + last), 50.0, MONDAY + last - 3600.0)
    assert list(again.starts) == [50.0] * 10
    assert again.period(50.0) is None


def poisson_starts(rng: random.Random, mean_gap_s: float, n: int) -> list[float]:
    """The first n starts of a caller at random (exponential gaps), as the pattern keeps them."""
    p, at = ModelPattern(), 0.0
    while len(p.starts) < n:
        at += rng.expovariate(1 / mean_gap_s)
        p.observe(at, MONDAY + at)
    return list(p.starts)


def test_a_caller_at_random_is_rarely_called_a_timer_while_its_starts_are_few():
    """Checked after each of its first 16 starts (as the preloader does, once 8 are in), a
    Poisson caller seldom shows a period: within half a period, random phases fit by chance
    in 1 caller of 6; with fewer than 12 starts they must fit in 0.3 of one."""
    rng = random.Random(1)
    callers = [poisson_starts(rng, 80.0, 16) for _ in range(200)]
    called = sum(any(detect_period(s[:n]) for n in range(MIN_PERIOD_STARTS, 17)) for s in callers)
    assert called <= 10                                       # 5 %


def test_a_timer_jittered_by_an_eighth_of_its_period_is_learnt_in_8_starts():
    rng = random.Random(2)
    for _ in range(50):
        starts = [i * 80.0 + rng.uniform(-10.0, 10.0) for i in range(MIN_PERIOD_STARTS)]
        assert detect_period(starts) is not None
