"""The engine's one status call (expected state checked), its face, and the library's manager
wrapped around a core."""
from __future__ import annotations

import asyncio
import logging

import pytest

from proxy.app import create_app
from proxy.engine.core import EngineCore
from proxy.engine.face import Engine
from proxy.engine.lifecycle import ModelStatus
from proxy.engine.memory import MemoryPressure
from proxy.server.keys import ENGINE
from proxy.library import ModelMemoryManager
from proxy.errors import UpstreamError
from proxy.upstream.lmstudio import LMStudioUpstream

from .fakes import GB, SettableSampler
from .test_engine import SIX, engine_config, footprints, six  # noqa: F401 - the fixture

S = ModelStatus


class States:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def on_state(self, model: str, old: str, new: str) -> None:
        self.seen.append((model, old, new))


class UnloadHook:
    """The emulator's LM Studio (a ModelBackend), running `during` once while the first unload
    is in flight: something else happens to the server under the engine's await."""

    def __init__(self, inner: LMStudioUpstream, during) -> None:
        self.inner, self.during = inner, during

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def detect(self):
        return await self.inner.detect()

    async def list_models(self):
        return await self.inner.list_models()

    async def load(self, key, options):
        return await self.inner.load(key, options)

    async def unload(self, instance_id: str) -> None:
        during, self.during = self.during, None
        if during is not None:
            await during()
        await self.inner.unload(instance_id)


async def core_for(url: str, **sections) -> EngineCore:
    config = engine_config(url, **sections)
    core = EngineCore(config, LMStudioUpstream(config.upstream), owns_upstream=True)
    await core.start()
    return core


async def test_a_swap_is_refused_when_the_state_moved_under_an_await(six):
    core = await core_for(six.url)
    key = SIX[0].key
    (await core.acquire(key)).release()
    e = core.entry(key)
    states = States()
    core.add_listener(states)
    saw, gate = e.status, asyncio.Event()

    async def stale() -> bool:
        await gate.wait()                  # the state moves while this waits
        return core.ctx.swap(e, saw, S.UNLOADING)
    task = asyncio.create_task(stale())
    assert await core.unload(key)
    epoch = core.ctx.status_epoch
    gate.set()
    assert await task is False
    assert e.status is S.UNLOADED and core.ctx.status_epoch == epoch
    assert states.seen == [(key, "loaded", "unloading"), (key, "unloading", "unloaded")]
    await core.cleanup()


async def test_admission_lets_a_model_loaded_by_someone_else_meanwhile_serve(six, caplog):
    want, victim = SIX[2].key, SIX[0].key                      # 6 GB, 4 GB
    sampler = SettableSampler()

    async def loaded_in_the_gui() -> None:                     # while room is made for it
        await six.state.load(want)
        await core.reconcile()
        sampler.set_available(20)
    config = engine_config(six.url, memory={"sampler": "local"},
                           models=footprints({m.key: m.size_bytes / GB for m in SIX}))
    core = EngineCore(config, UnloadHook(LMStudioUpstream(config.upstream), loaded_in_the_gui),
                      sampler=sampler, owns_upstream=True)
    await core.start()
    (await core.acquire(victim)).release()
    sampler.set_available(3)
    with caplog.at_level(logging.ERROR, logger="proxy.engine"):
        lease = await asyncio.wait_for(core.acquire(want), 10)
    lease.release()
    assert core.entry(victim).status is S.UNLOADED             # the room was made...
    assert core.entry(want).owner == "external"                # ...and the GUI's load serves
    assert six.state.load_calls[want] == 1
    assert not [r for r in caplog.records if "admission pass failed" in r.getMessage()]
    await core.cleanup()


async def test_the_manager_wraps_a_core_and_answers_critical_pressure_its_own_way(six):
    answered = asyncio.Event()

    class Careful(ModelMemoryManager):
        async def _handle_critical_memory(self):
            answered.set()
            return []
    config = engine_config(six.url, memory={"sampler": "local", "min_free_memory_gb": 4,
                                            "monitoring_interval": 0.05})
    sampler = SettableSampler()
    async with Careful(config=config, upstream=LMStudioUpstream(config.upstream),
                       sampler=sampler, owns_upstream=True) as mgr:
        assert not isinstance(mgr, EngineCore) and isinstance(mgr.core, EngineCore)
        await mgr.load_model(SIX[0].key)
        sampler.set_available(0.1)
        await asyncio.wait_for(answered.wait(), 10)            # the core's monitor loop
        assert mgr.memory_pressure is MemoryPressure.CRITICAL
        assert mgr.get_loaded_models() == [SIX[0].key]          # not the default eviction


async def test_the_app_holds_the_core_and_both_offer_the_whole_face(six):
    app = create_app(engine_config(six.url))
    face = [n for n in dir(Engine) if not n.startswith("_")] + ["clock", "store"]
    manager = ModelMemoryManager(config=engine_config(six.url))
    assert type(app[ENGINE]) is EngineCore
    for name in face:
        assert hasattr(app[ENGINE], name) and hasattr(manager, name), name


class ListHook(UnloadHook):
    """LM Studio's model list taken, then `during` runs before the engine reads it: the list
    is stale by the time it arrives."""

    async def list_models(self):
        models = await self.inner.list_models()
        during, self.during = self.during, None
        if during is not None:
            await during()
        return models


async def test_a_model_list_older_than_a_status_change_does_not_undo_it(six):
    key = SIX[0].key
    config = engine_config(six.url)
    core = EngineCore(config, ListHook(LMStudioUpstream(config.upstream), None),
                      owns_upstream=True)
    await core.start()
    (await core.acquire(key)).release()

    async def unloaded_meanwhile() -> None:
        assert await core.unload(key)
    core.backend.during = unloaded_meanwhile
    await core.reconcile()                       # its list still shows the model loaded
    assert core.entry(key).status is S.UNLOADED and not six.state.instances_of(key)
    await core.cleanup()


class FailingUnload(UnloadHook):
    async def unload(self, instance_id: str) -> None:
        raise UpstreamError("LM Studio refused the unload")


async def test_a_failed_unload_leaves_the_model_loaded_and_usable(six):
    key = SIX[0].key
    config = engine_config(six.url)
    core = EngineCore(config, FailingUnload(LMStudioUpstream(config.upstream), None),
                      owns_upstream=True)
    await core.start()
    (await core.acquire(key)).release()
    with pytest.raises(UpstreamError):
        await core.unload(key)
    assert core.entry(key).status is S.LOADED and six.state.instances_of(key)
    (await asyncio.wait_for(core.acquire(key), 5)).release()
    await core.cleanup()
