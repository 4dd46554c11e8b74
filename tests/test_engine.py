"""The engine against the emulator: admission, drain, pins, idle timeouts, reconcile, OOM retry."""
from __future__ import annotations

import asyncio

import pytest

from proxy.configload import load_config
from proxy.emulator import CatalogModel, start_emulator
from proxy.engine.clock import ManualClock
from proxy.engine.lifecycle import ModelStatus
from proxy.library import ModelMemoryManager
from proxy.engine.memory import MemoryPressure
from proxy.errors import InsufficientMemory, InvalidRequest
from proxy.upstream.lmstudio import LMStudioUpstream

from .fakes import GB, SettableSampler

SIX = [CatalogModel(key=f"lab/model-{i}", size_bytes=int(g * GB), memory_bytes=int(g * GB),
                    load_time_s=1.0) for i, g in enumerate([4, 5, 6, 7, 8, 3])]


def engine_config(url, **sections):
    raw = {"upstream": {"url": url},
           "memory": {"sampler": "budget", "budget_gb": 16, "min_free_memory_gb": 0,
                      "max_memory_usage_percent": 100},
           "eviction": {"hold": 0, "queue_timeout_s": 30},
           "storage": {"enabled": False}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return load_config(raw)


@pytest.fixture
async def six(make_emulator):
    return await make_emulator(catalog=SIX, capacity_bytes=64 * GB)


async def manager_for(url, *, sampler=None, clock=None, **sections):
    config = engine_config(url, **sections)
    mgr = ModelMemoryManager(config=config, upstream=LMStudioUpstream(config.upstream),
                             sampler=sampler, clock=clock, owns_upstream=True)
    await mgr.start()
    return mgr


def footprints(keys_gb):
    return {k: {"footprint_gb": g} for k, g in keys_gb.items()}


async def test_admission_never_exceeds_budget_under_100_concurrent_requests(
        six, make_proxy, http):
    models = {m.key: m.resident_bytes / GB for m in SIX}
    proxy = await make_proxy(six.url, config=engine_config(
        six.url, models=footprints(models)))

    async def one(i):
        body = {"model": SIX[i % 6].key, "max_tokens": 2, "messages": []}
        async with http.post(f"{proxy.url}/v1/chat/completions", json=body) as resp:
            return resp.status
    statuses = await asyncio.gather(*(one(i) for i in range(100)))
    assert statuses == [200] * 100
    assert six.state.peak_used_bytes <= 16 * GB
    assert sum(six.state.unload_calls.values()) > 0          # it had to evict to serve all six
    assert all(n == 1 for n in (len(six.state.instances_of(m.key)) for m in SIX
                                if six.state.instances_of(m.key)))


async def test_leased_model_is_never_unloaded_even_at_critical(six):
    sampler = SettableSampler(total_gb=32, available_gb=32)
    mgr = await manager_for(six.url, sampler=sampler,
                            memory={"sampler": "local", "min_free_memory_gb": 4,
                                    "max_memory_usage_percent": 80})
    busy = await mgr.acquire(SIX[0].key)
    idle = await mgr.acquire(SIX[1].key)
    idle.release()
    sampler.set_available(0.5)                       # critical
    await mgr.sample_memory()
    assert mgr.memory_pressure is MemoryPressure.CRITICAL
    await mgr.optimize_memory_usage()
    assert mgr.get_loaded_models() == [SIX[0].key]   # the idle one went, the busy one stayed
    assert six.state.instances_of(SIX[0].key)
    busy.release()
    await mgr.cleanup()


async def test_pinned_models_survive_optimize(six):
    sampler = SettableSampler(total_gb=32, available_gb=32)
    mgr = await manager_for(six.url, sampler=sampler,
                            memory={"sampler": "local", "min_free_memory_gb": 4},
                            models={SIX[0].key: {"pinned": True}})
    await mgr.ensure_models_available([SIX[0].key, SIX[1].key])
    sampler.set_available(2)
    await mgr.optimize_memory_usage()
    assert SIX[0].key in mgr.get_loaded_models() and SIX[1].key not in mgr.get_loaded_models()
    assert await mgr.clear_all_models() == [SIX[0].key]   # an explicit clear takes pins too
    await mgr.cleanup()


async def test_idle_timeout_with_a_settable_clock(six):
    clock = ManualClock()
    mgr = await manager_for(six.url, clock=clock, models={SIX[2].key: {"ttl_s": 600}},
                            memory={"budget_gb": 32})           # all three fit: no eviction
    await mgr.ensure_models_available([SIX[0].key, SIX[1].key, SIX[2].key])
    clock.advance(601)
    assert await mgr.unload_idle_models() == [SIX[2].key]       # per-model ttl_s
    (await mgr.acquire(SIX[1].key)).release()                   # used just now
    clock.advance(2 * 3600 - 300)
    assert await mgr.unload_idle_models() == [SIX[0].key]       # model_timeout_hours = 2
    assert mgr.get_loaded_models() == [SIX[1].key]
    await mgr.cleanup()


async def test_models_loaded_by_others_are_not_evicted_unless_configured(six):
    await six.state.load(SIX[4].key)                             # 8 GB, loaded in the GUI
    mgr = await manager_for(six.url, memory={"budget_gb": 12})
    assert mgr.entry(SIX[4].key).owned is False
    with pytest.raises(InsufficientMemory):
        mgr.config = engine_config(six.url, memory={"budget_gb": 12},
                                   eviction={"queue_timeout_s": 0.2})
        await mgr.acquire(SIX[3].key)                            # 7 GB does not fit beside it
    assert six.state.instances_of(SIX[4].key)
    mgr.config = engine_config(six.url, memory={"budget_gb": 12},
                               eviction={"manage_external": True})
    (await mgr.acquire(SIX[3].key)).release()
    assert not six.state.instances_of(SIX[4].key)
    await mgr.cleanup()


async def test_a_clear_leaves_models_loaded_by_others_unless_configured(six):
    await six.state.load(SIX[4].key)                             # loaded in the GUI
    mgr = await manager_for(six.url, memory={"budget_gb": 32})
    (await mgr.acquire(SIX[0].key)).release()
    assert await mgr.clear_all_models() == [SIX[0].key]
    assert six.state.instances_of(SIX[4].key)
    mgr.config = engine_config(six.url, memory={"budget_gb": 32},
                               eviction={"manage_external": True})
    assert await mgr.clear_all_models() == [SIX[4].key]
    assert not six.state.instances_of(SIX[4].key)
    await mgr.cleanup()


async def test_a_load_by_hand_takes_a_priority_of_1_to_10_only(six):
    mgr = await manager_for(six.url, memory={"budget_gb": 32})
    for wrong in (0, 11):
        with pytest.raises(InvalidRequest):
            await mgr.load(SIX[0].key, wrong)
    assert not six.state.instances_of(SIX[0].key)
    assert await mgr.load(SIX[0].key, 10) and six.state.instances_of(SIX[0].key)
    await mgr.cleanup()


async def test_queue_timeout_is_503_with_retry_after(six, make_proxy, http):
    proxy = await make_proxy(six.url, config=engine_config(
        six.url, memory={"budget_gb": 10}, eviction={"queue_timeout_s": 0.3},
        models=footprints({SIX[3].key: 7, SIX[2].key: 6})))
    lease = await proxy.engine.acquire(SIX[3].key)               # serving: cannot be evicted
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         json={"model": SIX[2].key, "messages": []}) as resp:
        body = await resp.json()
        assert resp.status == 503 and resp.headers["Retry-After"]
    assert body["error"]["code"] == "insufficient_memory"
    lease.release()
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         json={"model": SIX[2].key, "messages": []}) as resp:
        assert resp.status == 200                                # drained: now it fits


