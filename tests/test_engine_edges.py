"""Edges of the engine found by breaking it: abandoned loads, reservations, slow loads past the
deadline, lasting blockers first, failed writes, free-text task tags, hold modes, critical
pressure, what idle unloading and unloading leave behind."""
from __future__ import annotations

import asyncio

import pytest

from proxy.engine.clock import ManualClock
from proxy.errors import InsufficientMemory, UpstreamTimeout
from proxy.store import UsageStore

from .fakes import GB, SettableSampler
from .test_operation import managed
from .test_scheduler import SIZES, X, Y, Z, lab, lab_manager  # noqa: F401 (fixtures)

MODEL = "qwen/qwen3-4b"


async def test_an_abandoned_requester_load_does_not_stay_loading(lab, lab_manager):
    mgr = await lab_manager(lab.url)
    task = asyncio.create_task(mgr.admit_load(Z, owner="sdk:gone"))
    while mgr.entry(Z).status.value != "loading":
        await asyncio.sleep(0)
    task.cancel()                                   # the SDK client went away just then
    await asyncio.gather(task, return_exceptions=True)
    assert mgr.entry(Z).status.value == "unloaded" and Z not in mgr.core.scheduler.pending
    (await asyncio.wait_for(mgr.acquire(Z), 5)).release()   # and it loads normally after


async def test_requests_that_joined_a_requester_load_abandoned_at_admission_load_it(
        lab, lab_manager):
    mgr = await lab_manager(lab.url)
    sdk = asyncio.create_task(mgr.admit_load(Z, owner="sdk:gone"))
    while Z not in mgr.core.scheduler.pending:
        await asyncio.sleep(0)
    request = asyncio.create_task(mgr.acquire(Z))            # an OpenAI request joins it
    while mgr.entry(Z).status.value != "loading":
        await asyncio.sleep(0)
    sdk.cancel()                                    # the SDK client went away just then
    await asyncio.gather(sdk, return_exceptions=True)
    (await asyncio.wait_for(request, 5)).release()  # not failed: a load of its own
    assert mgr.entry(Z).owner == "proxy" and lab.state.load_calls[Z] == 1


async def test_a_load_asked_of_a_closed_engine_is_no_failure_of_the_model(lab, lab_manager):
    """The manager refuses at once once closed (ManagerClosed); its engine, asked directly,
    fails the load without charging the model, and loads it at once when started again."""
    mgr = await lab_manager(lab.url)
    core = mgr.core
    await mgr.cleanup()
    with pytest.raises(RuntimeError, match="start"):        # its connection is closed
        await asyncio.wait_for(core.load(Z), 5)
    e = core.entry(Z)
    assert (e.status.value, e.load_failures, e.last_error) == ("unloaded", 0, None)
    await core.start()
    try:
        assert await asyncio.wait_for(core.load(Z), 5) is True     # no backoff to wait out
    finally:
        await core.cleanup()


async def test_an_unload_right_after_a_load_waits_for_its_waiters_without_spinning(
        lab, lab_manager):
    mgr = await lab_manager(lab.url)
    waiter = asyncio.create_task(mgr.acquire(Z))
    while mgr.entry(Z).status.value != "loaded":
        await asyncio.sleep(0)
    assert mgr.entry(Z).reserved == 1                # loaded for the waiter, not yet leased
    unload = asyncio.create_task(mgr.unload(Z, drain_timeout_s=2))
    lease = await asyncio.wait_for(waiter, 5)
    await asyncio.sleep(0)
    assert not unload.done()                         # it waits for the request it served
    lease.release()
    assert await asyncio.wait_for(unload, 5) is True


async def test_joining_a_load_under_way_leaves_no_reservation_behind(lab, lab_manager):
    mgr = await lab_manager(lab.url)
    gate = lab.state.faults.load_gate.setdefault(Z, asyncio.Event())
    request = asyncio.create_task(mgr.acquire(Z))
    while lab.state.loading[Z] == 0:
        await asyncio.sleep(0)
    joined = asyncio.create_task(mgr.admit_load(Z, owner="sdk:late"))
    while mgr.core.scheduler.pending[Z].waiters < 2:
        await asyncio.sleep(0)
    gate.set()
    assert await joined is None                      # loaded by the other: nothing to do
    (await request).release()
    assert mgr.entry(Z).reserved == 0 and not mgr.entry(Z).busy


