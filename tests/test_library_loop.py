"""A manager belongs to the event loop it is first used in, until cleanup() closes it: a call
after that, or from another loop, is refused with its own error before any of the engine is
touched, and the owning loop goes on unharmed."""
from __future__ import annotations

import asyncio

import pytest

from proxy import ManagerClosed, ModelMemoryManager, WrongEventLoop

pytestmark = pytest.mark.timeout(60)
MODEL, OTHER = "qwen/qwen3-4b", "google/gemma-3-12b"


async def test_a_closed_manager_refuses_every_call_and_closes_once(emulator, private_home):
    manager = ModelMemoryManager(min_free_memory_gb=1, upstream=emulator.url)
    async with manager:
        await manager.load_model(MODEL)
    loads = emulator.state.load_calls[MODEL]
    for call in (lambda: manager.load_model(MODEL), lambda: manager.unload_model(MODEL),
                 lambda: manager.ensure_models_available([MODEL]), manager.clear_all_models,
                 manager.optimize_memory_usage, lambda: manager.acquire(MODEL),
                 lambda: manager.start(), lambda: manager.start_monitoring()):
        with pytest.raises(ManagerClosed, match="is closed .*create a new one"):
            await call()
    with pytest.raises(ManagerClosed):
        manager.record_model_usage(MODEL, latency=1.0)
    with pytest.raises(ManagerClosed):
        async with manager:
            pass
    await manager.cleanup()                                   # a second cleanup: nothing
    assert emulator.state.load_calls[MODEL] == loads


async def test_a_call_from_another_threads_loop_leaves_the_owning_loops_load_alone(
        emulator, private_home):
    async with ModelMemoryManager(min_free_memory_gb=1, upstream=emulator.url) as manager:
        mine = asyncio.create_task(manager.load_model(OTHER))
        with pytest.raises(WrongEventLoop, match="belongs to the event loop it was started "
                                                 "in; call it from that loop"):
            await asyncio.to_thread(asyncio.run, manager.load_model(OTHER))
        with pytest.raises(WrongEventLoop):
            await asyncio.to_thread(manager.record_model_usage, OTHER, 1.0)
        assert await mine                                      # the owner's load: unharmed
        assert await manager.load_model(MODEL)                 # and admission goes on
        assert emulator.state.load_calls[OTHER] == 1
        assert manager.usage(OTHER).requests == 0


async def test_a_manager_whose_loop_has_ended_says_so(emulator, private_home):
    manager = ModelMemoryManager(min_free_memory_gb=1, upstream=emulator.url)

    async def first() -> bool:
        await manager.start()
        loaded = await manager.load_model(MODEL)
        await manager.core.cleanup()     # its sockets closed; the manager is not closed
        return loaded
    assert await asyncio.to_thread(asyncio.run, first())     # then that loop ends
    with pytest.raises(WrongEventLoop, match=r"\(that loop has closed\)"):
        await manager.load_model(OTHER)
    with pytest.raises(WrongEventLoop):
        await manager.cleanup()
    assert emulator.state.load_calls[OTHER] == 0
