"""Two replicas load models that cannot both fit on their host: the second waits for the first
load and then makes room as a single proxy would, instead of being refused."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Mapping

import pytest

from proxy.configload import load_config
from proxy.engine import shared_load
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


class StaleReservations:
    """A replica's view of the shared state whose read of the host's reservations always comes
    a moment too early (none yet): its load is admitted, then refused its own reservation, as
    when another replica reserves between the two."""

    def __init__(self, inner: MemoryState) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def reserved_bytes(self, host: str) -> int:
        return 0


async def _pair(backend: GatedBackend, stale: bool = False, **eviction: Any
                ) -> tuple[EngineCore, EngineCore]:
    """Two replicas' engines on one server; `stale`: the second's reservations read early."""
    facts = MemoryState("r1")
    cores = []
    for store in (facts, StaleReservations(facts.view("r2")) if stale else facts.view("r2")):
        replica = Replica(store, lease_ttl_s=3, lock_ttl_s=30, unavailable_wait_s=1)
        await replica.start()
        core = EngineCore(_config(**eviction), backend, shared=replica.host("default"))
        await core.start()
        cores.append(core)
    return cores[0], cores[1]


async def _close(*cores: EngineCore) -> None:
    for core in cores:
        await core.cleanup()
        await core.ctx.shared.replica.close()


async def _contend(one: EngineCore, two: EngineCore, backend: GatedBackend
                   ) -> tuple[asyncio.Future, asyncio.Future]:
    """A's load under way on the first replica, holding its room; then B asked of the second,
    which waits for that room."""
    first = asyncio.ensure_future(one.acquire(A))
    await backend.started.setdefault(A, asyncio.Event()).wait()
    second = asyncio.ensure_future(two.acquire(B))
    await until(_room_taken(two, B))
    return first, second


def _room_taken(core: EngineCore, key: str):
    """Its load waits for room other replicas' loads hold: unadmitted, or admitted and
    refused its reservation."""
    async def check() -> bool:
        p = core.scheduler.pending.get(key)
        return p is not None and (p.reserved_elsewhere or
                                  core.registry.entries[key].room_refused is not None)
    return check


STALE = pytest.mark.parametrize("stale", [False, True], ids=["waits", "admitted-then-refused"])


@STALE
async def test_a_load_refused_room_by_another_replicas_load_waits_and_then_evicts_it(stale):
    backend = GatedBackend({A: 4, B: 4}, MANAGED)         # 4.8 GB each: one fits in 8
    backend.gates[A] = asyncio.Event()
    one, two = await _pair(backend, stale)
    try:
        first, second = await _contend(one, two, backend)
        backend.gates[A].set()
        (await asyncio.wait_for(first, 10)).release()      # A served, then idle
        (await asyncio.wait_for(second, 10)).release()
        assert backend.loaded == [B] and backend.loads == [A, B]
    finally:
        await _close(one, two)


@STALE
async def test_while_the_other_replica_serves_it_the_load_times_out_saying_so(stale):
    backend = GatedBackend({A: 4, B: 4}, MANAGED)
    backend.gates[A] = asyncio.Event()
    one, two = await _pair(backend, stale, queue_timeout_s=4)
    try:
        first, second = await _contend(one, two, backend)
        backend.gates[A].set()
        serving = await asyncio.wait_for(first, 10)          # and not released: it serves
        with pytest.raises(InsufficientMemory) as refused:
            await asyncio.wait_for(second, 10)
        serving.release()
        assert backend.loaded == [A] and backend.loads == [A]
        assert "lab/a" in refused.value.message and refused.value.retry_after_s is not None
    finally:
        await _close(one, two)


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
        await _close(one, two)


@STALE
async def test_a_load_still_refused_room_at_its_deadline_says_so_not_still_loading(
        caplog, stale):
    backend = GatedBackend({A: 4, B: 4}, MANAGED)
    backend.gates[A] = asyncio.Event()                  # A's load on the other replica runs on
    one, two = await _pair(backend, stale, queue_timeout_s=8)
    try:
        first = asyncio.ensure_future(one.acquire(A))
        await backend.started.setdefault(A, asyncio.Event()).wait()
        with caplog.at_level(logging.DEBUG, logger="proxy.engine"), \
                pytest.raises(InsufficientMemory) as refused:
            await asyncio.wait_for(two.acquire(B), 15)
        assert "other replicas' loads hold 4.8 GB" in refused.value.message
        assert refused.value.message.endswith("; waited 8s (eviction.queue_timeout_s)")
        waits = [r.levelno for r in caplog.records if "waits for room again" in r.getMessage()]
        if stale:          # admitted and refused every few seconds: said once
            assert len(waits) >= 2 and waits[:2] == [logging.INFO, logging.DEBUG]
        else:              # never admitted while the room is reserved elsewhere
            assert waits == []
        backend.gates[A].set()
        await asyncio.wait_for(asyncio.gather(first, return_exceptions=True), 10)
    finally:
        backend.gates[A].set()
        await _close(one, two)


async def test_a_replicas_own_loads_in_flight_do_not_hold_back_its_next_load():
    backend = GatedBackend({A: 4, B: 2}, MANAGED)         # 4.8 + 2.4 GB: both fit in 8
    backend.gates[A] = asyncio.Event()
    one, two = await _pair(backend)
    try:
        first = asyncio.ensure_future(one.acquire(A))
        await backend.started.setdefault(A, asyncio.Event()).wait()   # reserved, loading
        (await asyncio.wait_for(one.acquire(B), 10)).release()
        assert backend.loaded == [B] and not first.done()
        backend.gates[A].set()
        (await asyncio.wait_for(first, 10)).release()
    finally:
        backend.gates[A].set()
        await _close(one, two)


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
    one, two = await _pair(backend, stale=True)
    levels = Levels()
    two.listeners.add(levels)
    try:
        first, second = await _contend(one, two, backend)
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
        await _close(one, two)


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
        await _close(one, two)


async def test_a_reload_keeps_its_reservation_past_the_grace_of_the_load_before(monkeypatch):
    # A model loaded again on a replica soon after its last load (another replica's waiting
    # load evicted it between two requests): the last load's reservation, released after its
    # grace, must not take the new load's with it, or another replica loads into that room
    # and the server refuses one of the two loads.
    monkeypatch.setattr(shared_load, "RESERVATION_GRACE_S", 0.05)
    backend = GatedBackend({A: 4}, MANAGED)
    one, two = await _pair(backend)
    try:
        (await one.acquire(A)).release()
        earlier = set(one.ctx.shared._tasks)          # the first load's release among them
        assert await one.unload(A)
        backend.gates[A] = asyncio.Event()
        backend.started.pop(A, None)
        again = asyncio.ensure_future(one.acquire(A))
        await backend.started.setdefault(A, asyncio.Event()).wait()   # reserved, loading
        await asyncio.wait(earlier, timeout=5)        # the first load's grace is over
        need = one.registry.footprint_bytes(one.registry.entries[A])
        assert await two.ctx.shared.others_reserved_bytes() == int(need)
        backend.gates[A].set()
        (await asyncio.wait_for(again, 10)).release()
    finally:
        backend.gates.setdefault(A, asyncio.Event()).set()
        await _close(one, two)
