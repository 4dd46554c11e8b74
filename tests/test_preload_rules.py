"""The preloader's rules at their edges, through the real engine on the emulator and a manual
clock: each threshold met exactly still preloads, the quiet after an unload by hand lasts an
hour, a follower's worth is its probability times its reload, and a preload counts wasted
however it is unloaded unused."""
from __future__ import annotations

import pytest

from proxy.engine.policy import PREDICTION_HORIZON_S, expected_cost_s
from proxy.engine.preload import BURST_GAP_S, HAND_UNLOAD_QUIET_S

from .test_engine import engine_config, footprints
from .test_preload import CODER, OTHER, PLANNER, SIZES, engine, lab, settle, teach  # noqa: F401

DAY_S, WEEK_S = 86400.0, 7 * 86400.0


class Preloads:
    def __init__(self):
        self.seen = []

    def on_preload(self, model, why):
        self.seen.append((model, why))


async def watched(mgr):
    events = Preloads()
    mgr.add_listener(events)
    return events


async def test_a_request_a_burst_gap_after_the_last_preloads_again(engine):
    """A burst is requests closer than BURST_GAP_S: one exactly that far apart is not one."""
    mgr = await engine()
    await teach(mgr)
    (await mgr.acquire(PLANNER)).release()
    await settle(mgr)
    await mgr.unload_model(CODER)
    mgr.clock.advance(BURST_GAP_S)
    (await mgr.acquire(PLANNER)).release()
    await settle(mgr)
    assert mgr.entry(CODER).status.value == "loaded"


async def test_a_follower_at_exactly_min_probability_is_preloaded(engine):
    """The coder followed the planner in three of its six requests (the sixth being this
    one): exactly min_probability 0.5, which is enough."""
    mgr = await engine(preload={"min_probability": 0.5})
    for round_ in range(5):
        (await mgr.acquire(PLANNER)).release()
        if round_ < 3:
            mgr.clock.advance(4)
            (await mgr.acquire(CODER)).release()
        mgr.clock.advance(600)
    await mgr.clear_all_models()
    events = await watched(mgr)
    (await mgr.acquire(PLANNER)).release()
    await settle(mgr)
    assert events.seen == [(CODER, f"follows {PLANNER}")]


async def at(mgr, start, offset_s):
    mgr.clock.advance(start + offset_s - mgr.clock.now())


async def test_a_rhythm_of_exactly_rhythm_min_rate_is_preloaded(engine):
    """Asked for once in this hour of the week in each of the two weeks observed: a rate of
    1.0 a week, exactly preload.rhythm_min_rate."""
    mgr = await engine()
    start = mgr.clock.now()
    for week in (0, 1):
        await at(mgr, start, week * WEEK_S)
        (await mgr.acquire(OTHER)).release()
    await mgr.clear_all_models()
    await at(mgr, start, 2 * WEEK_S)
    events = await watched(mgr)
    await mgr.core.preloader.tick()
    await settle(mgr)
    assert events.seen == [(OTHER, "due by its rhythm")]


async def test_an_hour_of_the_day_at_exactly_rhythm_min_rate_is_preloaded(engine):
    """Asked for once in this hour on each of the two days observed: 1.0 a day."""
    mgr = await engine()
    start = mgr.clock.now()
    for day in (0, 1):
        await at(mgr, start, day * DAY_S)
        (await mgr.acquire(OTHER)).release()
    await mgr.clear_all_models()
    await at(mgr, start, 2 * DAY_S)
    events = await watched(mgr)
    await mgr.core.preloader.tick()
    await settle(mgr)
    assert events.seen == [(OTHER, "usually asked for at this hour")]


async def test_a_chance_by_its_gaps_of_exactly_min_probability_is_preloaded(engine, lab):
    """Asked for every 20 s, then unloaded (not by hand): min_probability set to exactly the
    chance its gaps give of a request within a minute preloads it."""
    mgr = await engine()
    for i in range(12):
        if i:
            mgr.clock.advance(20)
        (await mgr.acquire(OTHER)).release()
    mgr.clock.advance(5)
    await mgr.core.evictor.unload(mgr.entry(OTHER), "idle")
    p = mgr.core.learner.predict(OTHER, mgr.clock.now(), PREDICTION_HORIZON_S).p_within
    assert 0 < p < 1
    mgr.core.apply_config(engine_config(lab.url, memory={"budget_gb": 16},
                                        models=footprints(SIZES),
                                        preload={"min_probability": p}))
    events = await watched(mgr)
    await mgr.core.preloader.tick()
    await settle(mgr)
    assert events.seen == [(OTHER, "due by its gaps")]


