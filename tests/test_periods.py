"""A timer's model: its period found from the first request after each lull, and the model
preloaded, on the engine's virtual clock, its reload seconds before the period's next window."""
from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

from proxy.engine.learning import MAX_SKIPPED_PERIODS, MIN_PERIOD_STARTS, SHORT_GAP_S, \
    START_MAX, ModelPattern, Period, detect_period
from proxy.engine.lifecycle import ModelStatus
from proxy.engine.preload import MIN_TICK_S, PERIOD_LEAD_S

from .test_waits import run, settle, tick_in_full_memory, use

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


# -- the preloader -----------------------------------------------------------------------------
async def teach_timer(mgr, loop, periods: int = 12, jitter_s: float = 0.0) -> float:
    """`timer` is asked for every five minutes (each start up to jitter_s off its time), then
    unloaded; returns its last start."""
    first = loop.time()
    times = [first + t for t in starts_every(PERIOD_S, periods + 1, jitter_s)]
    times[0] = first
    for at_s in times[1:]:
        await use(mgr, loop, "timer", 0.0)            # (the first waits for its load)
        await asyncio.sleep(at_s - loop.time())
    last = loop.time()
    await use(mgr, loop, "timer", 0.0)
    await mgr.unload_model("timer")
    return last


RELOAD_S = 3.0
DUE_S = PERIOD_S - RELOAD_S - PERIOD_LEAD_S       # after the last start


def test_a_timer_is_preloaded_its_reload_seconds_before_its_window():
    async def script(mgr, loop):
        last = await teach_timer(mgr, loop)
        await asyncio.sleep(last + 270.0 - loop.time())
        await mgr.core.preloader.tick()               # not due yet: nothing, but a due time
        early = mgr.core.preloads.queued
        wait_s = mgr.core.preloader.wait_s(30.0)
        await asyncio.sleep(wait_s)
        await mgr.core.preloader.tick()
        await settle(mgr)
        return (early, wait_s, mgr.core.registry.entries["timer"].status,
                loop.time() - last, mgr.core.preloads.preloads)
    early, wait_s, status, ready_s, preloads = run(
        {"timer": (4, RELOAD_S), "other": (4, 3.0)}, 12, script, hold="off")
    assert early == 0 and wait_s == pytest.approx(DUE_S - 270.0)      # under 30 s
    assert status is ModelStatus.LOADED and preloads == 1
    assert ready_s == pytest.approx(PERIOD_S - PERIOD_LEAD_S)   # ready as its window opens


def test_the_engine_ticks_at_a_timers_due_time_not_the_interval():
    """The monitoring interval (30 s) would tick at 290 s and 320 s after the last start; the
    window opens at 300 s. The engine's own loop ticks at the due time in between."""
    async def script(mgr, loop):
        last = await teach_timer(mgr, loop)
        await asyncio.sleep(last + 260.0 - loop.time())
        await mgr.core.start_monitoring()
        try:
            await asyncio.sleep(last + PERIOD_S - 1.0 - loop.time())
            return mgr.core.registry.entries["timer"].status
        finally:
            await mgr.core.stop_monitoring()
    assert run({"timer": (4, RELOAD_S), "other": (4, 3.0)}, 12, script,
               hold="off") is ModelStatus.LOADED


def test_a_timer_that_stopped_is_preloaded_no_more():
    async def script(mgr, loop):
        last = await teach_timer(mgr, loop)
        await asyncio.sleep(last + 2 * PERIOD_S + 10.0 - loop.time())
        await mgr.core.preloader.tick()
        await settle(mgr)
        return mgr.core.preloads.queued, mgr.core.preloader.wait_s(30.0)
    assert run({"timer": (4, RELOAD_S), "other": (4, 3.0)}, 12, script,
               hold="off") == (0, 30.0)


async def teach_timer_until_due(mgr, loop) -> None:
    """Taught until 5 s before the timer falls due: loading the two models that then fill the
    memory (tick_in_full_memory) takes 6 s, so the tick runs 1 s after the due time."""
    last = await teach_timer(mgr, loop)
    await asyncio.sleep(last + DUE_S - 5.0 - loop.time())


def test_a_timer_is_preloaded_by_evicting_an_idle_model():
    loaded, preloads = run({"timer": (4, RELOAD_S), "serving": (4, 3.0), "pinned": (4, 3.0),
                            "idle": (4, 3.0)}, 12, tick_in_full_memory(teach_timer_until_due),
                           hold="off", pinned=("pinned",))
    assert loaded == ["pinned", "serving", "timer"] and preloads == 1


def test_a_timer_evicts_nothing_that_serves_or_is_pinned():
    async def script(mgr, loop):
        await teach_timer_until_due(mgr, loop)
        await use(mgr, loop, "pinned", 0.0)
        leases = [await mgr.acquire("serving"), await mgr.acquire("busy")]
        await mgr.core.preloader.tick()
        await settle(mgr)
        for lease in leases:
            lease.release()
        return mgr.core.registry.loaded(), mgr.core.preloads.queued, mgr.core.preloads.preloads
    loaded, queued, preloads = run({"timer": (4, RELOAD_S), "serving": (4, 3.0),
                                    "pinned": (4, 3.0), "busy": (4, 3.0)}, 12, script,
                                   hold="off", pinned=("pinned",))
    assert queued == 1                                  # due, and asked for room
    assert loaded == ["busy", "pinned", "serving"] and preloads == 0


