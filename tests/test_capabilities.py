"""Each capability a backend declares changes what the engine does; the engine reads the flags,
never the backend's name (a scripted backend declares them here)."""
from __future__ import annotations

import asyncio
from dataclasses import replace

from proxy.config import UpstreamConfig
from proxy.configload import load_config
from proxy.emulator import EmulatorOptions
from proxy.library import ModelMemoryManager
from proxy.upstream.base import Capabilities
from proxy.upstream.lmstudio import LMStudioProtocol

from .fakes import GB, ScriptedBackend

A, B = "lab/a", "lab/b"
MANAGED = Capabilities(manages_loading=True, reports_memory=False, self_evicts=False,
                       multi_instance=False, native_clients=False)


async def engine(backend: ScriptedBackend, budget_gb: float = 16) -> ModelMemoryManager:
    config = load_config({
        "upstream": {"url": "http://127.0.0.1:9"},
        "memory": {"sampler": "budget", "budget_gb": budget_gb, "min_free_memory_gb": 0,
                   "max_memory_usage_percent": 100, "footprint_factor": 1.2},
        "eviction": {"hold": 0, "queue_timeout_s": 5}, "storage": {"enabled": False}})
    mgr = ModelMemoryManager(config=config, upstream=backend)
    await mgr.start()
    return mgr


async def use(mgr: ModelMemoryManager, key: str) -> None:
    """A request for key, then whatever its load set going (the after-load reconcile)."""
    (await asyncio.wait_for(mgr.acquire(key), 5)).release()
    task = mgr.entry(key).load_task
    if task is not None:
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 5)


# -- self_evicts ------------------------------------------------------------------------------
async def test_a_model_a_self_evicting_backend_dropped_is_its_eviction_at_once():
    backend = ScriptedBackend({A: 1, B: 1}, replace(MANAGED, self_evicts=True), max_loaded=1)
    mgr = await engine(backend)
    await use(mgr, A)
    await use(mgr, B)                     # the backend drops A by itself for B
    assert mgr.entry(A).status.value == "unloaded"
    assert dict(mgr.entry(A).evictions) == {"backend": 1}
    assert mgr.entry(A).last_error is None and mgr.entry(B).status.value == "loaded"
    await mgr.cleanup()


async def test_a_failed_load_is_reconciled_too_when_the_backend_evicts_by_itself():
    backend = ScriptedBackend({A: 1, B: 1}, replace(MANAGED, self_evicts=True), max_loaded=1,
                              broken=frozenset({B}))
    mgr = await engine(backend)
    await use(mgr, A)
    acquire = asyncio.create_task(mgr.acquire(B))
    await asyncio.gather(acquire, return_exceptions=True)
    await asyncio.wait_for(asyncio.gather(mgr.entry(B).load_task, return_exceptions=True), 5)
    assert mgr.entry(B).status.value == "error"
    assert mgr.entry(A).status.value == "unloaded"   # dropped before B failed: known now
    await mgr.cleanup()


async def test_without_self_evicts_the_engine_does_not_look_again_after_a_load():
    backend = ScriptedBackend({A: 1, B: 1}, MANAGED, max_loaded=1)
    mgr = await engine(backend)
    await use(mgr, A)
    await use(mgr, B)
    assert mgr.entry(A).status.value == "loaded"      # until the reconcile loop's next turn
    await mgr.reconcile()
    assert mgr.entry(A).status.value == "unloaded" and not mgr.entry(A).evictions
    await mgr.cleanup()


# -- reports_memory ---------------------------------------------------------------------------
async def test_reported_memory_is_the_footprint_and_makes_room_for_it():
    backend = ScriptedBackend({A: 1, B: 1}, replace(MANAGED, reports_memory=True),
                              memory_gb={A: 3.5})
    mgr = await engine(backend, budget_gb=4)
    await use(mgr, A)
    await mgr.reconcile()
    assert mgr.footprint_bytes(mgr.entry(A)) == 3.5 * GB
    assert mgr.core.registry.footprint_source(mgr.entry(A)) == "reported"
    await use(mgr, B)                     # 3.5 + 1.2 GB > 4: A makes room
    assert backend.loaded == [B]
    await mgr.cleanup()


async def test_reported_memory_is_ignored_from_a_backend_that_does_not_declare_it():
    backend = ScriptedBackend({A: 1, B: 1}, MANAGED, memory_gb={A: 3.5})
    mgr = await engine(backend, budget_gb=4)
    await use(mgr, A)
    await mgr.reconcile()
    assert mgr.footprint_bytes(mgr.entry(A)) == 1.2 * GB   # file size × factor
    await use(mgr, B)
    assert backend.loaded == [A, B]
    await mgr.cleanup()


# -- manages_loading --------------------------------------------------------------------------
async def test_without_manages_loading_requests_are_relayed_and_nothing_is_loaded():
    backend = ScriptedBackend({A: 1}, replace(MANAGED, manages_loading=False))
    mgr = await engine(backend)
    lease = await asyncio.wait_for(mgr.acquire(A), 5)
    lease.release()
    assert backend.loads == [] and not mgr.manages_loading
    await mgr.cleanup()


async def test_with_manages_loading_a_request_loads_its_model():
    backend = ScriptedBackend({A: 1}, MANAGED)
    mgr = await engine(backend)
    await use(mgr, A)
    assert backend.loads == [A] and mgr.manages_loading
    await mgr.cleanup()


# -- what LM Studio declares -----------------------------------------------------------------
async def test_lm_studio_manages_loading_only_at_api_level_managed(make_emulator):
    seen = {}
    for version in ("0.4", "0.3", "0.2"):
        emu = await make_emulator(options=EmulatorOptions(version=version))
        lms = LMStudioProtocol(UpstreamConfig(url=emu.url))
        await lms.start()
        await lms.detect()
        seen[version] = lms.capabilities
        await lms.close()
    assert seen["0.4"].manages_loading and not seen["0.3"].manages_loading
    assert not seen["0.2"].manages_loading
    # 0.3 (/api/v0) tells what is loaded; before 0.3.6 nothing does
    assert seen["0.4"].reports_residency and seen["0.3"].reports_residency
    assert not seen["0.2"].reports_residency
    assert all(c.self_evicts and c.multi_instance and c.native_clients
               and not c.reports_memory for c in seen.values())
