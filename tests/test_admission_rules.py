"""Admission rules a one-line change would break unseen: who goes first among waiting loads
(oldest starving load, then age among equals), first claim from exactly fairness_s on, what
counts as waiting for memory, and a stopping engine answering the requests in its queue."""
from __future__ import annotations

import asyncio

import pytest

from proxy.engine.clock import ManualClock
from proxy.engine.lifecycle import ModelStatus
from proxy.errors import ProxyError

from .test_engine import footprints
from .test_scheduler import W, X, Y, Z, Loads, lab, lab_manager, waiting_for  # noqa: F401

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("starving", [False, True])
async def test_of_two_loads_waiting_alike_the_older_goes_first(lab, lab_manager, starving):
    clock = ManualClock()
    mgr = await lab_manager(lab.url, clock=clock, models=footprints({X: 12, Y: 8, W: 10}))
    serving = await mgr.acquire(X)                       # 12 of 16 GB, serving
    older = await waiting_for(mgr, Y)                    # 8 GB: waits for X
    clock.advance(1)
    younger = await waiting_for(mgr, W)                  # 10 GB: waits too, one waiter each
    if starving:                                         # both past fairness_s: first claim
        clock.advance(mgr.config.eviction.fairness_s + 1)
    serving.release()                                    # room for one of them, not both
    done, _ = await asyncio.wait({older, younger}, timeout=10,
                                 return_when=asyncio.FIRST_COMPLETED)
    assert done == {older} and not younger.done()
    older.result().release()
    (await asyncio.wait_for(younger, 10)).release()


async def test_a_load_that_has_waited_exactly_fairness_s_has_first_claim(lab, lab_manager):
    clock = ManualClock()
    mgr = await lab_manager(lab.url, clock=clock, models=footprints({X: 6, Y: 12, W: 5}))
    loads = Loads()
    mgr.add_listener(loads)
    serving = await mgr.acquire(X)                       # 6 GB serving
    starving = await waiting_for(mgr, Y)                 # 12 GB cannot fit beside it
    clock.advance(mgr.config.eviction.fairness_s)        # "longer than" starts at the bound
    late = await waiting_for(mgr, W)                     # 5 GB fits now, but would leave Y short
    assert W not in mgr.get_loaded_models()
    serving.release()
    (await asyncio.wait_for(starving, 10)).release()
    (await asyncio.wait_for(late, 10)).release()
    assert loads.started[1:] == [Y, W]


async def test_a_load_under_way_is_not_counted_as_waiting_for_memory(lab, lab_manager):
    mgr = await lab_manager(lab.url)
    gate = lab.state.faults.load_gate[Z] = asyncio.Event()
    loading = asyncio.create_task(mgr.acquire(Z))
    while mgr.model_status.get(Z) is not ModelStatus.LOADING:
        await asyncio.sleep(0)
    assert mgr.queue_length == 0                         # admitted: it waits for LM Studio
    gate.set()
    (await asyncio.wait_for(loading, 10)).release()


async def test_stopping_the_engine_answers_the_queue_and_cancels_a_load_under_way(
        lab, lab_manager):
    mgr = await lab_manager(lab.url)
    serving = await mgr.acquire(X)                       # 12 of 16 GB, serving
    lab.state.faults.load_gate[Z] = asyncio.Event()      # never set: Z's load hangs
    loading = asyncio.create_task(mgr.acquire(Z))        # 3 GB: fits, admitted
    while mgr.model_status.get(Z) is not ModelStatus.LOADING:
        await asyncio.sleep(0)
    blocked = await waiting_for(mgr, Y)                  # 8 GB: waits (queue_timeout_s 30)
    await asyncio.wait_for(mgr.cleanup(), 10)
    with pytest.raises(ProxyError, match="shutting down"):
        await asyncio.wait_for(blocked, 10)
    with pytest.raises(ProxyError, match="shutting down|cancelled"):
        await asyncio.wait_for(loading, 10)
    serving.release()


async def test_stopping_the_engine_with_only_a_request_waiting_returns(lab, lab_manager):
    mgr = await lab_manager(lab.url)
    serving = await mgr.acquire(X)                       # 12 of 16 GB, serving
    blocked = await waiting_for(mgr, Y)                  # 8 GB: waits (queue_timeout_s 30)
    await asyncio.wait_for(mgr.cleanup(), 10)
    with pytest.raises(ProxyError, match="shutting down"):
        await asyncio.wait_for(blocked, 10)
    serving.release()


async def test_a_waiting_load_whose_model_is_loaded_outside_is_served_at_once(lab, lab_manager):
    mgr = await lab_manager(lab.url)
    serving = await mgr.acquire(X)                       # 12 of 16 GB, serving
    blocked = await waiting_for(mgr, Y)                  # 8 GB: waits for X
    await lab.state.load(Y)                              # in LM Studio's GUI meanwhile
    await mgr.core.reconcile()
    (await asyncio.wait_for(blocked, 10)).release()      # X still serving: nothing evicted
    assert sorted(mgr.get_loaded_models()) == sorted([X, Y]) and lab.state.load_calls[Y] == 1
    serving.release()


async def test_a_queued_preload_a_request_joins_goes_as_a_requested_load(lab, lab_manager):
    mgr = await lab_manager(lab.url)
    serving = await mgr.acquire(X)                       # 12 of 16 GB, serving
    blocked = await waiting_for(mgr, Y)                  # 8 GB: waits for X
    scheduler = mgr.core.scheduler
    assert scheduler.preload(mgr.core.registry.entries[Z], value_s=10.0, why="test")
    await scheduler.settled()
    assert scheduler.pending[Z].speculative               # a guess waits behind requests
    (await asyncio.wait_for(mgr.acquire(Z), 10)).release()   # asked for: fits beside X
    assert not blocked.done()
    serving.release()
    (await asyncio.wait_for(blocked, 10)).release()
