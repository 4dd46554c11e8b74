"""Predictive preloading through the real engine on the emulator: what follows is loaded ahead,
counted useful or wasted, never at the expense of a model in use or pinned, and off is off."""
from __future__ import annotations

import pytest

from proxy.emulator import CatalogModel
from proxy.engine.clock import ManualClock

from .fakes import GB
from .test_engine import footprints, manager_for

PLANNER, CODER, OTHER, HOT = "lab/planner", "lab/coder", "lab/other", "lab/hot"
SIZES = {PLANNER: 4, CODER: 6, OTHER: 8, HOT: 3}
CATALOG = [CatalogModel(key=k, size_bytes=int(g * GB), memory_bytes=int(g * GB),
                        load_time_s=1.0) for k, g in SIZES.items()]


@pytest.fixture
async def lab(make_emulator):
    return await make_emulator(catalog=CATALOG, capacity_bytes=64 * GB)


@pytest.fixture
async def engine(lab):
    made = []

    async def make(budget_gb=16, **kw):
        kw.setdefault("models", footprints(SIZES))
        made.append(await manager_for(lab.url, memory={"budget_gb": budget_gb},
                                      clock=ManualClock(), **kw))
        return made[-1]
    yield make
    for mgr in made:
        await mgr.cleanup()


async def teach(mgr, rounds=5):
    """Planner, then coder four seconds later, a few times; everything unloaded after."""
    for _ in range(rounds):
        (await mgr.acquire(PLANNER)).release()
        mgr.clock.advance(4)
        (await mgr.acquire(CODER)).release()
        mgr.clock.advance(600)
    await mgr.clear_all_models()


async def settle(mgr):
    await mgr.core.scheduler.settled()
    for e in mgr.core.registry:
        if e.load_task is not None:
            await e.load_task


async def test_what_follows_is_preloaded_and_counted_useful(engine, lab):
    mgr = await engine()
    await teach(mgr)
    loads_before = lab.state.load_calls[CODER]
    (await mgr.acquire(PLANNER)).release()
    await settle(mgr)
    assert lab.state.load_calls[CODER] == loads_before + 1 and mgr.entry(CODER).preloaded
    (await mgr.acquire(CODER)).release()                      # no wait: already there
    assert lab.state.load_calls[CODER] == loads_before + 1
    summary = mgr.get_memory_stats()["preload"]
    assert (summary["preloads"], summary["useful"], summary["wasted"]) == (1, 1, 0)


async def test_a_preload_unloaded_unused_is_counted_wasted_with_its_gb(engine):
    mgr = await engine()
    await teach(mgr)
    (await mgr.acquire(PLANNER)).release()
    await settle(mgr)
    await mgr.clear_all_models()
    summary = mgr.get_memory_stats()["preload"]
    assert summary["wasted"] == 1 and summary["wasted_gb"] == pytest.approx(6.0)


async def test_a_preload_never_evicts_a_busy_or_pinned_model(engine, lab):
    mgr = await engine(budget_gb=15, models={**footprints(SIZES), HOT: {"footprint_gb": 3,
                                                                        "pinned": True}})
    await teach(mgr)
    (await mgr.acquire(HOT)).release()                        # 3 GB pinned
    serving = await mgr.acquire(OTHER)                        # 6 GB serving
    (await mgr.acquire(PLANNER)).release()                    # 4 GB: 13 of 13 in use
    await settle(mgr)
    assert mgr.entry(CODER).status.value == "unloaded"        # no room worth making
    assert {HOT, OTHER, PLANNER} <= set(mgr.get_loaded_models())
    serving.release()


class Preloads:
    def __init__(self):
        self.seen = []

    def on_preload(self, model, why):
        self.seen.append((model, why))