async def test_queued_request_proceeds_when_the_serving_model_drains(six):
    mgr = await manager_for(six.url, memory={"budget_gb": 10},
                            models=footprints({SIX[3].key: 7, SIX[2].key: 6}))
    lease = await mgr.acquire(SIX[3].key)
    waiting = asyncio.create_task(mgr.acquire(SIX[2].key))
    for _ in range(1000):                                        # let it reach the queue
        if mgr.queue_length or waiting.done():
            break
        await asyncio.sleep(0)
    assert mgr.queue_length == 1 and six.state.instances_of(SIX[3].key)
    lease.release()
    (await waiting).release()
    assert mgr.get_loaded_models() == [SIX[2].key]
    await mgr.cleanup()


async def test_lm_studio_refusing_for_memory_triggers_evict_and_retry(make_emulator):
    # LM Studio's guardrails see less room than the proxy's budget believes.
    emu = await make_emulator(catalog=SIX, capacity_bytes=11 * GB)
    mgr = await manager_for(emu.url, memory={"budget_gb": 20})
    await mgr.ensure_models_available([SIX[1].key])              # 5 GB
    (await mgr.acquire(SIX[3].key)).release()                    # 7 GB: refused, evict, retry
    assert mgr.get_loaded_models() == [SIX[3].key]
    assert emu.state.load_calls[SIX[3].key] == 2
    await mgr.cleanup()


