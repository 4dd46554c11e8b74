"""After Redis restarts empty, no replica reserves memory before the others' heartbeats have
put back the reservations of their loads under way (engine/replica.py): the server is never
asked to load into room a load already holds."""
from __future__ import annotations

import asyncio

import pytest

from proxy.engine.core import EngineCore
from proxy.engine.replica import Replica
from proxy.state import create_state

from .redis_server import make_redis_server, redis_server  # noqa: F401
from .state_contract import until
from .test_replicas_contention import MANAGED, GatedBackend, _config
from .test_replicas_wants import A, B, _beaten

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("beaten", [False, True], ids=["before-its-heartbeat",
                                                      "after-its-heartbeat"])
async def test_after_redis_restarts_empty_a_load_waits_for_the_others_reservations(
        redis_server, beaten):  # noqa: F811
    backend = GatedBackend({A: 4, B: 4}, MANAGED)          # 4.8 GB each: one fits in 8
    backend.gates[A] = asyncio.Event()
    cores = []
    for name in ("r1", "r2"):                              # batches every 2 s
        replica = Replica(create_state(redis_server.url, replica_id=name), lease_ttl_s=6,
                          lock_ttl_s=30, unavailable_wait_s=5)
        await replica.start()
        core = EngineCore(_config(queue_timeout_s=20), backend, shared=replica.host("default"))
        await core.start()
        cores.append(core)
    one, two = cores
    probe = create_state(redis_server.url, replica_id="probe")
    try:
        loading_a = asyncio.ensure_future(one.acquire(A))
        await backend.started.setdefault(A, asyncio.Event()).wait()    # reserved, loading
        need = int(one.registry.footprint_bytes(one.registry.entries[A]))
        redis_server.stop()
        redis_server.start()                                # empty: A's reservation is gone
        if beaten:
            await until(lambda: _beaten(two))               # two's heartbeat is back first
        loading_b = asyncio.ensure_future(two.acquire(B))
        await until(lambda: _reserved(probe, need))         # one's heartbeat puts A's back
        await until(lambda: _readmitted(two, B))            # B is refused A's room
        assert B not in backend.started                     # never loaded beside A
        backend.gates[A].set()
        (await asyncio.wait_for(loading_a, 10)).release()
        loading_b.cancel()
        await asyncio.gather(loading_b, return_exceptions=True)
    finally:
        backend.gates[A].set()
        for core in cores:
            await core.cleanup()
            await core.ctx.shared.replica.close()
        await probe.close()


async def _reserved(store, need: int) -> bool:  # noqa: ANN001
    return await store.reserved_bytes("default") >= need


async def _readmitted(core: EngineCore, key: str) -> bool:
    p = core.scheduler.pending.get(key)
    return p is not None and p.readmits > 0