@pytest.mark.parametrize("budget_gb,started", [(18, True), (13, False)])
async def test_a_preload_is_told_when_it_starts_and_one_without_room_only_counted(
        engine, caplog, budget_gb, started):
    """With room, the coder's preload is logged at INFO and sent as an event once, with its
    reason; without (everything else serving), it is queued and dropped: DEBUG lines only."""
    import logging
    mgr = await engine(budget_gb=budget_gb)
    await teach(mgr)
    events = Preloads()
    mgr.add_listener(events)
    serving = [await mgr.acquire(OTHER)]                      # 8 GB serving
    with caplog.at_level(logging.DEBUG, logger="proxy.engine"):
        serving.append(await mgr.acquire(PLANNER))           # 4 GB serving: 12 of 13 or 18
        await settle(mgr)
    told = [(r.levelno, r.getMessage()) for r in caplog.records if "preload" in r.getMessage()]
    queued = (logging.DEBUG, f"preload of {CODER} queued (follows {PLANNER})")
    if started:
        assert events.seen == [(CODER, f"follows {PLANNER}")]
        assert told == [queued, (logging.INFO, f"preloading {CODER} (follows {PLANNER})")]
    else:
        assert events.seen == []
        assert told == [queued, (logging.DEBUG, f"preload of {CODER} dropped: no room worth "
                                                "making")]
    summary = mgr.get_memory_stats()["preload"]
    assert (summary["queued"], summary["preloads"]) == (1, int(started))
    for lease in serving:
        lease.release()


async def test_a_preload_gives_way_to_a_load_a_request_waits_for(engine):
    mgr = await engine()
    await teach(mgr)
    assert mgr.core.scheduler.preload(mgr.entry(CODER), 5.0)
    assert mgr.core.scheduler.pending[CODER].speculative
    (await mgr.acquire(OTHER)).release()                      # requested: goes first
    await settle(mgr)
    assert OTHER in mgr.get_loaded_models()


async def test_a_preload_waits_while_a_requested_load_waits_for_memory(engine):
    import asyncio
    mgr = await engine(budget_gb=13, preload={"enabled": False})   # only the one queued here
    serving = [await mgr.acquire(HOT), await mgr.acquire(PLANNER)]   # 7 of 13 GB serving
    waiting = asyncio.create_task(mgr.acquire(OTHER))         # 8 GB: waits for them
    while OTHER not in mgr.core.scheduler.pending:
        await asyncio.sleep(0)
    assert mgr.core.scheduler.preload(mgr.entry(CODER), 5.0)       # 6 GB would fit now...
    await mgr.core.scheduler.settled()
    assert mgr.entry(CODER).status.value == "unloaded"        # ...but it does not take them
    for lease in serving:
        lease.release()
    (await waiting).release()
    assert OTHER in mgr.get_loaded_models()


@pytest.mark.parametrize("other_is_hot,evicted", [(False, True), (True, False)])
async def test_a_preload_evicts_only_what_is_expected_to_cost_far_less(engine, lab,
                                                                       other_is_hot, evicted):
    mgr = await engine(budget_gb=14)
    await teach(mgr)
    (await mgr.acquire(OTHER)).release()                      # 8 GB, idle
    for key in (OTHER, CODER):
        mgr.entry(key).load_time_s = 10.0                     # as slow to reload as each other
    if other_is_hot:                                          # asked for every few seconds
        for _ in range(20):
            mgr.clock.advance(3)
            (await mgr.acquire(OTHER)).release()
    else:
        mgr.clock.advance(6 * 3600)                           # idle for hours
    (await mgr.acquire(PLANNER)).release()                    # 12 of 14 GB: the coder needs 6
    await settle(mgr)
    assert (OTHER not in mgr.get_loaded_models()) is evicted
    assert (mgr.entry(CODER).status.value == "loaded") is evicted


async def test_a_preload_evicts_only_when_its_victims_cost_under_a_quarter_of_its_worth(
        engine):
    """A victim costing exactly a quarter of the preload's worth (docs/engine.md) is kept;
    one just under it goes."""
    from proxy.engine.policy import expected_cost_s
    mgr = await engine(budget_gb=14, preload={"enabled": False})
    for _ in range(5):                                        # asked for now and then
        (await mgr.acquire(OTHER)).release()
        mgr.clock.advance(60)
    ev = mgr.core.evictor
    cost_s = expected_cost_s(ev.candidate(mgr.entry(OTHER), mgr.clock.now(), predicted=True))
    assert cost_s > 0
    worth_s = cost_s * 4
    assert not await ev.evict_for_guess(CODER, 1 * GB, worth_s)
    assert OTHER in mgr.get_loaded_models()
    assert await ev.evict_for_guess(CODER, 1 * GB, worth_s * 1.01)
    assert OTHER not in mgr.get_loaded_models()


