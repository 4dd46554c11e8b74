"""Two replicas load models that cannot both fit on their host: the second waits for the first
load and then makes room as a single proxy would, instead of being refused."""
from __future__ import annotations

import asyncio
from typing import Any, Mapping

import pytest

from proxy.configload import load_config
from proxy.engine.core import EngineCore
from proxy.engine.lifecycle import ModelStatus
from proxy.engine.memory import MemoryPressure
from proxy.engine.replica import Replica
from proxy.errors import InsufficientMemory
from proxy.state import MemoryState
from proxy.upstream.base import Capabilities, LoadResult

from .fakes import ScriptedBackend
from .state_contract import until

pytestmark = pytest.mark.timeout(30)
MANAGED = Capabilities(manages_loading=True, reports_memory=False, self_evicts=False,
                       multi_instance=False, native_clients=False)
A, B = "lab/a", "lab/b"


class GatedBackend(ScriptedBackend):
    """One server behind both replicas; a load of a key in `gates` finishes when its event is set."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gates: dict[str, asyncio.Event] = {}
        self.started: dict[str, asyncio.Event] = {}

    async def load(self, key: str, options: Mapping[str, Any]) -> LoadResult:
        self.started.setdefault(key, asyncio.Event()).set()
        if key in self.gates:
            await self.gates[key].wait()
        return await super().load(key, options)


def _config(**eviction: Any):
    return load_config({"memory": {"sampler": "budget", "budget_gb": 8,
                                   "min_free_memory_gb": 0, "max_memory_usage_percent": 100},
                        "eviction": eviction, "storage": {"enabled": False}})


async def _pair(backend: GatedBackend, **eviction: Any) -> tuple[EngineCore, EngineCore]:
    facts = MemoryState("r1")
    cores = []
    for store in (facts, facts.view("r2")):
        replica = Replica(store, lease_ttl_s=3, lock_ttl_s=30, unavailable_wait_s=1)
        await replica.start()
        core = EngineCore(_config(**eviction), backend, shared=replica.host("default"))
        await core.start()
        cores.append(core)
    return cores[0], cores[1]


async def test_a_load_refused_room_by_another_replicas_load_waits_and_then_evicts_it():
    backend = GatedBackend({A: 4, B: 4}, MANAGED)         # 4.8 GB each: one fits in 8
    backend.gates[A] = asyncio.Event()
    one, two = await _pair(backend)
    try:
        first = asyncio.ensure_future(one.acquire(A))
        await backend.started.setdefault(A, asyncio.Event()).wait()   # A's load holds its room
        second = asyncio.ensure_future(two.acquire(B))
        await until(_loading(two, B))                       # admitted on its own replica
        backend.gates[A].set()
        (await asyncio.wait_for(first, 10)).release()      # A served, then idle
        (await asyncio.wait_for(second, 10)).release()
        assert backend.loaded == [B] and backend.loads == [A, B]
    finally:
        await one.cleanup()
        await two.cleanup()


async def test_while_the_other_replica_serves_it_the_load_times_out_saying_so():
    backend = GatedBackend({A: 4, B: 4}, MANAGED)
    backend.gates[A] = asyncio.Event()
    one, two = await _pair(backend, queue_timeout_s=4)
    try:
        first = asyncio.ensure_future(one.acquire(A))
        await backend.started.setdefault(A, asyncio.Event()).wait()
        second = asyncio.ensure_future(two.acquire(B))
        await until(_loading(two, B))
        backend.gates[A].set()
        serving = await asyncio.wait_for(first, 10)          # and not released: it serves
        with pytest.raises(InsufficientMemory) as refused:
            await asyncio.wait_for(second, 10)
        serving.release()
        assert backend.loaded == [A] and backend.loads == [A]
        assert "lab/a" in refused.value.message and refused.value.retry_after_s is not None
    finally:
        await one.cleanup()
        await two.cleanup()


async def test_a_preload_whose_room_another_replicas_load_took_gives_way():
    backend = GatedBackend({A: 4, B: 4}, MANAGED)
    backend.gates[A] = asyncio.Event()
    one, two = await _pair(backend)
    try:
        first = asyncio.ensure_future(one.acquire(A))
        await backend.started.setdefault(A, asyncio.Event()).wait()
        assert two.scheduler.preload(two.registry.entries[B], value_s=1e6, why="test")
        guess = two.scheduler.pending[B].done
        await until(_loading(two, B))
        backend.gates[A].set()
        (await asyncio.wait_for(first, 10)).release()
        await asyncio.wait_for(guess, 10)
        assert B not in two.scheduler.pending and backend.loads == [A]
        assert two.registry.entries[B].status is ModelStatus.UNLOADED
    finally:
        await one.cleanup()
        await two.cleanup()


def _loading(core: EngineCore, key: str):
    async def check() -> bool:
        return core.registry.entries[key].status is ModelStatus.LOADING
    return check


class Levels:
    def __init__(self) -> None:
        self.seen: list[MemoryPressure] = []

    def on_pressure(self, level: MemoryPressure) -> None:
        self.seen.append(level)


async def test_a_load_refused_its_room_is_not_charged_so_its_replica_sees_no_critical_pressure():
    # Another replica's model resident and this replica's load, refused the room, charged
    # beside it: 9.6 GB of an 8 GB budget read as critical pressure, a memory_critical alert
    # and idle models evicted "regardless of residency", for memory nobody was using.
    backend = GatedBackend({A: 4, B: 4}, MANAGED)
    backend.gates[A] = asyncio.Event()
    one, two = await _pair(backend)
    levels = Levels()
    two.listeners.add(levels)
    try:
        first = asyncio.ensure_future(one.acquire(A))
        await backend.started.setdefault(A, asyncio.Event()).wait()
        second = asyncio.ensure_future(two.acquire(B))
        await until(_loading(two, B))
        backend.gates[A].set()
        (await asyncio.wait_for(first, 10)).release()
        await two.reconcile()       # as when it hears of A's load: two sees A resident
        assert two.registry.entries[A].status is ModelStatus.LOADED
        assert two.registry.entries[B].status is ModelStatus.LOADING   # still refused room
        await two.monitor.sample()
        assert MemoryPressure.CRITICAL not in levels.seen
        (await asyncio.wait_for(second, 10)).release()
        assert backend.loaded == [B]
    finally:
        await one.cleanup()
        await two.cleanup()


async def test_a_model_pinned_on_one_replica_is_not_evicted_by_another():
    backend = GatedBackend({A: 4, B: 4}, MANAGED)
    one, two = await _pair(backend, queue_timeout_s=4)
    try:
        one.pin(A, True)                                     # at runtime, on one replica only
        (await asyncio.wait_for(one.acquire(A), 10)).release()   # loaded, then idle
        with pytest.raises(InsufficientMemory) as refused:
            await asyncio.wait_for(two.acquire(B), 10)
        assert backend.loaded == [A] and "lab/a" in refused.value.message
    finally:
        await one.cleanup()
        await two.cleanup()
