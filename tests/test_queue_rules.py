"""The admission queue's membership rules a one-line change would break unseen (engine/queue.py):
a load under way keeps its place when all its waiters time out; one pending load per model even
when a requester's load is abandoned; an SDK client's load times out, leaves, or finds the
model loaded like a request; requests that joined it keep the model until leased; the hang alert
counts from the current wait (a request joining a queued preload too); a load leaving the
queue wakes the one behind it, and one queued while admission runs is looked at at once; a
load failing with nobody waiting logs no stray error."""
from __future__ import annotations

import asyncio
import gc

import pytest

from proxy.engine.clock import ManualClock
from proxy.errors import InsufficientMemory, UpstreamTimeout
from proxy.observe.health import ModelHealthMonitor

from .test_engine import footprints
from .test_observability import ids
from .test_scheduler import W, X, Y, Z, lab, lab_manager, waiting_for  # noqa: F401

pytestmark = pytest.mark.timeout(30)


async def until(predicate) -> None:
    """Yield to the engine until predicate() holds (the proxy's own state: nothing to await)."""
    while not predicate():
        await asyncio.sleep(0)


async def test_a_load_whose_waiters_all_timed_out_is_still_the_one_a_later_request_joins(
        lab, lab_manager):
    mgr = await lab_manager(lab.url, eviction={"queue_timeout_s": 0.3})
    gate = lab.state.faults.load_gate[Z] = asyncio.Event()   # LM Studio takes its time
    with pytest.raises(UpstreamTimeout):
        await mgr.acquire(Z)                     # its only waiter gives up; the load goes on
    with pytest.raises(UpstreamTimeout) as later:
        await mgr.acquire(Z)                     # joins that load, not a queue of its own
    assert "still loading after 0.3s" in later.value.message
    assert later.value.retry_after_s == 1.0      # at least a second, however short the wait
    gate.set()
    (await asyncio.wait_for(mgr.acquire(Z), 5)).release()
    assert lab.state.load_calls[Z] == 1


async def test_a_requester_joining_a_load_abandoned_at_admission_joins_the_next_one(
        lab, lab_manager):
    """An SDK client's admitted load is abandoned; a request and a second SDK client waited
    on it. The request queues a load first; the client joins that one (one pending load per
    model) and finds the model loaded, instead of queueing a second load beside it."""
    mgr = await lab_manager(lab.url)
    pending = mgr.core.scheduler.pending
    first = asyncio.create_task(mgr.admit_load(Z, owner="sdk:gone"))
    await until(lambda: Z in pending)
    request = asyncio.create_task(mgr.acquire(Z))           # joins first: wakes first
    await until(lambda: pending[Z].waiters == 2)
    second = asyncio.create_task(mgr.admit_load(Z, owner="sdk:late"))
    await until(lambda: pending[Z].waiters == 3)
    await until(lambda: mgr.entry(Z).status.value == "loading")
    first.cancel()                                  # the first client went away just then
    await asyncio.gather(first, return_exceptions=True)
    assert await asyncio.wait_for(second, 5) is None        # loaded by the request's load
    (await asyncio.wait_for(request, 5)).release()
    assert mgr.entry(Z).owner == "proxy" and lab.state.load_calls[Z] == 1