async def test_the_off_switch_is_honoured(engine, lab):
    mgr = await engine(preload={"enabled": False})
    await teach(mgr)
    loads_before = lab.state.load_calls[CODER]
    (await mgr.acquire(PLANNER)).release()
    await settle(mgr)
    assert lab.state.load_calls[CODER] == loads_before
    assert mgr.get_memory_stats()["preload"]["preloads"] == 0


async def test_a_preload_is_counted_useful_once_and_then_never_wasted(engine):
    mgr = await engine()
    await teach(mgr)
    (await mgr.acquire(PLANNER)).release()
    await settle(mgr)
    for _ in range(3):                                        # used three times, then unloaded
        (await mgr.acquire(CODER)).release()
        mgr.clock.advance(5)
    await mgr.clear_all_models()
    summary = mgr.get_memory_stats()["preload"]
    assert (summary["preloads"], summary["useful"], summary["wasted"]) == (1, 1, 0)
    assert summary["wasted_gb"] == 0


@pytest.mark.parametrize("after_s,preloaded", [(0.2, False), (5.0, True)])
async def test_a_burst_preloads_nothing_new(engine, after_s, preloaded):
    """The planner's first request preloads the coder, which is then unloaded: a second
    planner request within a burst does not load it again; one five seconds later does."""
    mgr = await engine()
    await teach(mgr)
    (await mgr.acquire(PLANNER)).release()
    await settle(mgr)
    await mgr.unload_model(CODER)
    mgr.clock.advance(after_s)
    (await mgr.acquire(PLANNER)).release()
    await settle(mgr)
    assert (mgr.entry(CODER).status.value == "loaded") is preloaded


async def test_nothing_follows_while_a_request_waits_for_memory(engine):
    """A planner request while another request waits for memory preloads no coder, then or
    after the wait is over."""
    import asyncio
    mgr = await engine(budget_gb=13)
    await teach(mgr)
    serving = [await mgr.acquire(PLANNER)]
    await settle(mgr)                                         # the coder, preloaded...
    await mgr.unload_model(CODER)                             # ...and unloaded
    serving.append(await mgr.acquire(HOT))                    # 7 of 13 GB serving
    waiting = asyncio.create_task(mgr.acquire(OTHER))         # 8 GB: waits for them
    while OTHER not in mgr.core.scheduler.pending:
        await asyncio.sleep(0)
    mgr.clock.advance(5)
    (await mgr.acquire(PLANNER)).release()                    # loaded: no wait of its own
    for lease in serving:
        lease.release()
    (await waiting).release()
    await settle(mgr)
    assert mgr.entry(CODER).status.value == "unloaded"
    assert mgr.get_memory_stats()["preload"]["queued"] == 1   # the first one only


WEEK_S = 7 * 86400.0


@pytest.mark.parametrize("weeks,preloaded", [((0, 1, 2), True), ((0,), False)])
async def test_a_model_asked_for_in_this_hour_every_week_is_preloaded_in_that_hour(
        engine, weeks, preloaded):
    """Two requests a minute apart at the same hour of the week: in each of the last three
    weeks, a weekly rhythm; once three weeks ago, none."""
    mgr = await engine()
    start = mgr.clock.now()
    for week in weeks:
        mgr.clock.advance(start + week * WEEK_S - mgr.clock.now())
        for _ in range(2):
            (await mgr.acquire(OTHER)).release()
            mgr.clock.advance(60)
    await mgr.clear_all_models()
    mgr.clock.advance(start + 3 * WEEK_S - 30 - mgr.clock.now())   # the hour, once more
    await mgr.core.preloader.tick()
    await settle(mgr)
    assert (mgr.entry(OTHER).status.value == "loaded") is preloaded
    assert mgr.entry(OTHER).preloaded is preloaded


async def test_a_request_preloads_its_two_likeliest_followers(engine):
    """After the planner: the coder every time, the other model four times in five, the hot
    one three in five (all at least min_probability): the first two are preloaded."""
    mgr = await engine(budget_gb=24, preload={"min_probability": 0.3})
    for round_ in range(5):
        (await mgr.acquire(PLANNER)).release()
        for key, rounds in ((HOT, 3), (OTHER, 4), (CODER, 5)):   # first seen: not likeliest
            if round_ < rounds:
                mgr.clock.advance(4)
                (await mgr.acquire(key)).release()
        mgr.clock.advance(600)
    await mgr.clear_all_models()
    (await mgr.acquire(PLANNER)).release()
    await settle(mgr)
    assert sorted(mgr.get_loaded_models()) == sorted([PLANNER, CODER, OTHER])


