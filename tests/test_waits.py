"""Decisions that weigh the wait requests feel, on the engine's virtual clock: the expected-cost
hold, pipeline followers in victim choice, and time-of-day preloads into free memory."""
from __future__ import annotations

import asyncio
import dataclasses

from bench.simulate import SimBackend, Variant, engine_config
from bench.vtime import LoopClock, VirtualTimeLoop
from bench.workload import Model, Workload
from proxy.engine.lifecycle import ModelStatus
from proxy.library import ModelMemoryManager
from proxy.engine.policy import PREDICTION_HORIZON_S, Candidate, cost_aware_value, \
    expected_hold_s, select_victims

GB = 1_000_000_000
DAY_S = 86400.0


def run(models: dict[str, tuple[float, float]], budget_gb: float, script, *, hold="expected",
        pinned=(), start_s: float = 0.0, prediction: str = "on", groups=()):
    """Run script(mgr, loop) on the real engine over a simulated LM Studio whose loads take
    their load seconds of virtual time (groups: GroupConfigs)."""
    loop = VirtualTimeLoop(start_s)
    w = Workload("scripted", {k: Model(k, gb, load_s) for k, (gb, load_s) in models.items()},
                 [])

    async def main():
        raw = engine_config(w, budget_gb, Variant("t", "cost-aware", hold=hold, prediction=prediction))
        raw = dataclasses.replace(raw, groups=tuple(groups))
        mgr = ModelMemoryManager(config=raw, upstream=SimBackend(w), clock=LoopClock(loop))
        await mgr.start()
        for key in pinned:
            mgr.set_pinned(key, True)
        try:
            return await script(mgr, loop)
        finally:
            await mgr.core.scheduler.stop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


async def evict(mgr, key) -> None:
    """key unloaded as the engine's own eviction would (an unload by hand would hold back
    its preloads for an hour)."""
    assert await mgr.core.evictor.unload(mgr.core.registry.entries[key], "idle")


async def use(mgr, loop, key, service_s=1.0) -> float:
    """A request for key served for service_s; returns how long it waited for its model."""
    arrived = loop.time()
    lease = await mgr.acquire(key)
    waited = loop.time() - arrived
    await asyncio.sleep(service_s)
    lease.release()
    return waited


# -- the hold ----------------------------------------------------------------------------------
def test_the_hold_is_the_reload_cost_times_the_chance_of_reuse():
    assert expected_hold_s(10.0, 0.5) == 5.0
    assert expected_hold_s(10.0, 0.0) == 0.0 and expected_hold_s(10.0, 3.0) == 10.0


def hold_scenario(waiters: int):
    """X (10 s to load) is loaded at t=10 and serves until 11; at t=12, `waiters` requests
    arrive for Y, which needs X's memory. Returns (each Y wait, X's expected reload cost when
    Y arrived, X's hold then)."""
    async def script(mgr, loop):
        await use(mgr, loop, "x")
        await asyncio.sleep(12.0 - loop.time())
        x = mgr.core.registry.entries["x"]
        p = mgr.core.learner.predict("x", loop.time(), PREDICTION_HORIZON_S).p_within
        cost_s = mgr.core.registry.reload_s(x) * p
        hold = mgr.core.evictor.hold_for(x, loop.time())
        waits = await asyncio.gather(*(use(mgr, loop, "y") for _ in range(waiters)))
        return waits, cost_s, hold
    return run({"x": (8, 10.0), "y": (8, 2.0)}, 10, script)   # 80 %: not critical


def test_the_hold_never_makes_a_request_wait_longer_than_the_reload_it_avoids_costs():
    waits, cost_s, hold_s = hold_scenario(1)
    assert 0 < hold_s == cost_s < 10.0                 # a chance of reuse below certainty
    load_y_s = 2.0
    assert waits[0] > load_y_s + 1.0                   # the hold did spare X a while...
    assert waits[0] <= cost_s + load_y_s + 0.01        # ...never longer than it is worth


def test_the_hold_weighs_every_waiters_wait():
    (one,), cost_s, _ = hold_scenario(1)
    three, _, _ = hold_scenario(3)
    load_y_s = 2.0
    # Three waiters wait a third as long for X's memory: their waits together stay within
    # the reload the hold avoids.
    assert all(w - load_y_s <= cost_s / 3 + 0.01 for w in three)
    assert sum(w - load_y_s for w in three) <= cost_s + 0.03 < 3 * (one - load_y_s)


def test_hold_off_makes_no_request_wait_for_memory():
    async def script(mgr, loop):
        await use(mgr, loop, "x")
        await asyncio.sleep(12.0 - loop.time())
        return await use(mgr, loop, "y")
    assert run({"x": (8, 10.0), "y": (8, 2.0)}, 10, script, hold="off") == 2.0


# -- victims: the pipeline's next step is kept ---------------------------------------------------
def test_a_likely_next_step_outranks_an_equally_idle_model():
    now = 1000.0
    coder = Candidate("coder", 8 * GB, last_used_s=400.0, reload_s=6.0, p_due=0.9)
    other = Candidate("other", 8 * GB, last_used_s=400.0, reload_s=6.0)
    assert cost_aware_value(coder, now) > cost_aware_value(other, now)
    assert select_victims("cost-aware", [coder, other], 8 * GB, now) == ("other",)
    assert select_victims("predictive", [coder, other], 8 * GB, now) == ("other",)


