"""Rules of the engine that a one-line change would break silently: only a load past its
fairness wait gets first claim, a preload never evicts inside a residency, an unload gives way
to a request that took the model while it sampled, and only an out-of-memory refusal makes a
load evict and retry."""
from __future__ import annotations

import asyncio
import threading

import pytest

from proxy.engine.clock import ManualClock
from proxy.engine.memory import MemorySample
from proxy.errors import ModelLoadFailed

from .fakes import GB
from .test_engine import footprints, manager_for
from .test_scheduler import W, X, Y, Z, lab, lab_manager  # noqa: F401 (fixtures)


async def queued(mgr, key):
    """Start an acquire; return it once the scheduler has looked at it since it arrived."""
    task = asyncio.create_task(mgr.acquire(key))
    while key not in mgr.scheduler.pending:
        await asyncio.sleep(0)
    await mgr.scheduler.settled()
    return task


async def test_a_young_waiting_load_does_not_stop_one_behind_it_from_evicting(lab, lab_manager):
    clock = ManualClock()
    mgr = await lab_manager(lab.url, clock=clock, models=footprints({X: 6, Y: 12, Z: 3, W: 8}))
    serving = await mgr.acquire(X)                       # 6 of 16 GB, serving
    (await mgr.acquire(Z)).release()                     # 3 GB idle: 7 GB free
    young = await queued(mgr, Y)                         # 12 GB: must wait for X, not starving
    assert not young.done()
    clock.advance(1)                                     # younger still: it comes second
    behind = await queued(mgr, W)                        # 8 GB: evicting Z makes room now
    assert Z not in mgr.get_loaded_models()              # no first claim held it back
    (await asyncio.wait_for(behind, 5)).release()
    assert W in mgr.get_loaded_models() and not young.done()
    serving.release()
    (await asyncio.wait_for(young, 5)).release()


async def test_a_preload_never_evicts_a_model_inside_its_residency(lab, lab_manager):
    clock = ManualClock()
    mgr = await lab_manager(lab.url, clock=clock, eviction={"hold": 600},
                            preload={"enabled": False})
    (await mgr.acquire(X)).release()                     # 12 of 16 GB, just loaded: held
    assert mgr.scheduler.preload(mgr.entry(Y), value_s=1000.0)   # 8 GB, worth a lot
    mgr.scheduler.kick()
    await mgr.scheduler.settled()
    assert Y not in mgr.scheduler.pending                # dropped: no room worth making
    assert mgr.get_loaded_models() == [X] and lab.state.unload_calls[X] == 0
    clock.advance(601)                                   # the residency is over
    assert mgr.scheduler.preload(mgr.entry(Y), value_s=1000.0)
    while Y in mgr.scheduler.pending:
        await mgr.scheduler.settled()
        await asyncio.sleep(0)
    assert mgr.get_loaded_models() == [Y]                # now the same preload evicts X


class PausingSampler:
    """A blocking local MemorySampler that, once armed, holds its next reading until resumed."""
    blocking, local = True, True

    def __init__(self) -> None:
        self.entered, self.resume = threading.Event(), threading.Event()
        self.armed = False

    def sample(self) -> MemorySample:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.resume.wait(5)
        return MemorySample(32 * GB, 28 * GB)


async def test_an_unload_gives_way_to_a_request_that_took_the_model_while_it_sampled(lab):
    sampler = PausingSampler()
    mgr = await manager_for(lab.url, sampler=sampler, memory={"sampler": "local",
                                                              "reclaim_timeout_s": 1})
    try:
        (await mgr.acquire(Z)).release()
        e = mgr.entry(Z)
        e.footprint_bytes = 3 * GB                       # measured: the unload samples first
        sampler.armed = True
        unload = asyncio.create_task(mgr.evictor.unload(e, "manual"))
        assert await asyncio.to_thread(sampler.entered.wait, 5)
        lease = await mgr.acquire(Z)                     # a request takes it meanwhile
        sampler.resume.set()
        assert await asyncio.wait_for(unload, 5) is False
        assert e.status.value == "loaded" and lab.state.unload_calls[Z] == 0
        lease.release()
    finally:
        sampler.resume.set()
        await mgr.cleanup()


async def test_a_load_failure_other_than_memory_evicts_nothing_and_is_not_retried(
        lab, lab_manager):
    mgr = await lab_manager(lab.url)
    (await mgr.acquire(X)).release()                     # 12 GB idle: a victim if one were wanted
    lab.state.faults.load_fail[Z] = "GGUF file is corrupt"
    with pytest.raises(ModelLoadFailed) as failed:
        await mgr.acquire(Z)
    assert "GGUF file is corrupt" in failed.value.message
    assert lab.state.load_calls[Z] == 1 and lab.state.unload_calls[X] == 0
    assert mgr.get_loaded_models() == [X]
