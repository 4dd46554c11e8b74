"""A preload gives way to a load that requests wait for on another replica, as it gives way
to one on its own (engine/shared_wants.py): it does not fill the memory that load is making
room in, for that replica to evict again."""
from __future__ import annotations

import asyncio

import pytest

from .state_contract import until
from .test_replicas_contention import MANAGED, GatedBackend
from .test_replicas_wants import A, B, C, _b_waits_for_a, _end, _pair, _resident

pytestmark = pytest.mark.timeout(30)


async def _waits_noted(core, key: str) -> bool:  # noqa: ANN001
    return ("r2", key) in await core.ctx.shared.replica.store.waiting_loads("default")


async def test_a_preload_waits_while_another_replicas_load_waits_for_room():
    # 8 GB: A (3.6) resident and served by the first replica; B (4.8) asked of the second
    # waits for A's memory; C (3.6) would fit in the 4.4 GB left, and so would take B's room.
    backend = GatedBackend({A: 3, B: 4, C: 3}, MANAGED)
    one, two, relays = await _pair(backend, lease_ttl_s=30, queue_timeout_s=10)
    try:
        serving, loading = await _b_waits_for_a(one, two)
        await until(lambda: _waits_noted(one, B))
        assert one.scheduler.preload(one.registry.entries[C], value_s=1000.0, may_evict=False)
        await one.scheduler.settled()
        assert C not in backend.loads and C in one.scheduler.pending    # it waits its turn
        serving.release()                                   # A given up, evicted for B
        (await asyncio.wait_for(loading, 10)).release()
        assert backend.loads == [A, B]
        assert sum(two.registry.entries[C].evictions.values()) == 0
        # B holds its room now: nothing waits, and the preload finds no room left for C.
        await until(lambda: _none_waiting(one))
        await until(lambda: _resident(one, B))
        one.scheduler.kick()
        await one.scheduler.settled()
        assert C not in one.scheduler.pending and C not in backend.loads
    finally:
        await _end((one, two), relays)


async def _none_waiting(core) -> bool:  # noqa: ANN001
    return not await core.ctx.shared.replica.store.waiting_loads("default")


async def test_a_preload_goes_ahead_when_no_other_replica_waits():
    backend = GatedBackend({A: 3, B: 4, C: 2}, MANAGED)     # C: 2.4 GB of the 3.2 left
    one, two, relays = await _pair(backend, lease_ttl_s=30)
    try:
        (await two.acquire(B)).release()                    # loaded at once: never waited
        assert not await one.ctx.shared.replica.store.waiting_loads("default")
        await until(lambda: _resident(one, B))
        await until(lambda: _unreserved(one))               # B's reservation's grace is over
        assert one.scheduler.preload(one.registry.entries[C], value_s=1000.0, may_evict=False)
        await until(lambda: _resident(one, C))
        assert backend.loads == [B, C]
    finally:
        await _end((one, two), relays)


async def _unreserved(core) -> bool:  # noqa: ANN001
    return await core.ctx.shared.replica.store.reserved_bytes("default") == 0


async def test_a_load_that_has_reserved_its_room_is_waited_for_no_more():
    # While it loads, its room is held by its reservation: a preload elsewhere is refused
    # that room by the reservation itself, and need not wait out the whole load.
    backend = GatedBackend({A: 3, B: 4, C: 3}, MANAGED)
    backend.gates[B] = asyncio.Event()
    one, two, relays = await _pair(backend, lease_ttl_s=30, queue_timeout_s=10)
    try:
        serving, loading = await _b_waits_for_a(one, two)
        await until(lambda: _waits_noted(one, B))
        serving.release()                                   # A given up, evicted for B
        await backend.started.setdefault(B, asyncio.Event()).wait()    # B loads, reserved
        await until(lambda: _none_waiting(one))
        assert not loading.done()
        backend.gates[B].set()
        (await asyncio.wait_for(loading, 10)).release()
    finally:
        await _end((one, two), relays)