@pytest.mark.parametrize("how", ["request", "sdk", "preload"])
async def test_a_load_waiting_for_memory_past_hang_threshold_s_is_a_hang_alert(
        lab, lab_manager, how):
    """A request, an SDK client's own load, and a request that joined a queued preload alike:
    the queue says since when they wait."""
    clock = ManualClock()
    mgr = await lab_manager(lab.url, clock=clock, health={"hang_threshold_s": 5})
    monitor = ModelHealthMonitor(mgr)
    scheduler = mgr.core.scheduler
    serving = await mgr.acquire(X)                         # 12 of 16 GB, serving
    if how == "preload":
        blocked = await waiting_for(mgr, Y)                # a request ahead: the guess waits
        assert scheduler.preload(mgr.core.registry.entries[W], value_s=10.0, why="test")
        await scheduler.settled()
        clock.advance(10)                                  # queued long before it is asked for
    waiting = asyncio.create_task(
        mgr.admit_load(W, owner="sdk:a") if how == "sdk" else mgr.acquire(W))
    await until(lambda: mgr.entry(W).waiting == 1)
    await scheduler.settled()
    assert f"hang:queued:{W}" not in ids(await monitor.check())
    clock.advance(6)
    alert = {a["id"]: a for a in (await monitor.check())["alerts"]}[f"hang:queued:{W}"]
    assert alert["message"] == f"1 request(s) for {W} waiting 6s for the model"
    serving.release()
    admitted = await asyncio.wait_for(waiting, 10)
    if how == "sdk":
        admitted.left(sent=False)
    else:
        admitted.release()
    if how == "preload":
        (await asyncio.wait_for(blocked, 10)).release()


async def test_a_hang_alert_counts_from_the_current_wait_not_an_earlier_one(lab, lab_manager):
    clock = ManualClock()
    mgr = await lab_manager(lab.url, clock=clock, health={"hang_threshold_s": 5})
    monitor = ModelHealthMonitor(mgr)
    serving = await mgr.acquire(X)                         # 12 of 16 GB, serving
    earlier = await waiting_for(mgr, Y)
    clock.advance(6)
    earlier.cancel()                                       # its requester gave up
    await asyncio.gather(earlier, return_exceptions=True)
    clock.advance(100)
    now = await waiting_for(mgr, Y)                        # waits afresh
    assert f"hang:queued:{Y}" not in ids(await monitor.check())
    now.cancel()
    await asyncio.gather(now, return_exceptions=True)
    serving.release()


async def test_an_sdk_load_that_waits_past_queue_timeout_s_is_refused_naming_what_holds_memory(
        lab, lab_manager):
    mgr = await lab_manager(lab.url, eviction={"queue_timeout_s": 0.3})
    serving = await mgr.acquire(X)                         # 12 of 16 GB, serving
    with pytest.raises(InsufficientMemory) as refused:
        await mgr.admit_load(Y, owner="sdk:a")
    assert f"'{X}' 12.0 GB (serving)" in refused.value.message
    assert "within 0.3s" in refused.value.message and refused.value.retry_after_s == 1.0
    assert Y not in mgr.core.scheduler.pending and mgr.entry(Y).waiting == 0
    serving.release()


async def test_an_sdk_client_that_leaves_the_queue_before_its_turn_loads_nothing(
        lab, lab_manager):
    mgr = await lab_manager(lab.url)
    serving = await mgr.acquire(X)                         # 12 of 16 GB, serving
    client = asyncio.create_task(mgr.admit_load(Y, owner="sdk:gone"))
    await until(lambda: mgr.entry(Y).waiting == 1)
    await mgr.core.scheduler.settled()
    client.cancel()                                        # gone while it waits for memory
    await asyncio.gather(client, return_exceptions=True)
    serving.release()                                      # room for Y: but nobody wants it
    await mgr.core.scheduler.settled()
    assert mgr.entry(Y).status.value == "unloaded" and Y not in mgr.core.scheduler.pending
    (await asyncio.wait_for(mgr.acquire(Y), 5)).release()  # a request later loads it


async def test_an_sdk_load_waiting_for_memory_whose_model_is_loaded_outside_loads_nothing(
        lab, lab_manager):
    mgr = await lab_manager(lab.url)
    serving = await mgr.acquire(X)                         # 12 of 16 GB, serving
    client = asyncio.create_task(mgr.admit_load(Y, owner="sdk:a"))
    await until(lambda: mgr.entry(Y).waiting == 1)
    await mgr.core.scheduler.settled()
    await lab.state.load(Y)                                # in LM Studio's GUI meanwhile
    await mgr.core.reconcile()
    assert await asyncio.wait_for(client, 10) is None      # nothing left for it to load
    assert mgr.entry(Y).status.value == "loaded" and mgr.entry(Y).waiting == 0
    serving.release()


