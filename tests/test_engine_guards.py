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
from proxy.errors import InsufficientMemory, ModelLoadFailed, UpstreamTimeout

from .fakes import GB
from .test_engine import footprints, manager_for
from .test_scheduler import W, X, Y, Z, lab, lab_manager  # noqa: F401 (fixtures)


class Events:
    """A listener: evictions as (model, reason, for_model), loads as (model, ok)."""

    def __init__(self) -> None:
        self.evicted: list[tuple[str, str, str | None]] = []
        self.loads: list[tuple[str, bool]] = []

    def on_evict(self, model: str, reason: str, for_model: str | None) -> None:
        self.evicted.append((model, reason, for_model))

    def on_load(self, model: str, duration_s: float, ok: bool) -> None:
        self.loads.append((model, ok))


async def queued(mgr, key):
    """Start an acquire; return it once the scheduler has looked at it since it arrived."""
    task = asyncio.create_task(mgr.acquire(key))
    while key not in mgr.core.scheduler.pending:
        await asyncio.sleep(0)
    await mgr.core.scheduler.settled()
    return task


async def test_a_young_waiting_load_does_not_stop_one_behind_it_from_evicting(lab, lab_manager):
    clock = ManualClock()
    mgr = await lab_manager(lab.url, clock=clock, models=footprints({X: 6, Y: 12, Z: 3, W: 8}))
    events = Events()
    mgr.add_listener(events)
    serving = await mgr.acquire(X)                       # 6 of 16 GB, serving
    (await mgr.acquire(Z)).release()                     # 3 GB idle: 7 GB free
    young = await queued(mgr, Y)                         # 12 GB: must wait for X, not starving
    assert not young.done()
    clock.advance(1)                                     # younger still: it comes second
    behind = await queued(mgr, W)                        # 8 GB: evicting Z makes room now
    assert Z not in mgr.get_loaded_models()              # no first claim held it back
    (await asyncio.wait_for(behind, 5)).release()
    assert W in mgr.get_loaded_models() and not young.done()
    assert events.evicted == [(Z, "admission", W)]
    serving.release()
    (await asyncio.wait_for(young, 5)).release()


async def test_a_preload_never_evicts_a_model_inside_its_residency(lab, lab_manager):
    clock = ManualClock()
    mgr = await lab_manager(lab.url, clock=clock, eviction={"hold": 600},
                            preload={"enabled": False})
    events = Events()
    mgr.add_listener(events)
    (await mgr.acquire(X)).release()                     # 12 of 16 GB, just loaded: held
    assert mgr.core.scheduler.preload(mgr.entry(Y), value_s=1000.0)   # 8 GB, worth a lot
    mgr.core.scheduler.kick()
    await mgr.core.scheduler.settled()
    assert Y not in mgr.core.scheduler.pending                # dropped: no room worth making
    assert mgr.get_loaded_models() == [X] and lab.state.unload_calls[X] == 0
    clock.advance(601)                                   # the residency is over
    assert mgr.core.scheduler.preload(mgr.entry(Y), value_s=1000.0)
    while Y in mgr.core.scheduler.pending:
        await mgr.core.scheduler.settled()
        await asyncio.sleep(0)
    assert mgr.get_loaded_models() == [Y]                # now the same preload evicts X
    assert events.evicted == [(X, "preload", Y)] and mgr.entry(X).evictions["preload"] == 1


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
        unload = asyncio.create_task(mgr.core.evictor.unload(e, "manual"))
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


async def test_failed_loads_back_off_doubling_to_a_minute_and_keep_the_reason(lab, lab_manager):
    clock = ManualClock()
    mgr = await lab_manager(lab.url, clock=clock)
    events = Events()
    mgr.add_listener(events)
    lab.state.faults.load_fail[Z] = "GGUF file is corrupt"
    for n, backoff_s in enumerate([1, 2, 4, 8, 16, 32, 60, 60], start=1):
        with pytest.raises(ModelLoadFailed):
            await mgr.acquire(Z)                         # the load itself fails
        with pytest.raises(ModelLoadFailed) as backing_off:
            await mgr.acquire(Z)                         # at once: no second attempt yet
        assert backing_off.value.retry_after_s == backoff_s
        assert "GGUF file is corrupt" in backing_off.value.message
        assert lab.state.load_calls[Z] == n
        clock.advance(backoff_s)
    assert events.loads == [(Z, False)] * 8
    del lab.state.faults.load_fail[Z]
    (await mgr.acquire(Z)).release()                     # a success forgets the failures
    await mgr.unload(Z)
    lab.state.faults.load_fail[Z] = "again"
    with pytest.raises(ModelLoadFailed):
        await mgr.acquire(Z)
    with pytest.raises(ModelLoadFailed) as backing_off:
        await mgr.acquire(Z)
    assert backing_off.value.retry_after_s == 1


