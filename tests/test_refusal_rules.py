"""Refusals as engine/refusals.py words them, where a one-line change went unseen: what counts as
memory that may come free (idle models, other programs' memory: the load waits for
eviction.queue_timeout_s, not refused at once as final), the holders most memory first and a
loading model named so, other programs' memory net of the proxy's models, no negative free
amount, the SDK-client hint, and a model too large for local memory naming the limit only."""
from __future__ import annotations

import asyncio

import pytest

from proxy.engine.memory import MemorySample
from proxy.errors import InsufficientMemory, ModelTooLarge

from .fakes import GB
from .test_engine import footprints, manager_for
from .test_scheduler import SIZES, W, X, Y, Z, lab, lab_manager  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(30)


class OthersHold:
    """Local memory of which other programs use all but available_gb of 32 GB."""
    blocking = False
    local = True

    def __init__(self, available_gb: float = 4.0) -> None:
        self.available_gb = available_gb

    def sample(self) -> MemorySample:
        return MemorySample(32 * GB, int(self.available_gb * GB))


async def test_a_load_other_programs_block_waits_for_them_rather_than_refused_at_once(lab):
    mgr = await manager_for(lab.url, sampler=OthersHold(), models=footprints(SIZES),
                            memory={"sampler": "local", "min_free_memory_gb": 0},
                            eviction={"queue_timeout_s": 0.3})
    try:
        (await mgr.acquire(Z)).release()                   # 3 GB of the 28 GB in use: ours
        with pytest.raises(InsufficientMemory) as refused:
            await mgr.acquire(Y)                           # 8 GB: 4 GB free
        assert "within 0.3s" in refused.value.message
        assert f"held by: other processes 25.0 GB; '{Z}' 3.0 GB (evictable)." \
            in refused.value.message                       # the most memory first
        assert refused.value.retry_after_s == 1.0          # they may let go: not final
    finally:
        await mgr.cleanup()


async def test_an_idle_model_too_small_to_make_room_alone_still_counts_as_room_to_come(
        lab, lab_manager):
    """16 GB: X pinned (8), W serving (5), Z idle (3). Y (8) needs W's and Z's memory: Z alone
    is no eviction worth making, but once W is done both go, so Y waits."""
    mgr = await lab_manager(lab.url, eviction={"queue_timeout_s": 0.3}, models={
        **footprints({Y: 8, Z: 3, W: 5}), X: {"footprint_gb": 8, "pinned": True}})
    (await mgr.acquire(X)).release()
    (await mgr.acquire(Z)).release()
    serving = await mgr.acquire(W)
    with pytest.raises(InsufficientMemory) as refused:
        await mgr.acquire(Y)
    assert "within 0.3s" in refused.value.message and refused.value.retry_after_s == 1.0
    assert f"'{Z}' 3.0 GB (evictable)" in refused.value.message
    serving.release()


async def test_a_model_loading_is_named_as_loading_in_a_refusal(lab, lab_manager):
    mgr = await lab_manager(lab.url, eviction={"queue_timeout_s": 0.3})
    gate = lab.state.faults.load_gate[X] = asyncio.Event()   # 12 of 16 GB, loading
    first = asyncio.create_task(mgr.acquire(X))
    await lab.state.wait_for(lambda: lab.state.loading[X] == 1)
    with pytest.raises(InsufficientMemory) as refused:
        await mgr.acquire(Y)
    assert f"held by: '{X}' 12.0 GB (loading)." in refused.value.message
    gate.set()
    await asyncio.gather(first, return_exceptions=True)


@pytest.mark.parametrize("evict, why", [("after_disconnect", "its SDK client is connected"),
                                        ("never", "an SDK client's (native.evict: never)")])
async def test_a_refusal_by_an_sdk_clients_model_says_how_such_models_are_kept(
        lab, lab_manager, evict, why):
    mgr = await lab_manager(lab.url, native={"evict": evict})
    mgr.client_connection("sdk:a", +1)
    load = await asyncio.wait_for(mgr.admit_load(X, owner="sdk:a"), 5)
    load.loaded((await lab.state.load(X)).instance_id)     # 12 of 16 GB, the client's
    with pytest.raises(InsufficientMemory) as refused:
        await asyncio.wait_for(mgr.acquire(Y), 5)          # at once: only a person frees it
    assert f"'{X}' 12.0 GB ({why})." in refused.value.message
    assert "Models an SDK client loaded through the proxy are kept while it is connected, " \
           "or as native.evict says." in refused.value.message


async def test_local_memory_below_its_reserve_is_said_as_none_free_not_a_negative_amount(lab):
    mgr = await manager_for(lab.url, sampler=OthersHold(available_gb=4), models=footprints(SIZES),
                            memory={"sampler": "local", "min_free_memory_gb": 5},
                            eviction={"queue_timeout_s": 0.3})
    try:
        with pytest.raises(InsufficientMemory) as refused:
            await mgr.acquire(Z)                           # 3 GB; 4 free, 5 kept free
        assert "(it needs 3.0 GB, 0.0 GB may be used now)" in refused.value.message
    finally:
        await mgr.cleanup()


async def test_a_model_too_large_for_local_memory_names_the_limit_not_a_budget(lab):
    mgr = await manager_for(lab.url, sampler=OthersHold(available_gb=30),
                            models={**footprints(SIZES), X: {"footprint_gb": 20}},
                            memory={"sampler": "local", "min_free_memory_gb": 0,
                                    "max_memory_usage_percent": 50})
    try:
        with pytest.raises(ModelTooLarge) as refused:
            await asyncio.wait_for(mgr.acquire(X), 5)
        assert f"needs 20.0 GB (models.{X}.footprint_gb)" in refused.value.message
        assert "change memory.max_memory_usage_percent, or" in refused.value.message
    finally:
        await mgr.cleanup()
