"""A job run by the clock that skips hours (cron at :00, not every hour): the minute of the hour
its starts stand out in, the chance of a start there per hour, and its preload before that
minute, on the engine's virtual clock (whose wall time 0 is 00:00)."""
from __future__ import annotations

import asyncio
import logging

import pytest

from proxy.engine.learner import UsageLearner
from proxy.engine.learning import SHORT_GAP_S, ModelPattern
from proxy.engine.lifecycle import ModelStatus
from proxy.engine.preload import PERIOD_LEAD_S
from proxy.engine.timers import CLOCK_CONTRAST, CLOCK_HOURS_CAP, MIN_CLOCK_STARTS, ClockMinute, \
    busiest_minute

from .test_waits import evict, run, settle, tick_in_full_memory, use

HOUR_S = 3600.0
RELOAD_S = 3.0


def starts_in(minute: int, hits: int, others: int = 0) -> list[int]:
    counts = [0] * 60
    counts[minute] = hits
    for i in range(others):                      # spread over the other minutes
        counts[(minute + 1 + i % 59) % 60] += 1
    return counts


# -- the minute ---------------------------------------------------------------------------------
def test_a_minute_stands_out_after_enough_starts():
    assert busiest_minute(starts_in(5, MIN_CLOCK_STARTS)) == (5, MIN_CLOCK_STARTS)
    assert busiest_minute(starts_in(5, MIN_CLOCK_STARTS - 1)) is None


def test_a_minute_must_outnumber_the_others_by_the_contrast():
    # 3 starts stand out against 44 elsewhere (under 4 × 44 / 59 = 2.98), not against 45
    fits = int(MIN_CLOCK_STARTS * 59 / CLOCK_CONTRAST)
    assert busiest_minute(starts_in(5, MIN_CLOCK_STARTS, others=fits)) == (5, MIN_CLOCK_STARTS)
    assert busiest_minute(starts_in(5, MIN_CLOCK_STARTS, others=fits + 1)) is None


@pytest.mark.parametrize("wall_s, opens_in_s", [
    (10 * HOUR_S + 29 * 60.0, 60.0),              # a minute before :30
    (10 * HOUR_S + 30 * 60.0 + 30.0, -30.0),      # under way
    (10 * HOUR_S + 31 * 60.0, HOUR_S - 60.0),     # over: the next hour's
    (10 * HOUR_S + 45 * 60.0, 45 * 60.0)])
def test_the_minute_opens_next_at_its_place_in_the_hour(wall_s, opens_in_s):
    assert ClockMinute(30, 1.0).opens_in_s(wall_s) == pytest.approx(opens_in_s)


def observe_at(p: ModelPattern, *walls: float) -> None:
    for w in walls:
        p.observe(w, w)


def test_only_the_first_request_after_a_lull_counts_in_its_minute():
    p = ModelPattern()
    burst = [0.0, 30.0, 30.0 + SHORT_GAP_S - 1.0]           # one start, at :00 (the last at :01)
    observe_at(p, *burst, burst[-1] + SHORT_GAP_S)         # after a lull: a start, at :02
    assert p.minute_starts[:3] == [1, 0, 1] and sum(p.minute_starts) == 2


def test_the_chance_is_its_starts_in_the_minute_per_hour_since_first_asked():
    p = ModelPattern()
    observe_at(p, 0.0, HOUR_S, 3 * HOUR_S)               # :00 of hours 0, 1 and 3
    clock = p.clock(5 * HOUR_S)
    assert clock == ClockMinute(0, pytest.approx(3 / 5))
    assert p.clock(0.0).chance == 1.0                      # no hour yet counts as one
    assert p.clock(HOUR_S + 60.0).chance == 1.0            # capped; an hour at least
    observe_at(p, 4 * HOUR_S + 30 * 60.0)                 # found again after a new start
    assert p.clock(5 * HOUR_S) == ClockMinute(0, pytest.approx(3 / 5))
    observe_at(p, 5 * HOUR_S + 30 * 60.0, 6 * HOUR_S + 30 * 60.0, 7 * HOUR_S + 30 * 60.0)
    assert p.clock(8 * HOUR_S).minute == 30