async def test_a_slow_load_past_the_deadline_is_a_timeout_not_a_memory_refusal(
        lab, lab_manager):
    mgr = await lab_manager(lab.url, eviction={"queue_timeout_s": 0.3})
    lab.state.faults.load_gate[Z] = asyncio.Event()  # LM Studio takes its time
    with pytest.raises(UpstreamTimeout) as slow:
        await mgr.acquire(Z)
    assert "still loading" in slow.value.message and slow.value.status == 504
    lab.state.faults.load_gate[Z].set()


async def test_a_pinned_model_that_is_serving_is_a_lasting_blocker(lab, lab_manager):
    from .test_engine import footprints
    mgr = await lab_manager(lab.url, models={**footprints(SIZES), X: {"footprint_gb": 12,
                                                                      "pinned": True}})
    serving = await mgr.acquire(X)
    with pytest.raises(InsufficientMemory) as refused:
        await asyncio.wait_for(mgr.acquire(Y), 5)    # at once, not after queue_timeout_s
    assert "(pinned)" in refused.value.message
    serving.release()


async def test_a_failed_history_write_is_kept_for_the_next_flush(emulator, tmp_path):
    from proxy.engine.usage import RequestRecord
    path = tmp_path / "history.sqlite3"
    mgr = await managed(emulator.url, store=UsageStore(path))
    mgr.record(RequestRecord(model=MODEL, ok=True, latency_s=0.1, at_s=mgr.clock.now()))
    (await mgr.acquire(MODEL)).release()
    mgr.store._db.execute("PRAGMA query_only = 1")   # the disk refuses writes for a while
    await mgr.flush()
    assert mgr.store.error is not None
    mgr.store._db.execute("PRAGMA query_only = 0")
    await mgr.flush()
    await mgr.cleanup()
    again = UsageStore(path)
    assert again.open()
    state = again.load(emulator.url)
    assert state["stats"][MODEL]["requests"] == 1 and MODEL in state["patterns"]
    assert [o["model"] for o in state["owned"].values()] == [MODEL]
    again.close()


async def test_a_free_text_task_tag_is_kept_in_a_safe_form(emulator, make_proxy, http):
    proxy = await make_proxy(emulator.url)
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 1, "messages": [],
            "metadata": {"task_type": "Summarize articles!"}}) as r:
        assert r.status == 200
    assert proxy.engine.usage(MODEL).tasks["summarize-articles"][0] == 1


async def test_what_was_learned_of_recency_survives_a_restart(emulator, tmp_path):
    path = tmp_path / "history.sqlite3"
    first = await managed(emulator.url, store=UsageStore(path))
    for _ in range(5):
        (await first.acquire(MODEL)).release()
    await first.cleanup()
    second = await managed(emulator.url, store=UsageStore(path))
    prediction = second.core.learner.predict(MODEL, second.clock.now(), 60.0)
    assert prediction.p_within > 0.5                 # used a moment ago, not "never"
    await second.cleanup()


async def test_the_adaptive_hold_switches_on_while_thrashing_and_off_after(lab, lab_manager):
    clock = ManualClock()
    mgr = await lab_manager(lab.url, clock=clock, eviction={"hold": "adaptive"})
    ev = mgr.core.evictor
    (await mgr.acquire(X)).release()
    assert ev.hold_s() == 0.0                        # calm: no hold
    (await mgr.acquire(Y)).release()                 # 8 GB beside 12: X is evicted
    clock.advance(10)
    (await mgr.acquire(X)).release()                 # X back within 30 s: thrashing
    assert ev.thrashing and ev.hold_s() == 60.0
    assert ev.why_kept(mgr.entry(X), critical=False) == "inside its residency"
    clock.advance(301)
    assert not ev.thrashing and ev.hold_s() == 0.0


