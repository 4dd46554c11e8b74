"""The engine's side of the replicas' shared state, with a StateStore that the test holds up:
what happens while a call to the shared state is under way."""
from __future__ import annotations

import asyncio
from typing import Any, Iterable

import pytest

from proxy.config import load_config
from proxy.engine.core import EngineCore
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
