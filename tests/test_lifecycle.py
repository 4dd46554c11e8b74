"""Every state transition, allowed or not, goes through one table."""
from __future__ import annotations

import itertools

import pytest

from proxy.engine.lifecycle import (OWNER_PROXY, TRANSITIONS, IllegalTransition, Lease,
                                    ModelEntry, ModelStatus, transition)

PAIRS = list(itertools.product(ModelStatus, ModelStatus))   # a "move" to itself is refused


@pytest.mark.parametrize("old,new", PAIRS, ids=[f"{a.value}->{b.value}" for a, b in PAIRS])
def test_transition_follows_the_table(old, new):
    entry = ModelEntry("m", status=old)
    if new in TRANSITIONS[old]:
        assert transition(entry, new) is old and entry.status is new
    else:
        with pytest.raises(IllegalTransition):
            transition(entry, new)
        assert entry.status is old


def test_unloading_clears_settled_and_unloaded_forgets_instances():
    entry = ModelEntry("m", status=ModelStatus.LOADED, instance_ids=("m",), owner=OWNER_PROXY)
    transition(entry, ModelStatus.UNLOADING)
    assert not entry.settled.is_set()
    transition(entry, ModelStatus.UNLOADED)
    assert entry.settled.is_set() and entry.instance_ids == () and not entry.owned


def test_lease_counts_and_releases_once():
    released = []
    entry = ModelEntry("m", status=ModelStatus.LOADED)
    a, b = Lease(entry, released.append), Lease(entry, released.append)
    assert entry.leases == 2 and not entry.drained.is_set()
    a.release()
    a.release()
    assert entry.leases == 1 and released == [a]
    b.release()
    assert entry.leases == 0 and entry.drained.is_set()


def test_a_late_instance_is_claimed_within_the_watch_and_only_once():
    """The watch (UNFINISHED_LOAD_WATCH_S) is a quarter of an hour from the load's start."""
    entry = ModelEntry("m", unfinished_since_s=100.0)
    assert entry.claim_unfinished(100.0 + 600.0)
    assert not entry.claim_unfinished(101.0)                 # once: the next is someone else's
    entry.unfinished_since_s = 100.0
    assert not entry.claim_unfinished(100.0 + 900.0)         # the watch is over


def test_load_time_is_the_mean_of_this_replicas_loads_since_an_adopted_one():
    """Another replica's figure (adopted after three loads here) is replaced outright by the
    next load measured here; the loads after it are averaged with it."""
    entry = ModelEntry("m", load_time_s=10.0, load_count=3, load_time_since=3)
    entry.learn_load_time(20.0)
    assert entry.load_time_s == 20.0 and entry.load_count == 4
    entry.learn_load_time(30.0)
    assert entry.load_time_s == 25.0 and entry.load_count == 5


async def test_a_lease_released_just_after_its_drain_wait_was_cancelled_releases_cleanly():
    """The unload waiting for the model to drain is cancelled, and the last lease goes in the
    same turn of the loop, before the wait has left: the release still succeeds."""
    import asyncio
    entry = ModelEntry("m", status=ModelStatus.LOADED)
    lease = Lease(entry, lambda _: None)
    waiting = asyncio.create_task(entry.drained.wait())
    while not entry.drained.waiters:
        await asyncio.sleep(0)
    waiting.cancel()
    lease.release()
    assert entry.leases == 0 and entry.drained.is_set()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert entry.drained.waiters == []


async def test_a_drain_wait_on_a_model_nothing_holds_is_over_at_once():
    import asyncio
    entry = ModelEntry("m", status=ModelStatus.LOADED)
    waiting = asyncio.create_task(entry.drained.wait())
    await asyncio.sleep(0)                                   # one turn: it needs no wake
    try:
        assert waiting.done() and waiting.result() is True
    finally:
        waiting.cancel()


async def test_a_lease_used_as_a_context_manager_is_released_on_leaving():
    released = []
    entry = ModelEntry("m", status=ModelStatus.LOADED)
    async with Lease(entry, released.append) as lease:
        assert entry.leases == 1
    assert entry.leases == 0 and released == [lease]