async def test_a_follower_no_longer_listed_is_passed_over(engine):
    """Usage restored from the store says `gone` follows the planner, but the upstream no
    longer lists it: the planner's request is served and the coder still preloaded."""
    mgr = await engine()
    learner = mgr.core.learner
    for _ in range(5):
        (await mgr.acquire(PLANNER)).release()
        learner.observe("lab/gone", mgr.clock.now() + 1, mgr.clock.wall() + 1)
        mgr.clock.advance(4)
        (await mgr.acquire(CODER)).release()
        mgr.clock.advance(600)
    await mgr.clear_all_models()
    assert [k for k, _ in learner.likely_next(PLANNER, 0.6)] == ["lab/coder", "lab/gone"]
    (await mgr.acquire(PLANNER)).release()
    await settle(mgr)
    assert mgr.entry(CODER).preloaded


async def test_a_preload_that_waited_past_its_moment_is_dropped_not_started(engine, caplog):
    """Queued behind a requested load for over a minute, the coder's preload is dropped when
    that load goes away, though it would fit then: what it followed is long past."""
    import asyncio
    import logging
    from proxy.engine.scheduler import PRELOAD_STALE_S
    mgr = await engine(budget_gb=13, preload={"enabled": False})   # only the one queued here
    serving = [await mgr.acquire(HOT), await mgr.acquire(PLANNER)]   # 7 of 13 GB serving
    waiting = asyncio.create_task(mgr.acquire(OTHER))         # 8 GB: waits for them
    while OTHER not in mgr.core.scheduler.pending:
        await asyncio.sleep(0)
    assert mgr.core.scheduler.preload(mgr.entry(CODER), 5.0)       # 6 GB: fits, but waits
    await mgr.core.scheduler.settled()
    mgr.clock.advance(PRELOAD_STALE_S + 1)
    with caplog.at_level(logging.DEBUG, logger="proxy.engine"):
        waiting.cancel()                                      # the requester goes away
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await settle(mgr)
    assert CODER not in mgr.core.scheduler.pending
    assert mgr.entry(CODER).status.value == "unloaded"
    assert f"preload of {CODER} dropped: its moment has passed" in caplog.text
    for lease in serving:
        lease.release()


async def steady_then_unloaded_by_hand(mgr):
    """HOT asked for every 20 s (a model its own gaps say is due within a minute), then
    unloaded by hand 5 s after its last request."""
    for i in range(12):
        if i:
            mgr.clock.advance(20)
        (await mgr.acquire(HOT)).release()
    mgr.clock.advance(5)
    assert await mgr.unload_model(HOT)


async def test_a_model_unloaded_by_hand_is_not_preloaded_back_by_its_own_history(engine, lab):
    """Otherwise the next tick undoes the operator's unload ("due by its gaps"). (Weeks later
    its history counts again: the weekly-rhythm test above clears by hand.)"""
    mgr = await engine()
    await steady_then_unloaded_by_hand(mgr)
    loads = lab.state.load_calls[HOT]
    for _ in range(3):
        await mgr.core.preloader.tick()
        await settle(mgr)
        mgr.clock.advance(10)
    assert lab.state.load_calls[HOT] == loads and HOT not in mgr.get_loaded_models()


async def test_a_request_for_it_lets_its_history_preload_it_again(engine, lab):
    mgr = await engine()
    await steady_then_unloaded_by_hand(mgr)
    (await mgr.acquire(HOT)).release()                        # asked for: loaded on demand
    mgr.clock.advance(5)
    await mgr.core.evictor.unload(mgr.entry(HOT), "idle")    # gone, not by hand
    loads = lab.state.load_calls[HOT]
    await mgr.core.preloader.tick()
    await settle(mgr)
    assert lab.state.load_calls[HOT] == loads + 1 and mgr.entry(HOT).preloaded


async def test_an_unload_by_hand_leaves_a_followers_preload_alone(engine, lab):
    """A request for the planner after the coder's unload is news the unload did not know."""
    mgr = await engine()
    await teach(mgr)                                          # ends with an unload by hand
    assert mgr.entry(CODER).unloaded_by_hand_s is not None
    (await mgr.acquire(PLANNER)).release()
    await settle(mgr)
    assert mgr.entry(CODER).preloaded