async def test_a_reload_30_s_or_more_after_its_eviction_is_not_thrashing(lab, lab_manager):
    """Thrashing is reloading what was evicted within 30 s (docs/configuration.md, eviction.hold:
    adaptive); it is remembered for THRASH_MEMORY_S, and no longer from that moment on."""
    from proxy.engine.eviction import THRASH_MEMORY_S
    clock = ManualClock()
    mgr = await lab_manager(lab.url, clock=clock, eviction={"hold": "adaptive"})
    ev = mgr.core.evictor
    (await mgr.acquire(X)).release()
    (await mgr.acquire(Y)).release()                 # 8 GB beside 12: X is evicted
    clock.advance(30)
    (await mgr.acquire(X)).release()                 # back, but 30 s after: Y goes, calm
    assert not ev.thrashing and ev.hold_s() == 0.0
    clock.advance(29)
    (await mgr.acquire(Y)).release()                 # Y back 29 s after it went: thrashing
    assert ev.thrashing
    clock.advance(THRASH_MEMORY_S)
    assert not ev.thrashing and ev.hold_s() == 0.0


async def test_a_model_already_unloaded_is_never_chosen_as_a_victim(lab, lab_manager):
    """Under manage_external every model is the proxy's to evict, the unloaded ones too as
    far as ownership goes: only loaded ones may be victims, or a load would wait for an
    eviction that frees nothing."""
    from .test_scheduler import W
    clock = ManualClock()
    mgr = await lab_manager(lab.url, clock=clock, eviction={"manage_external": True,
                                                            "policy": "lru",
                                                            "queue_timeout_s": 2})
    (await mgr.acquire(W)).release()                 # 5 GB, the least recently used...
    await mgr.unload(W)                              # ...and gone already
    clock.advance(10)
    (await mgr.acquire(Y)).release()                 # 8 GB idle
    clock.advance(10)
    (await asyncio.wait_for(mgr.acquire(X), 5)).release()   # 12 GB: Y must go, not W
    assert mgr.get_loaded_models() == [X]


async def test_critical_pressure_evicts_a_model_inside_its_hold(lab):
    from .test_engine import manager_for
    sampler = SettableSampler(total_gb=32, available_gb=32)
    mgr = await manager_for(lab.url, sampler=sampler, eviction={"hold": 600},
                            memory={"sampler": "local", "min_free_memory_gb": 4,
                                    "max_memory_usage_percent": 80})
    (await mgr.acquire(Z)).release()                 # just loaded: inside its hold
    sampler.set_available(5)
    await mgr.sample_memory()
    assert mgr.memory_pressure.value == "high"
    assert await mgr.relieve_pressure() == []        # high only: the hold is kept
    sampler.set_available(0.5)
    await mgr.sample_memory()
    assert await mgr.relieve_pressure() == [Z]       # critical: the hold is waived
    await mgr.cleanup()


async def test_idle_unloading_leaves_models_that_are_not_ours_and_forgets_what_it_unloads(
        lab, lab_manager):
    clock = ManualClock()
    await lab.state.load(Y)                          # someone else's
    mgr = await lab_manager(lab.url, clock=clock)
    (await mgr.acquire(Z)).release()
    assert mgr.core.accounting.owns(Z, mgr.entry(Z).instance_ids)
    clock.advance(3 * 3600)
    assert await mgr.unload_idle_models() == [Z]
    assert lab.state.instances_of(Y) and mgr.core.accounting.owned_instances == {}


async def test_after_an_unload_admission_waits_for_a_measured_footprint_to_come_back(lab):
    """The unload returns once available memory has risen by half the learned footprint."""
    from .test_engine import manager_for

    class LateReturn:
        blocking, local = False, True

        def __init__(self):
            self.available, self.samples = 20 * GB, 0

        def sample(self):
            from proxy.engine.memory import MemorySample
            self.samples += 1
            return MemorySample(32 * GB, self.available)
    sampler = LateReturn()
    mgr = await manager_for(lab.url, sampler=sampler, memory={"sampler": "local",
                                                              "reclaim_timeout_s": 30})
    (await mgr.acquire(Z)).release()
    mgr.entry(Z).footprint_bytes = 3 * GB            # measured before
    unload = asyncio.create_task(mgr.unload(Z))
    while sampler.samples < 4:                       # it keeps looking while memory is away
        await asyncio.sleep(0.01)
    assert not unload.done()
    sampler.available += 2 * GB                      # the OS gives it back
    assert await asyncio.wait_for(unload, 5) is True
    await mgr.cleanup()