def test_the_evictor_keeps_the_coder_a_planner_request_is_followed_by():
    """Planner then coder, five sessions; then the coder and another model fill memory, the
    coder idle longer; a planner request needs the memory of one of them: the other goes."""
    async def script(mgr, loop):
        for _ in range(5):
            await use(mgr, loop, "planner", 2.0)
            await asyncio.sleep(3.0)
            await use(mgr, loop, "coder", 5.0)
            await asyncio.sleep(300.0)
            await use(mgr, loop, "other", 5.0)
            await asyncio.sleep(300.0)
        await evict(mgr, "planner")
        await use(mgr, loop, "coder", 5.0)
        await asyncio.sleep(300.0)
        await use(mgr, loop, "other", 5.0)      # the coder has idled 300 s longer
        await asyncio.sleep(200.0)
        assert mgr.core.registry.loaded() == ["coder", "other"]
        await use(mgr, loop, "planner")
        return mgr.core.registry.loaded()
    loaded = run({"planner": (4, 3.0), "coder": (8, 6.0), "other": (8, 6.0)}, 16, script,
                 hold="off")
    assert loaded == ["coder", "planner"]


# -- preloading session starters by time of day -----------------------------------------------
STARTER_HOUR_S = 9 * 3600.0


async def teach_daily(mgr, loop, days=2):
    """The starter is asked for at 09:01 each day (wall time 0 is midnight UTC)."""
    for day in range(days):
        await asyncio.sleep(day * DAY_S + STARTER_HOUR_S + 60 - loop.time())
        await use(mgr, loop, "starter")
    await evict(mgr, "starter")
    await asyncio.sleep(days * DAY_S + STARTER_HOUR_S - 240 - loop.time())   # 08:56


async def settle(mgr):
    await mgr.core.scheduler.settled()
    for e in mgr.core.registry:
        if e.load_task is not None:
            await e.load_task


def test_a_session_starter_is_preloaded_into_free_memory_before_its_hour():
    async def script(mgr, loop):
        await teach_daily(mgr, loop)
        await mgr.core.preloader.tick()
        await settle(mgr)
        return mgr.core.registry.entries["starter"].status, loop.time(), mgr.core.preloads.preloads
    status, at_s, preloads = run({"starter": (4, 3.0), "other": (8, 6.0)}, 16, script,
                                 hold="off")
    assert status is ModelStatus.LOADED and preloads == 1
    assert at_s % DAY_S < STARTER_HOUR_S                # ready before 09:00


def tick_in_full_memory(teach):
    """A script: `idle` used first (then idle through the teaching), `pinned` used, `serving`
    serving, then one preload tick: what is loaded after it, and how many preloads ran."""
    async def script(mgr, loop):
        await use(mgr, loop, "idle", 0.0)
        await teach(mgr, loop)
        await use(mgr, loop, "pinned", 0.0)
        lease = await mgr.acquire("serving")
        await mgr.core.preloader.tick()
        await settle(mgr)
        lease.release()
        return mgr.core.registry.loaded(), mgr.core.preloads.preloads
    return script


def test_a_session_starter_is_never_preloaded_by_evicting():
    """Memory full of a model serving, a pinned one and an idle one: the starter's preload
    takes free memory or nothing."""
    loaded, preloads = run({"starter": (4, 3.0), "serving": (4, 3.0), "pinned": (4, 3.0),
                            "idle": (4, 3.0)}, 12, tick_in_full_memory(teach_daily),
                           hold="off", pinned=("pinned",))
    assert loaded == ["idle", "pinned", "serving"] and preloads == 0


# -- preloading what its own gaps say is due ---------------------------------------------------
PERIOD_S = 300.0


# Mostly five minutes apart, twice 100 s: no grid of one period (engine.learning.detect_period),
# but past 260 s of idleness its gaps say a request is due within the minute.
GAPS_S = [PERIOD_S] * 5 + [100.0] + [PERIOD_S] * 5 + [100.0] + [PERIOD_S] * 2


async def teach_period(mgr, loop):
    """`timer` is asked for at GAPS_S, then unloaded; 260 s later it is due again."""
    for gap_s in GAPS_S:
        await use(mgr, loop, "timer", 0.0)
        await asyncio.sleep(gap_s)
    await use(mgr, loop, "timer", 0.0)
    assert mgr.core.learner.patterns["timer"].period(loop.time()) is None
    await evict(mgr, "timer")
    await asyncio.sleep(260.0)


def test_a_model_due_by_its_gaps_is_preloaded_by_evicting_an_idle_one_never_a_busy_one():
    """Memory full of a model serving, a pinned one and one idle for an hour: the timer's
    preload evicts the idle one, whose expected loss is far under the timer's saving."""
    loaded, preloads = run({"timer": (4, 3.0), "serving": (4, 3.0), "pinned": (4, 3.0),
                            "idle": (4, 3.0)}, 12, tick_in_full_memory(teach_period),
                           hold="off", pinned=("pinned",))
    assert loaded == ["pinned", "serving", "timer"] and preloads == 1


def test_a_model_due_by_its_gaps_evicts_nothing_that_serves_or_is_pinned():
    async def script(mgr, loop):
        await teach_period(mgr, loop)
        await use(mgr, loop, "pinned", 0.0)
        leases = [await mgr.acquire("serving"), await mgr.acquire("busy")]
        await mgr.core.preloader.tick()
        await settle(mgr)
        for lease in leases:
            lease.release()
        return mgr.core.registry.loaded(), mgr.core.preloads.preloads
    loaded, preloads = run({"timer": (4, 3.0), "serving": (4, 3.0), "pinned": (4, 3.0),
                            "busy": (4, 3.0)}, 12, script, hold="off", pinned=("pinned",))
    assert loaded == ["busy", "pinned", "serving"] and preloads == 0
