"""The engine's side of the replicas' shared state, with a StateStore that the test holds up:
what happens while a call to the shared state is under way."""
from __future__ import annotations

import asyncio
from typing import Any, Iterable

import pytest

from proxy.config import load_config
from proxy.engine.core import EngineCore
from proxy.engine.memory import GB
from proxy.engine.shared import Replica
from proxy.state import LeaseKey, MemoryState
from proxy.upstream.base import Capabilities

from .fakes import ScriptedBackend

pytestmark = pytest.mark.timeout(30)
MANAGED = Capabilities(manages_loading=True, reports_memory=False, self_evicts=False,
                       multi_instance=False, native_clients=False)
A = "lab/a"


class HeldLeases:
    """A StateStore (MemoryState's facts) whose lease renewals wait until `go` is set."""

    def __init__(self) -> None:
        self.inner = MemoryState("r1")
        self.go = asyncio.Event()
        self.renewing = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def renew_leases(self, leases: Iterable[LeaseKey], ttl_s: float) -> None:
        self.renewing.set()
        await self.go.wait()
        await self.inner.renew_leases(leases, ttl_s)


async def test_a_request_cancelled_while_its_lease_reaches_the_state_gives_it_back():
    store = HeldLeases()
    replica = Replica(store, lease_ttl_s=6, lock_ttl_s=10, unavailable_wait_s=1)
    config = load_config({"memory": {"sampler": "budget", "budget_gb": 20,
                                     "min_free_memory_gb": 0}, "storage": {"enabled": False}})
    core = EngineCore(config, ScriptedBackend({A: 1}, MANAGED),
                      shared=replica.host("default"))
    await core.start()
    try:
        acquiring = asyncio.ensure_future(core.acquire(A))   # a cold load, then its lease
        await store.renewing.wait()
        assert core.registry.entries[A].leases == 1
        acquiring.cancel()
        with pytest.raises(asyncio.CancelledError):
            await acquiring
        assert core.registry.entries[A].leases == 0          # it may be evicted again
    finally:
        store.go.set()
        await core.cleanup()


B, C = "lab/b", "lab/c"


async def test_a_model_another_replica_serves_is_passed_over_for_another_victim():
    store = MemoryState("r1")
    replica = Replica(store, lease_ttl_s=30, lock_ttl_s=30, unavailable_wait_s=1)
    config = load_config({"memory": {"sampler": "budget", "budget_gb": 10,
                                     "min_free_memory_gb": 0, "max_memory_usage_percent": 100},
                          "eviction": {"policy": "lru"}, "storage": {"enabled": False}})
    backend = ScriptedBackend({A: 4, B: 4, C: 4}, MANAGED)   # 4.8 GB each: two fit in 10
    host = replica.host("default")
    core = EngineCore(config, backend, shared=host)
    await core.start()
    try:
        for key in (A, B):                    # A used first: LRU's victim
            (await core.acquire(key)).release()
        other = store.view("r2")              # the other replica, alive, serves A
        await other.heartbeat(30)
        await other.renew_leases([("default", A)], 30)
        loading = asyncio.ensure_future(core.acquire(C))
        while A not in host.remote_busy:      # the first pass asked, and A was refused it
            await core.scheduler.settled()
            await asyncio.sleep(0)
        assert backend.loaded == [A, B]
        core.scheduler.kick()                 # the next pass passes A over: B makes room
        (await asyncio.wait_for(loading, 10)).release()
        assert backend.loaded == [A, C]
    finally:
        await core.cleanup()


async def test_a_load_whose_model_appeared_as_the_lock_was_taken_adopts_it_unreserved():
    """Another replica's load finished between this one's look and its lock: the block adopts
    (token None) and holds none of the host's memory."""
    store = MemoryState("r1")
    replica = Replica(store, lease_ttl_s=6, lock_ttl_s=10, unavailable_wait_s=1)
    config = load_config({"memory": {"sampler": "budget", "budget_gb": 10,
                                     "min_free_memory_gb": 0}, "storage": {"enabled": False}})
    core = EngineCore(config, ScriptedBackend({A: 4}, MANAGED), shared=replica.host("default"))
    await core.start()
    try:
        host = replica.host("default")
        e = core.registry.entries[A]

        async def room() -> float:
            return 10 * GB

        async def listed() -> bool:
            return True

        async with host.load_slot(e, 4 * GB, room, listed, timeout_s=5) as token:
            assert token is None
            assert await store.reserved_bytes("default") == 0
    finally:
        await core.cleanup()