async def test_reconcile_after_lm_studio_restarts_with_nothing_loaded(make_emulator):
    emu = await make_emulator(catalog=SIX)
    port = emu.served.port
    mgr = await manager_for(emu.url)
    await mgr.ensure_models_available([SIX[0].key])
    await emu.close()
    await mgr.reconcile()
    assert mgr.upstream_ok is False
    emu2 = await start_emulator(SIX, port=port)
    try:
        await mgr.reconcile()
        assert mgr.upstream_ok and mgr.model_status[SIX[0].key] is ModelStatus.UNLOADED
        (await mgr.acquire(SIX[0].key)).release()                # loads again
        assert emu2.state.load_calls[SIX[0].key] == 1
    finally:
        await mgr.cleanup()
        await emu2.close()


async def test_hooks_fire_on_load_unload_and_pressure(six):
    sampler = SettableSampler()
    mgr = await manager_for(six.url, sampler=sampler, memory={
        "sampler": "local", "max_memory_usage_percent": 80, "min_free_memory_gb": 4})
    seen = []
    mgr.on_model_loaded = lambda m: seen.append(("loaded", m))
    mgr.on_model_unloaded = lambda m: seen.append(("unloaded", m))
    mgr.on_memory_pressure = lambda level: seen.append(("pressure", level.value))
    await mgr.load_model(SIX[0].key, priority=9)
    await mgr.unload_model(SIX[0].key)
    sampler.set_available(1)
    await mgr.sample_memory()
    assert seen == [("loaded", SIX[0].key), ("unloaded", SIX[0].key), ("pressure", "critical")]
    assert mgr.priority(SIX[0].key) == 9
    await mgr.cleanup()


async def test_critical_handler_is_overridable(six):
    calls = []

    class Careful(ModelMemoryManager):
        async def _handle_critical_memory(self):
            calls.append(self.memory_pressure)
            return []
    config = engine_config(six.url, memory={"sampler": "local", "min_free_memory_gb": 4})
    sampler = SettableSampler()
    mgr = Careful(config=config, upstream=LMStudioUpstream(config.upstream), sampler=sampler,
                  owns_upstream=True)
    await mgr.start()
    sampler.set_available(0.1)
    await mgr.optimize_memory_usage()
    assert calls == [MemoryPressure.CRITICAL]
    await mgr.cleanup()


async def test_admin_endpoints_drive_the_manager(six, make_proxy, http):
    proxy = await make_proxy(six.url, config=engine_config(six.url))
    key = SIX[0].key
    async with http.post(f"{proxy.url}/proxy/models/load", json={"model": key,
                                                                 "priority": 7}) as r:
        assert r.status == 200 and (await r.json())["state"] == "loaded"
    async with http.get(f"{proxy.url}/proxy/models") as r:
        row = next(x for x in (await r.json())["data"] if x["model"] == key)
    assert row["priority"] == 7 and row["owner"] == "proxy" and row["state"] == "loaded"
    async with http.post(f"{proxy.url}/proxy/models/unload", json={"model": key}) as r:
        assert (await r.json())["unloaded"] is True
    async with http.post(f"{proxy.url}/proxy/models/load", json={"model": key,
                                                                 "priority": 11}) as r:
        assert r.status == 400 and (await r.json())["error"]["param"] == "priority"
    async with http.post(f"{proxy.url}/proxy/clear") as r:
        assert r.status == 200
    async with http.post(f"{proxy.url}/proxy/optimize") as r:
        assert "memory_pressure" in await r.json()


async def test_a_client_that_disconnects_leaves_the_queue(six):
    mgr = await manager_for(six.url, memory={"budget_gb": 10},
                            models=footprints({SIX[3].key: 7, SIX[2].key: 6}))
    lease = await mgr.acquire(SIX[3].key)
    waiting = asyncio.create_task(mgr.acquire(SIX[2].key))
    for _ in range(1000):
        if mgr.queue_length:
            break
        await asyncio.sleep(0)
    assert mgr.queue_length == 1
    waiting.cancel()                                   # the client disconnects
    await asyncio.gather(waiting, return_exceptions=True)
    assert mgr.queue_length == 0 and mgr.model_status[SIX[2].key] is ModelStatus.UNLOADED
    lease.release()
    assert six.state.load_calls[SIX[2].key] == 0       # never loaded for nobody
    await mgr.cleanup()


async def test_models_that_fit_together_load_concurrently(six):
    mgr = await manager_for(six.url, memory={"budget_gb": 20})
    gates = {m.key: six.state.faults.load_gate.setdefault(m.key, asyncio.Event())
             for m in SIX[:2]}
    tasks = [asyncio.create_task(mgr.acquire(key)) for key in gates]
    await six.state.wait_for(lambda: all(six.state.loading[k] == 1 for k in gates))
    for gate in gates.values():
        gate.set()
    for lease in await asyncio.gather(*tasks):
        lease.release()
    assert mgr.get_loaded_models() == sorted(gates)
    await mgr.cleanup()