async def test_a_preload_not_started_within_a_minute_is_dropped(lab, lab_manager):
    clock = ManualClock()
    mgr = await lab_manager(lab.url, clock=clock, preload={"enabled": False})
    serving = [await mgr.acquire(X)]                 # 12 of 16 GB: the preload cannot go yet
    blocked = asyncio.create_task(mgr.acquire(Y))    # a requested load waits first
    while Y not in mgr.core.scheduler.pending:
        await asyncio.sleep(0)
    assert mgr.core.scheduler.preload(mgr.entry(Z), 5.0)
    clock.advance(61)
    mgr.core.scheduler.kick()
    await mgr.core.scheduler.settled()
    assert Z not in mgr.core.scheduler.pending and mgr.entry(Z).status.value == "unloaded"
    serving[0].release()
    (await blocked).release()


async def test_auto_for_a_task_no_model_serves_is_a_404(make_emulator, make_proxy, http):
    from proxy.emulator import CatalogModel
    emu = await make_emulator(catalog=[CatalogModel(key="lab/chat-only", size_bytes=GB)])
    proxy = await make_proxy(emu.url)
    async with http.post(f"{proxy.url}/v1/embeddings", json={
            "model": "auto:embedding", "input": "x"}) as r:
        body = await r.json()
    assert r.status == 404 and body["error"]["code"] == "model_not_found"


async def test_the_middleware_reads_the_model_from_the_query_too(emulator, http, private_home):
    from aiohttp import web

    from proxy import ModelMemoryMiddleware, create_model_memory_manager
    from proxy.server.serving import serve
    manager = await create_model_memory_manager(min_free_memory_gb=0, upstream=emulator.url)
    app = web.Application(middlewares=[ModelMemoryMiddleware(manager).aiohttp])
    async def work(request):
        return web.json_response({})
    app.router.add_get("/work", work)
    served = await serve(app)
    try:
        async with http.get(f"{served.url}/work", params={"model": MODEL}) as r:
            assert r.status == 200
        assert manager.usage(MODEL).requests == 1
        assert await ModelMemoryMiddleware(manager)({}, lambda c: asyncio.sleep(0, "plain")) \
            == "plain"                               # no model named: just the step
    finally:
        await served.close()
        await manager.cleanup()


def test_a_total_timeout_maps_to_upstream_timeout():
    from proxy.errors import UpstreamTimeout as Timeout
    from proxy.upstream.aiohttpclient import ERRORS
    mapped = ERRORS.map(TimeoutError(), "http://x", "POST /api/v1/models/load")
    assert isinstance(mapped, Timeout) and mapped.status == 504


async def test_the_first_memory_sample_states_the_pressure_and_only_changes_say_from_what(
        lab, caplog):
    """The gauge starts at `normal` before any sample: the first reading is no change."""
    import logging
    from .test_engine import manager_for
    sampler = SettableSampler(total_gb=32, available_gb=32)
    with caplog.at_level(logging.INFO, logger="proxy.engine"):
        mgr = await manager_for(lab.url, sampler=sampler,
                                memory={"sampler": "local", "min_free_memory_gb": 4,
                                        "max_memory_usage_percent": 80})
        await mgr.sample_memory()
        sampler.set_available(5)
        await mgr.sample_memory()
    said = [r.getMessage() for r in caplog.records if "memory pressure" in r.getMessage()]
    assert said == ["memory pressure low (0% used, 32.0 GB free)",
                    "memory pressure low → high (84% used, 5.0 GB free)"]
    await mgr.cleanup()