async def test_an_unload_by_hand_keeps_a_rhythm_quiet_for_an_hour_and_no_longer(engine):
    """A weekly rhythm (two requests a minute apart in one hour of each of three weeks) whose
    hour comes 100 s after its model is unloaded by hand: half an hour later (inside the
    rhythm's hour) it is still not preloaded; an hour later it is."""
    mgr = await engine()
    start = mgr.clock.now()                   # half an hour into its hour of the week
    for week in (0, 1, 2):
        for minute in (0, 1):
            await at(mgr, start, week * WEEK_S + minute * 60)
            (await mgr.acquire(OTHER)).release()
    await mgr.clear_all_models()
    unloaded_s = 3 * WEEK_S - 1800 - 100      # just before that hour, in the fourth week
    await at(mgr, start, unloaded_s)
    assert await mgr.load_model(OTHER) and await mgr.unload_model(OTHER)
    events = await watched(mgr)
    await at(mgr, start, unloaded_s + HAND_UNLOAD_QUIET_S / 2)
    await mgr.core.preloader.tick()
    await settle(mgr)
    assert events.seen == []
    await at(mgr, start, unloaded_s + HAND_UNLOAD_QUIET_S)
    await mgr.core.preloader.tick()
    await settle(mgr)
    assert events.seen == [(OTHER, "due by its rhythm")]


async def test_a_followers_worth_is_its_probability_times_its_reload(engine):
    """The coder follows the planner five times in six (the sixth request being the one
    that preloads it): its preload is worth 5/6 of its reload seconds. An idle victim
    costing between a quarter of that and a quarter of the whole reload is kept."""
    mgr = await engine(budget_gb=14)
    await teach(mgr)
    (await mgr.acquire(OTHER)).release()                      # 8 GB, idle
    mgr.clock.advance(6 * 3600)
    ev = mgr.core.evictor
    cost_s = expected_cost_s(ev.candidate(mgr.entry(OTHER), mgr.clock.now(), predicted=True))
    assert cost_s > 0
    p = 5 / 6
    mgr.entry(CODER).load_time_s = 4 * cost_s * (1 + 1 / p) / 2   # p × it / 4 < cost < it / 4
    (await mgr.acquire(PLANNER)).release()                    # 12 of 14 GB: the coder needs 6
    await settle(mgr)
    assert OTHER in mgr.get_loaded_models()
    assert mgr.entry(CODER).status.value == "unloaded"


async def test_preloading_turned_off_says_so_in_the_stats(engine):
    mgr = await engine(preload={"enabled": False})
    assert mgr.get_memory_stats()["preload"]["enabled"] is False
    mgr = await engine()
    assert mgr.get_memory_stats()["preload"]["enabled"] is True


@pytest.mark.parametrize("then_loaded_outside", [False, True])
async def test_a_preload_unloaded_outside_the_proxy_unused_is_wasted(engine, lab,
                                                                     then_loaded_outside):
    """The preloaded coder is unloaded by someone else (the GUI, `lms`) before any request
    used it: wasted, with its GB. Loaded again outside the proxy and then used, it is not
    counted useful: that load was not a preload."""
    mgr = await engine()
    await teach(mgr)
    (await mgr.acquire(PLANNER)).release()
    await settle(mgr)
    assert mgr.entry(CODER).preloaded
    for instance_id in mgr.entry(CODER).instance_ids:
        await lab.state.unload(instance_id)
    await mgr.reconcile()
    assert mgr.entry(CODER).status.value == "unloaded" and not mgr.entry(CODER).preloaded
    if then_loaded_outside:
        await lab.state.load(CODER)
        await mgr.reconcile()
        (await mgr.acquire(CODER)).release()
    summary = mgr.get_memory_stats()["preload"]
    assert (summary["preloads"], summary["useful"], summary["wasted"]) == (1, 0, 1)
    assert summary["wasted_gb"] == pytest.approx(6.0)
