"""A timer's model preloaded, on the engine's virtual clock, its reload seconds before its
period's next window; the preload tick running at that due time."""
from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest

from proxy.engine.lifecycle import ModelStatus
from proxy.engine.preload import MIN_TICK_S, PERIOD_LEAD_S

from .test_periods import MONDAY, PERIOD_S, starts_every
from .test_waits import evict, run, settle, tick_in_full_memory, use


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
    await evict(mgr, "timer")
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


def test_a_models_row_shows_its_timer():
    async def script(mgr, loop):
        last = await teach_timer(mgr, loop)
        await asyncio.sleep(last + 100.0 - loop.time())
        return mgr.core.row("timer")["timer"], mgr.core.row("other")["timer"]
    timer, other = run({"timer": (4, RELOAD_S), "other": (4, 3.0)}, 12, script, hold="off")
    assert timer == {"period_s": PERIOD_S, "window_s": 0.0, "next_window_in_s": 200.0,
                     "confidence": 1.0}
    assert other is None


def test_a_timers_preload_is_logged_with_its_reason_at_the_default_level(caplog):
    """The log at INFO (the default) says why a model the proxy loaded unasked was loaded."""
    async def script(mgr, loop):
        last = await teach_timer(mgr, loop)
        await asyncio.sleep(last + DUE_S - loop.time())
        await mgr.core.preloader.tick()
        await settle(mgr)
    with caplog.at_level(logging.INFO, logger="proxy.engine"):
        run({"timer": (4, RELOAD_S), "other": (4, 3.0)}, 12, script, hold="off")
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO
            and "preload" in r.getMessage()] == ["preloading timer (due by its period)"]


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
    preloads nothing (a preload gives way to it); once they end, the timer's model is
    preloaded within seconds, not at the next monitoring interval (30 s on)."""
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
