"""A load's want of other replicas' models ends with its wait: once it is admitted, served,
refused or left by its clients, no replica gives a lease up for it, and a request held for
its claim goes on (engine/shared_wants.py)."""
from __future__ import annotations

import asyncio

import pytest

from proxy.engine.clock import ManualClock
from proxy.errors import InsufficientMemory

from .state_contract import until
from .test_replicas_contention import MANAGED, GatedBackend
from .test_replicas_wants import A, B, C, _b_waits_for_a, _end, _pair, _resident, _wanted

pytestmark = pytest.mark.timeout(30)


async def _unwanted(core, key: str) -> bool:  # noqa: ANN001
    return await core.ctx.shared.replica.store.wanted_by("default", key) is None


@pytest.mark.parametrize("leaves", ["its-client-goes", "refused-past-its-queue-timeout"])
async def test_a_load_that_leaves_the_queue_withdraws_its_want(leaves):
    backend = GatedBackend({A: 4, B: 4}, MANAGED)          # 4.8 GB each: one fits in 8
    one, two, relays = await _pair(backend, lease_ttl_s=30, queue_timeout_s=1)
    try:
        serving, loading = await _b_waits_for_a(one, two)
        if leaves == "its-client-goes":
            loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
        if leaves != "its-client-goes":
            assert isinstance(loading.exception(), InsufficientMemory)
        await until(lambda: _unwanted(one, A))
        serving.release()                           # idle now: nothing wants it
        await one.ctx.shared.replica.beat()
        assert one.ctx.shared.given_up == 0 and A not in one.ctx.shared.wanted
        assert await one.ctx.shared.replica.store.leased_by("default", A) == {"r1"}
        assert backend.loaded == [A]
    finally:
        await _end((one, two), relays)


async def test_a_load_admitted_with_one_wanted_model_withdraws_its_want_of_the_other():
    backend = GatedBackend({A: 3, B: 3, C: 3}, MANAGED)     # 3.6 GB each: two fit in 8
    one, two, relays = await _pair(backend, lease_ttl_s=30, queue_timeout_s=10)
    backend.gates[B] = asyncio.Event()
    try:
        serving_a = await one.acquire(A)
        serving_c = await one.acquire(C)
        await until(lambda: _resident(two, A))
        await until(lambda: _resident(two, C))
        loading = asyncio.ensure_future(two.acquire(B))      # wants A and C
        await until(lambda: _wanted(one, A))
        assert C in one.ctx.shared.wanted
        serving_c.release()                                 # C is given up, then evicted
        await asyncio.wait_for(backend.started.setdefault(B, asyncio.Event()).wait(), 10)
        await until(lambda: _unwanted(one, A))              # while B loads
        serving_a.release()
        await one.ctx.shared.replica.beat()
        assert one.ctx.shared.given_up == 1                 # C's, not A's for nothing
        assert await one.ctx.shared.replica.store.leased_by("default", A) == {"r1"}
        backend.gates[B].set()
        (await asyncio.wait_for(loading, 10)).release()
        assert sorted(backend.loaded) == [A, B]
    finally:
        backend.gates[B].set()
        await _end((one, two), relays)


async def test_a_request_waiting_for_a_claim_goes_on_once_the_load_that_wanted_it_left():
    backend = GatedBackend({A: 4, B: 4}, MANAGED)
    # Nothing heard, and the second replica's refusal holds on a clock that stands still: its
    # load never claims A. The promise to it is a 10 s batch.
    one, two, relays = await _pair(backend, lease_ttl_s=30, hearing=False,
                                   clock=ManualClock(), queue_timeout_s=20)
    try:
        serving, loading = await _b_waits_for_a(one, two)
        serving.release()                                   # given up, promised to it
        await until(lambda: _given_up(one))
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
        (await asyncio.wait_for(one.acquire(A), 3)).release()   # not the whole batch
        assert backend.loads == [A]
        assert await one.ctx.shared.replica.store.leased_by("default", A) == {"r1"}
        assert A not in one.ctx.shared.unloaded_by          # nobody unloads it
    finally:
        await _end((one, two), relays)


async def _given_up(core) -> bool:  # noqa: ANN001
    return core.ctx.shared.given_up > 0