async def test_a_failed_requester_load_keeps_its_reason_for_the_backoff(lab, lab_manager):
    clock = ManualClock()
    mgr = await lab_manager(lab.url, clock=clock)
    load = await mgr.admit_load(Z, owner="sdk:tester")
    load.failed("the client ran out of disk")
    with pytest.raises(ModelLoadFailed) as backing_off:
        await mgr.acquire(Z)
    assert "the client ran out of disk" in backing_off.value.message
    assert backing_off.value.retry_after_s == 1 and lab.state.load_calls[Z] == 0


def test_a_learned_footprint_is_the_mean_of_what_was_measured():
    from proxy.engine.lifecycle import ModelEntry
    e = ModelEntry(key=Z)
    for measured_gb in (4, 6, 8):
        e.learn_footprint(measured_gb * GB)
    assert e.footprint_bytes == pytest.approx(6 * GB) and e.footprint_samples == 3


async def test_a_model_of_higher_priority_is_kept_when_one_must_go(lab, lab_manager):
    clock = ManualClock()
    mgr = await lab_manager(lab.url, clock=clock, models={
        W: {"footprint_gb": 6, "priority": 10}, Z: {"footprint_gb": 6, "priority": 1},
        Y: {"footprint_gb": 8}})
    (await mgr.acquire(W)).release()                     # used first: the older of the two
    clock.advance(10)
    (await mgr.acquire(Z)).release()
    clock.advance(10)
    (await mgr.acquire(Y)).release()                     # 8 GB beside 12 of 16: one must go
    assert mgr.get_loaded_models() == sorted([W, Y])


async def test_lru_evicts_the_model_used_least_recently_not_the_one_loaded_first(
        lab, lab_manager):
    clock = ManualClock()
    mgr = await lab_manager(lab.url, clock=clock, eviction={"policy": "lru"},
                            models=footprints({Y: 8, Z: 5, W: 5}))
    clock.advance(100)
    (await mgr.acquire(Z)).release()                     # 5 GB, loaded first...
    clock.advance(10)
    (await mgr.acquire(W)).release()                     # 5 GB
    clock.advance(10)
    (await mgr.acquire(Z)).release()                     # ...but used last
    clock.advance(10)
    (await mgr.acquire(Y)).release()                     # 8 GB beside 10 of 16: one must go
    assert mgr.get_loaded_models() == sorted([Y, Z])


async def test_a_preload_is_queued_only_for_an_unloaded_model_not_yet_pending(lab, lab_manager):
    mgr = await lab_manager(lab.url, preload={"enabled": False})
    (await mgr.acquire(X)).release()
    assert mgr.core.scheduler.preload(mgr.entry(X), value_s=10.0) is False     # loaded already
    serving = await mgr.acquire(X)                       # the preload below must wait
    try:
        assert mgr.core.scheduler.preload(mgr.entry(Y), value_s=10.0) is True
        assert mgr.core.scheduler.preload(mgr.entry(Y), value_s=10.0) is False  # pending already
    finally:
        serving.release()


async def test_a_request_that_times_out_is_told_to_retry_after_at_least_a_second(
        lab, lab_manager):
    mgr = await lab_manager(lab.url, eviction={"queue_timeout_s": 0.2})
    serving = await mgr.acquire(X)
    with pytest.raises(InsufficientMemory) as no_room:
        await mgr.acquire(Y)                             # X serves throughout
    assert no_room.value.retry_after_s == 1.0 and " within 0.2s" in no_room.value.message
    serving.release()
    lab.state.faults.load_gate[Z] = asyncio.Event()      # LM Studio takes its time
    with pytest.raises(UpstreamTimeout) as slow:
        await mgr.acquire(Z)
    assert slow.value.retry_after_s == 1.0
    lab.state.faults.load_gate[Z].set()


async def test_model_timeout_hours_zero_never_unloads_for_idleness(lab, lab_manager):
    clock = ManualClock()
    mgr = await lab_manager(lab.url, clock=clock, eviction={"model_timeout_hours": 0},
                            models={**footprints({X: 12, Y: 8, W: 5}),
                                    Z: {"footprint_gb": 3, "ttl_s": 60}})
    (await mgr.acquire(Z)).release()
    (await mgr.acquire(W)).release()
    clock.advance(30 * 24 * 3600)
    assert await mgr.unload_idle_models() == [Z]         # only its own ttl_s applies
    assert mgr.get_loaded_models() == [W]