async def test_requests_that_joined_an_sdk_load_have_the_model_kept_for_them_until_leased(
        lab, lab_manager):
    mgr = await lab_manager(lab.url)
    load = await asyncio.wait_for(mgr.admit_load(Z, owner="sdk:a"), 5)
    request = asyncio.create_task(mgr.acquire(Z))          # joins the client's load
    await until(lambda: mgr.entry(Z).waiting == 1)
    instance = await lab.state.load(Z)                     # the client loads it ...
    load.loaded(instance.instance_id)                            # ... and says so
    assert mgr.entry(Z).busy                               # no eviction before it leases
    (await asyncio.wait_for(request, 5)).release()
    assert mgr.entry(Z).reserved == 0 and not mgr.entry(Z).busy


async def test_a_load_behind_a_first_claim_goes_at_once_when_that_load_leaves_the_queue(
        lab, lab_manager):
    clock = ManualClock()
    mgr = await lab_manager(lab.url, clock=clock, models=footprints({X: 10, Y: 8, Z: 3, W: 5}))
    (await mgr.acquire(Z)).release()                       # idle: a victim for whoever may
    serving = await mgr.acquire(X)                         # 13 of 16 GB resident
    first = await waiting_for(mgr, Y)                      # 8 GB: waits for X
    clock.advance(mgr.config.eviction.fairness_s + 1)      # first claim on what goes
    behind = await waiting_for(mgr, W)                     # 5 GB: evicting Z is Y's to do
    first.cancel()                                         # Y's only request goes away
    await asyncio.gather(first, return_exceptions=True)
    (await asyncio.wait_for(behind, 5)).release()          # not at the next timed pass
    assert mgr.entry(Z).status.value == "unloaded"
    serving.release()


@pytest.mark.parametrize("how", ["preload", "request"])
async def test_a_load_that_fails_with_nobody_waiting_leaves_no_unretrieved_error(
        lab, lab_manager, caplog, how):
    """A preload nobody asked for, or a load whose requests all timed out while it ran."""
    gc.collect()                                           # earlier tests' leftovers first
    caplog.clear()
    mgr = await lab_manager(lab.url, eviction={"queue_timeout_s": 0.3})
    lab.state.faults.load_fail[Z] = "no such file"
    gate = lab.state.faults.load_gate[Z] = asyncio.Event()
    if how == "preload":
        assert mgr.core.scheduler.preload(mgr.core.registry.entries[Z], value_s=10.0,
                                          why="test")
    else:
        with pytest.raises(UpstreamTimeout):
            await mgr.acquire(Z)
    await lab.state.wait_for(lambda: lab.state.loading[Z] == 1)
    gate.set()
    await until(lambda: Z not in mgr.core.scheduler.pending)
    await asyncio.gather(*[t for t in asyncio.all_tasks() if t.get_name() == f"load:{Z}"])
    gc.collect()                                           # the failed load's future goes
    assert "Future exception was never retrieved" not in caplog.text and mgr.entry(Z).status.value == "error"


@pytest.mark.parametrize("how", ["preload", "sdk"])
async def test_a_load_queued_while_another_loads_is_looked_at_at_once(lab, lab_manager, how):
    """Admission is already running (for X's load under way): a load that fits beside it
    starts now, not once X's load is done."""
    mgr = await lab_manager(lab.url)
    gate = lab.state.faults.load_gate[X] = asyncio.Event()
    first = asyncio.create_task(mgr.acquire(X))
    await lab.state.wait_for(lambda: lab.state.loading[X] == 1)
    if how == "preload":
        assert mgr.core.scheduler.preload(mgr.core.registry.entries[Z], value_s=10.0,
                                          why="test")
        await asyncio.wait_for(lab.state.wait_for(lambda: lab.state.load_calls[Z] == 1), 5)
    else:
        load = await asyncio.wait_for(mgr.admit_load(Z, owner="sdk:a"), 5)
        load.left(sent=False)
    assert not first.done()
    gate.set()
    (await first).release()