def test_the_tick_waits_for_a_due_time_within_the_interval_and_at_least_a_second():
    async def script(mgr, loop):
        last = await teach_timer(mgr, loop)
        await asyncio.sleep(last + 200.0 - loop.time())
        await mgr.core.preloader.tick()
        waits = mgr.core.preloader.wait_s(30.0), mgr.core.preloader.wait_s(600.0)
        await asyncio.sleep(last + DUE_S + 0.5 - loop.time())     # due, and no tick yet
        return waits + (mgr.core.preloader.wait_s(30.0),)
    interval_s, due_s, overdue_s = run({"timer": (4, RELOAD_S), "other": (4, 3.0)}, 12, script,
                                       hold="off")
    assert interval_s == 30.0 and due_s == pytest.approx(DUE_S - 200.0)
    assert overdue_s == MIN_TICK_S


def test_a_tick_within_the_window_of_a_start_looks_to_the_next_window():
    """A jittered timer: a tick a second after its latest start, while that start's window is
    still open, falls due a period on (not now: that window had its start)."""
    async def script(mgr, loop):
        last = await teach_timer(mgr, loop, jitter_s=20.0)
        period = mgr.core.learner.patterns["timer"].period(last)
        await asyncio.sleep(1.0)
        await mgr.core.preloader.tick()
        await settle(mgr)
        return period, mgr.core.preloader.wait_s(600.0), mgr.core.preloads.queued
    period, wait_s, queued = run({"timer": (4, RELOAD_S), "other": (4, 3.0)}, 12, script,
                                 hold="off")
    assert period.late_s > 1.0 and queued == 0
    assert wait_s == pytest.approx(
        period.period_s + period.early_s - RELOAD_S - PERIOD_LEAD_S - 1.0)


def test_the_tick_waits_for_the_earliest_of_several_timers():
    """Three timers asked for at the same moments, each with its own reload seconds: the one
    slowest to load falls due first."""
    reloads_s = {"a": 3.0, "b": 30.0, "c": 15.0}

    async def script(mgr, loop):
        for i in range(10):
            await asyncio.sleep(i * PERIOD_S - loop.time())
            await asyncio.gather(*(use(mgr, loop, k, 0.0) for k in reloads_s))
        last = 9 * PERIOD_S
        await asyncio.sleep(last + 100.0 - loop.time())
        await mgr.core.preloader.tick()
        return mgr.core.preloader.wait_s(600.0)
    wait_s = run({k: (4, r) for k, r in reloads_s.items()}, 16, script, hold="off")
    assert wait_s == pytest.approx(PERIOD_S - 30.0 - PERIOD_LEAD_S - 100.0)


def test_a_request_waiting_at_a_timers_due_time_delays_its_preload_a_tick_not_an_interval():
    """At the due time a request waits for memory that long requests hold, and the tick
    preloads nothing (a preload gives way to it); once they end, the timer's model is preloaded within seconds, not at the
    next monitoring interval (30 s on)."""
    async def script(mgr, loop):
        leases = [await mgr.acquire(k) for k in ("a", "b", "d")]     # serving all along
        last = await teach_timer(mgr, loop)
        await asyncio.sleep(last + 260.0 - loop.time())
        await mgr.core.start_monitoring()                # ticks at 290 s, then at the due time
        try:
            await asyncio.sleep(last + DUE_S - 3.0 - loop.time())
            waiting = asyncio.create_task(use(mgr, loop, "c", 0.0))   # 8 GB: 4 GB are free
            await asyncio.sleep(last + DUE_S + 1.0 - loop.time())
            was_waiting = mgr.core.scheduler.requests_waiting, mgr.core.preloads.queued
            for lease in leases:
                lease.release()
            await asyncio.sleep(last + PERIOD_S + 8.0 - loop.time())
            await waiting
            return was_waiting, mgr.core.registry.entries["timer"].status
        finally:
            await mgr.core.stop_monitoring()
    models = {k: (4, RELOAD_S) for k in ("timer", "a", "b", "d")} | {"c": (8, RELOAD_S)}
    assert run(models, 16, script, hold="off") == ((True, 0), ModelStatus.LOADED)


def test_a_tick_with_preloading_turned_off_leaves_nothing_due():
    async def script(mgr, loop):
        last = await teach_timer(mgr, loop)
        await asyncio.sleep(last + 200.0 - loop.time())
        await mgr.core.preloader.tick()
        due_s = mgr.core.preloader.wait_s(600.0)
        c = mgr.core.config
        mgr.core.apply_config(dataclasses.replace(
            c, preload=dataclasses.replace(c.preload, enabled=False)))
        await mgr.core.preloader.tick()
        wait_s = mgr.core.preloader.wait_s(600.0)
        await asyncio.sleep(last + DUE_S + 1.0 - loop.time())
        await mgr.core.preloader.tick()                 # due, but preloading is off
        return due_s, wait_s, mgr.core.preloads.queued
    assert run({"timer": (4, RELOAD_S), "other": (4, 3.0)}, 12, script, hold="off") == \
        (pytest.approx(DUE_S - 200.0), 600.0, 0)


def test_the_history_of_a_model_no_longer_listed_is_passed_over():
    """Usage restored from the store for a model the upstream no longer lists."""
    async def script(mgr, loop):
        last = await teach_timer(mgr, loop)
        for t in starts_every(PERIOD_S, 10):
            mgr.core.learner.observe("gone", last - 3000.0 + t, MONDAY + t)
        await asyncio.sleep(last + 200.0 - loop.time())
        await mgr.core.preloader.tick()
        return mgr.core.preloader.wait_s(600.0)
    assert run({"timer": (4, RELOAD_S), "other": (4, 3.0)}, 12, script, hold="off") == \
        pytest.approx(DUE_S - 200.0)