def test_counts_and_hours_are_halved_past_a_week_of_hours():
    p = ModelPattern()
    hours = int(CLOCK_HOURS_CAP)
    observe_at(p, *(h * HOUR_S for h in range(0, hours + 1, 2)))   # every other hour, :00
    assert p.minutes_since_wall_s == 0.0 and p.minute_starts[0] == hours // 2 + 1
    observe_at(p, (hours + 2) * HOUR_S)                   # past the cap: halved, then counted
    assert p.minutes_since_wall_s == pytest.approx((hours + 2) * HOUR_S / 2)
    assert p.minute_starts[0] == (hours // 2 + 1) // 2 + 1
    assert p.clock((hours + 2) * HOUR_S).chance == pytest.approx(0.5, abs=0.02)


def test_the_minutes_survive_a_restart():
    p = ModelPattern()
    observe_at(p, 0.0, HOUR_S, 3 * HOUR_S)
    snap = p.snapshot(now_s=3 * HOUR_S, wall_s=3 * HOUR_S)
    again = ModelPattern.restore(snap, now_s=10.0, wall_s=5 * HOUR_S)
    assert again.minute_starts == p.minute_starts and again.minutes_since_wall_s == 0.0
    assert again.clock(5 * HOUR_S) == p.clock(5 * HOUR_S)
    del snap["minute_starts"]                             # a file written before: no minutes
    older = ModelPattern.restore(snap, now_s=10.0, wall_s=5 * HOUR_S)
    assert sum(older.minute_starts) == 0 and older.clock(5 * HOUR_S) is None


# -- the preload --------------------------------------------------------------------------------
async def teach_job(mgr, loop, hours=(0, 1, 3, 4), minute: int = 0) -> None:
    """`job` asked for at :MM of these hours (unloaded after each), then the clock is taken to
    a minute before its next run."""
    for h in hours:
        await asyncio.sleep(h * HOUR_S + minute * 60.0 - loop.time())
        await use(mgr, loop, "job", 0.0)
        await evict(mgr, "job")
    await asyncio.sleep((hours[-1] + 1) * HOUR_S + (minute - 1) * 60.0 - loop.time())


def test_a_job_is_preloaded_its_reload_seconds_before_its_minute():
    async def script(mgr, loop):
        await teach_job(mgr, loop, minute=30)
        await mgr.core.preloader.tick()                    # 60 s ahead: not due, a due time
        early = mgr.core.preloads.queued
        wait_s = mgr.core.preloader.wait_s(120.0)
        await asyncio.sleep(wait_s)
        await mgr.core.preloader.tick()
        await settle(mgr)
        return early, wait_s, mgr.core.registry.entries["job"].status, loop.time()
    early, wait_s, status, ready_at_s = run({"job": (4, RELOAD_S), "other": (4, 3.0)}, 12,
                                            script, hold="off")
    assert early == 0 and wait_s == pytest.approx(60.0 - RELOAD_S - PERIOD_LEAD_S)
    assert status is ModelStatus.LOADED
    assert ready_at_s == pytest.approx(5 * HOUR_S + 30 * 60.0 - PERIOD_LEAD_S)


def test_a_job_under_the_preloads_probability_is_not_preloaded():
    """:00 of hours 0, 3 and 5: three starts in six hours when it would fall due, a chance of
    0.5 (min_probability 0.6; hours 0, 1, 3 and 4 give 0.8 before 05:00)."""
    async def script(mgr, loop):
        await teach_job(mgr, loop, hours=(0, 3, 5))
        await asyncio.sleep(6 * HOUR_S - RELOAD_S - PERIOD_LEAD_S - loop.time())
        await mgr.core.preloader.tick()
        await settle(mgr)
        return (mgr.core.preloads.queued, mgr.core.preloader.wait_s(30.0),
                mgr.core.row("job")["clock"])
    queued, wait_s, clock = run({"job": (4, RELOAD_S), "other": (4, 3.0)}, 12, script,
                                hold="off")
    assert queued == 0 and wait_s == 30.0                   # and no due time from it
    assert clock["minute"] == 0 and clock["chance_per_hour"] == 0.5


def test_a_models_row_shows_its_minute():
    async def script(mgr, loop):
        await teach_job(mgr, loop)
        before = mgr.core.row("job")["clock"]
        await asyncio.sleep(90.0)                           # :00:30, under way
        return before, mgr.core.row("job")["clock"], mgr.core.row("other")["clock"]
    clock, during, other = run({"job": (4, RELOAD_S), "other": (4, 3.0)}, 12, script,
                               hold="off")
    assert clock == {"minute": 0, "chance_per_hour": round(4 / (4 + 59 / 60), 2),
                     "next_in_s": 60.0}
    assert during["next_in_s"] == 0.0 and other is None


def test_an_hourly_timer_is_preloaded_by_its_period_not_its_minute(caplog):
    """Every hour at :00: a period (its window known to the second) and a minute; the period
    rules, and the row shows it alone."""
    async def script(mgr, loop):
        await teach_job(mgr, loop, hours=tuple(range(10)))
        row = mgr.core.row("job")
        await asyncio.sleep(60.0 - RELOAD_S - PERIOD_LEAD_S)
        with caplog.at_level(logging.INFO, logger="proxy.engine"):
            await mgr.core.preloader.tick()
            await settle(mgr)
        return row["timer"], row["clock"]
    timer, clock = run({"job": (4, RELOAD_S), "other": (4, 3.0)}, 12, script, hold="off")
    assert timer["period_s"] == HOUR_S and clock is None
    assert "preloading job (due by its period)" in caplog.messages


def test_a_jobs_preload_is_logged_with_its_minute(caplog):
    async def script(mgr, loop):
        await teach_job(mgr, loop, minute=15)
        await asyncio.sleep(60.0 - RELOAD_S - PERIOD_LEAD_S)
        with caplog.at_level(logging.INFO, logger="proxy.engine"):
            await mgr.core.preloader.tick()
            await settle(mgr)
    run({"job": (4, RELOAD_S), "other": (4, 3.0)}, 12, script, hold="off")
    assert "preloading job (usually asked for at minute :15)" in caplog.messages


async def teach_job_until_due(mgr, loop) -> None:
    """Taught until 5 s before the job falls due (tick_in_full_memory's two loads take 6 s)."""
    await teach_job(mgr, loop)
    await asyncio.sleep(60.0 - RELOAD_S - PERIOD_LEAD_S - 5.0)


def test_a_job_is_preloaded_by_evicting_an_idle_model_never_one_serving_or_pinned():
    loaded, preloads = run({"job": (4, RELOAD_S), "serving": (4, 3.0), "pinned": (4, 3.0),
                            "idle": (4, 3.0)}, 12, tick_in_full_memory(teach_job_until_due),
                           hold="off", pinned=("pinned",))
    assert loaded == ["job", "pinned", "serving"] and preloads == 1


def test_between_its_runs_a_jobs_model_is_preloaded_by_its_gaps_as_any_model(caplog):
    """Each run asks for the job every 30 s for three minutes; at 04:20 an unscheduled run
    begins and the model is unloaded under it: its gaps make the next request likely within a
    minute, though its minute (:00) is 40 minutes away."""
    async def script(mgr, loop):
        for h in (0, 1, 3, 4):
            for i in range(6):
                await asyncio.sleep(h * HOUR_S + i * 30.0 - loop.time())
                await use(mgr, loop, "job", 0.0)
        for i in range(3):
            await asyncio.sleep(4 * HOUR_S + 20 * 60.0 + i * 30.0 - loop.time())
            await use(mgr, loop, "job", 0.0)
        await evict(mgr, "job")
        await asyncio.sleep(5.0)
        with caplog.at_level(logging.INFO, logger="proxy.engine"):
            await mgr.core.preloader.tick()
            await settle(mgr)
        return mgr.core.row("job")["clock"]["minute"]
    assert run({"job": (4, RELOAD_S), "other": (4, 3.0)}, 12, script, hold="off") == 0
    assert "preloading job (due by its gaps)" in caplog.messages


# -- eviction -----------------------------------------------------------------------------------
def test_a_due_chance_counts_a_clocks_next_run_within_the_horizon():
    learner = UsageLearner()
    for h in (0, 1, 3, 4):
        learner.observe("job", h * HOUR_S, h * HOUR_S)
    at = 5 * HOUR_S - 60.0                                  # :00 opens in a minute
    assert learner.due_chance("job", at, at, 60.0) == pytest.approx(4 / (4 + 59 / 60))
    assert learner.due_chance("job", at - 1.0, at - 1.0, 60.0) == 0.0     # 61 s away
    assert learner.due_chance("job", at + 90.0, at + 90.0, 60.0) > 0.0    # under way
    assert learner.due_chance("unknown", at, at, 60.0) == 0.0


def test_a_model_due_by_its_minute_is_kept_over_an_idle_one():
    """Memory for two: `job` (asked for at :00 of hours 0, 1, 3, 4, idle since 04:00) and
    `other` (asked for at 04:50). At 04:59:30 a request for `new` needs one of them gone: by
    idle time alone `job` would go; due in 30 s with a chance of 0.8, `other` goes."""
    async def script(mgr, loop):
        for h in (0, 1, 3, 4):
            await asyncio.sleep(h * HOUR_S - loop.time())
            await use(mgr, loop, "job", 0.0)
        await asyncio.sleep(4 * HOUR_S + 50 * 60.0 - loop.time())
        await use(mgr, loop, "other", 0.0)
        await asyncio.sleep(5 * HOUR_S - 30.0 - loop.time())
        await use(mgr, loop, "new", 0.0)
        return mgr.core.registry.loaded()
    assert run({"job": (4, RELOAD_S), "other": (4, 3.0), "new": (4, 3.0)}, 8, script,
               hold="off", prediction="off") == ["job", "new"]


def test_a_due_chance_is_the_likelier_of_a_pipelines_next_step_and_a_clocks_run():
    learner = UsageLearner()
    # `planner`, then `job` 10 s later, at :00 of hours 0, 1, 3, 4 and at :30 of 0-3
    runs = [h * HOUR_S for h in (0, 1, 3, 4)] + [h * HOUR_S + 1800.0 for h in range(4)]
    for at_s in sorted(runs):
        learner.observe("planner", at_s, at_s)
        learner.observe("job", at_s + 10.0, at_s + 10.0)
    learner.observe("planner", 5 * HOUR_S - 30.0, 5 * HOUR_S - 30.0)
    at = 5 * HOUR_S - 20.0
    assert learner.patterns["job"].clock(at).chance == pytest.approx(0.8, abs=0.01)
    assert learner.due_chance("job", at, at, 60.0) == pytest.approx(8 / 9)   # its follower's


def test_the_expected_hold_counts_a_clocks_next_run():
    """`hold: expected` spares a fresh model its reload seconds × its chance of reuse soon: a
    model whose minute opens in 30 s has a chance of 0.8, though its gaps (an hour or two) give
    far less."""
    async def script(mgr, loop):
        for h in (0, 1, 3, 4):
            await asyncio.sleep(h * HOUR_S - loop.time())
            await use(mgr, loop, "job", 0.0)
        await asyncio.sleep(5 * HOUR_S - 30.0 - loop.time())
        job = mgr.core.registry.entries["job"]
        return mgr.core.evictor.hold_for(job, loop.time())
    hold_s = run({"job": (4, RELOAD_S), "other": (4, 3.0)}, 8, script, hold="expected",
                 prediction="off")
    assert hold_s == pytest.approx(RELOAD_S * 4 / (4 + 59.5 / 60), rel=0.01)
