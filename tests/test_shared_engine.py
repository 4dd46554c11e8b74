"""The engine's side of the replicas' shared state, with a StateStore that the test holds up:
what happens while a call to the shared state is under way."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Iterable

import pytest

from proxy.configload import load_config
from proxy.engine.clock import ManualClock
from proxy.engine.core import EngineCore
from proxy.engine.lifecycle import ModelEntry
from proxy.engine.memory import GB
from proxy.engine.replica import Replica
from proxy.engine.shared_learned import LearnedShare
from proxy.errors import StateUnavailable
from proxy.state import LeaseKey, MemoryState, Renewal
from proxy.upstream.base import Capabilities

from .fakes import ScriptedBackend
from .state_contract import until

pytestmark = pytest.mark.timeout(30)
MANAGED = Capabilities(manages_loading=True, reports_memory=False, self_evicts=False,
                       multi_instance=False, native_clients=False)
A = "lab/a"


class HeldLeases:
    """A StateStore (MemoryState's facts) whose lease renewals and first leases wait until
    `go` is set."""

    def __init__(self) -> None:
        self.inner = MemoryState("r1")
        self.go = asyncio.Event()
        self.renewing = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def renew_leases(self, leases: Iterable[LeaseKey], ttl_s: float,
                           idle: Iterable[LeaseKey] = ()) -> Renewal:
        self.renewing.set()
        await self.go.wait()
        return await self.inner.renew_leases(leases, ttl_s, idle)

    async def take_lease(self, host: str, model: str, ttl_s: float,
                         fleet_loaded: Iterable[str] = ()) -> bool | None:
        self.renewing.set()
        await self.go.wait()
        return await self.inner.take_lease(host, model, ttl_s, fleet_loaded)


async def test_a_request_cancelled_while_its_lease_reaches_the_state_gives_it_back():
    store = HeldLeases()
    await store.inner.heartbeat(30)             # alive: its reservations count
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
    await store.heartbeat(30)                 # alive: its claims count
    try:
        for key in (A, B):                    # A used first: LRU's victim
            (await core.acquire(key)).release()
        other = store.view("r2")              # the other replica, alive, serves A
        await other.heartbeat(30)
        await other.renew_leases([("default", A)], 30)
        loading = asyncio.ensure_future(core.acquire(C))
        # The first pass asks for A and is refused it; the next, at once, passes A over: B
        # makes room (not a batch later, when A would be asked for again).
        (await asyncio.wait_for(loading, 5)).release()
        assert backend.loaded == [A, C] and A in host.remote_busy
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


# -- a resident model's first lease on a replica, and another replica's unload ----------------

class CountedLeases(HeldLeases):
    """HeldLeases that counts the first leases taken (its `go` may be set from the start)."""

    def __init__(self, replica_id: str, facts: MemoryState) -> None:
        super().__init__()
        self.inner = facts.view(replica_id)
        self.taken = 0

    async def take_lease(self, host: str, model: str, ttl_s: float,
                         fleet_loaded: Iterable[str] = ()) -> bool | None:
        self.taken += 1
        return await super().take_lease(host, model, ttl_s, fleet_loaded)


class GatedUnload(ScriptedBackend):
    """A host whose unloads wait until `go` is set (an unload under way)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.go = asyncio.Event()
        self.go.set()
        self.unloading = asyncio.Event()

    async def unload(self, instance_id: str) -> None:
        self.unloading.set()
        await self.go.wait()
        await super().unload(instance_id)


async def alive(facts: MemoryState, replica_id: str) -> Any:
    """Another replica's view of the shared facts, its heartbeat beating."""
    view = facts.view(replica_id)
    await view.heartbeat(30)
    return view


def replica_core(store: Any, backend: ScriptedBackend, **kw: Any) -> tuple[EngineCore, Replica]:
    replica = Replica(store, lease_ttl_s=30, lock_ttl_s=5, unavailable_wait_s=1)
    config = load_config({"memory": {"sampler": "budget", "budget_gb": 20,
                                     "min_free_memory_gb": 0}, "storage": {"enabled": False},
                          "eviction": {"hold": 0}})
    return EngineCore(config, backend, shared=replica.host("default"), **kw), replica


async def test_a_resident_models_first_request_here_waits_for_its_lease_then_none_does():
    facts = MemoryState("facts")
    store = CountedLeases("r2", facts)
    backend = ScriptedBackend({A: 4}, MANAGED)
    backend.loaded.append(A)                    # resident: another replica loaded it
    core, _ = replica_core(store, backend)
    await facts.view("r2").heartbeat(30)
    await core.start()
    try:
        first = asyncio.ensure_future(core.acquire(A))
        await store.renewing.wait()
        await asyncio.sleep(0)
        assert not first.done()                 # not served before its lease is in the state
        store.go.set()
        lease = await first
        assert await facts.leased_by("default", A) == {"r2"}
        for _ in range(5):                      # leased here: the hot path asks nothing
            (await core.acquire(A)).release()
        assert store.taken == 1
        lease.release()
    finally:
        store.go.set()
        await core.cleanup()


async def test_a_request_meeting_another_replicas_unload_waits_for_it_and_reloads():
    facts = MemoryState("facts")
    other = await alive(facts, "r1")            # the replica that is evicting A
    backend = ScriptedBackend({A: 4}, MANAGED)
    backend.loaded.append(A)
    core, _ = replica_core(facts.view("r2"), backend)
    await facts.view("r2").heartbeat(30)
    await core.start()
    try:
        assert await other.claim_unload("default", A, 5) == set()   # r2 holds no lease
        acquiring = asyncio.ensure_future(core.acquire(A))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not acquiring.done()             # r1's unload stands: A is not served
        await backend.unload(A)                 # r1's unload reaches the host
        await other.release_unload("default", A)
        lease = await asyncio.wait_for(acquiring, 10)
        assert backend.loads == [A] and A in backend.loaded   # learned it was gone: reloaded
        assert await facts.leased_by("default", A) == {"r2"}
        lease.release()
        assert core.registry.entries[A].leases == 0   # the lease refused meanwhile went back
    finally:
        await core.cleanup()


class ClaimEndedWhenAsked:
    """A replica's view of the shared state on which the unload claim that refused its lease
    has ended by the time it asks whose it was."""

    def __init__(self, inner: MemoryState) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def unload_claimant(self, host: str, model: str) -> str | None:
        return None


async def test_a_request_refused_by_an_unload_that_ended_names_another_replica(caplog):
    facts = MemoryState("facts")
    other = await alive(facts, "r1")
    backend = ScriptedBackend({A: 4}, MANAGED)
    backend.loaded.append(A)
    caplog.set_level(logging.INFO, logger="proxy.engine")
    core, _ = replica_core(ClaimEndedWhenAsked(facts.view("r2")), backend)
    await facts.view("r2").heartbeat(30)
    await core.start()
    try:
        assert await other.claim_unload("default", A, 5) == set()
        acquiring = asyncio.ensure_future(core.acquire(A))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not acquiring.done()             # refused its lease: r1's unload stands
        await backend.unload(A)
        await other.release_unload("default", A)
        (await asyncio.wait_for(acquiring, 10)).release()
        assert "lab/a was unloaded by another replica" in caplog.text
        assert sum(core.registry.entries[A].evictions.values()) == 0
    finally:
        await core.cleanup()


async def test_an_unload_holds_off_other_replicas_first_leases_until_it_ends():
    facts = MemoryState("facts")
    other = await alive(facts, "r2")
    backend = GatedUnload({A: 4}, MANAGED)
    core, _ = replica_core(await alive(facts, "r1"), backend)
    await core.start()
    try:
        (await core.acquire(A)).release()
        core.ctx.shared.renewed.clear()         # the next batch dropped its lease here
        await facts.view("r1").drop_leases([("default", A)])
        backend.go.clear()
        unloading = asyncio.ensure_future(core.unload(A))
        await backend.unloading.wait()
        assert not await other.take_lease("default", A, 30)   # going: r2 must not serve it
        backend.go.set()
        assert await unloading
        await until(lambda: other.take_lease("default", A, 30))  # the claim ended with it
        assert not core.ctx.shared.claims
    finally:
        backend.go.set()
        await core.cleanup()


async def test_an_eviction_refused_by_another_replicas_lease_claims_nothing():
    facts = MemoryState("facts")
    other = await alive(facts, "r2")
    backend = ScriptedBackend({A: 4}, MANAGED)
    core, _ = replica_core(await alive(facts, "r1"), backend)
    await core.start()
    try:
        (await core.acquire(A)).release()
        await other.renew_leases([("default", A)], 30)       # r2 serves A
        assert not await core.unload(A, drain_timeout_s=1)
        assert A in backend.loaded and not core.ctx.shared.claims
        assert await other.take_lease("default", A, 30)
    finally:
        await core.cleanup()



async def test_a_first_lease_refused_to_the_end_of_its_wait_leaves_the_model_unleased_here():
    facts = MemoryState("facts")
    other = await alive(facts, "r2")
    assert await other.claim_unload("default", A, 30) == set()   # outlasts the wait below
    replica = Replica(facts.view("r1"), lease_ttl_s=30, lock_ttl_s=0.1, unavailable_wait_s=1)
    shared = replica.host("default")
    assert not await shared.lease_now(A)        # given up after lock_ttl_s and a poll
    assert not shared.leased(A)                 # so the next request asks again
    assert await facts.leased_by("default", A) == set()

class HeldClaims(HeldLeases):
    """HeldLeases whose unload claims wait until `go` is set; leases pass at once."""

    def __init__(self, replica_id: str, facts: MemoryState) -> None:
        super().__init__()
        self.inner = facts.view(replica_id)

    async def take_lease(self, host: str, model: str, ttl_s: float,
                         fleet_loaded: Iterable[str] = ()) -> bool | None:
        return await self.inner.take_lease(host, model, ttl_s, fleet_loaded)

    async def claim_unload(self, host: str, model: str, ttl_s: float, **kw: Any) -> set[str]:
        self.renewing.set()
        await self.go.wait()
        return await self.inner.claim_unload(host, model, ttl_s, **kw)


async def test_an_unload_given_up_after_its_claim_releases_the_claim_at_once():
    facts = MemoryState("facts")
    other = await alive(facts, "r2")
    store = HeldClaims("r1", facts)
    await store.inner.heartbeat(30)
    backend = ScriptedBackend({A: 4}, MANAGED)
    core, _ = replica_core(store, backend)
    await core.start()
    try:
        (await core.acquire(A)).release()
        e = core.registry.entries[A]
        evicting = asyncio.ensure_future(core.evictor.unload(e, "idle"))
        await store.renewing.wait()             # the claim is on its way; a request takes A
        lease = await core.acquire(A)
        store.go.set()
        assert not await evicting               # busy here now: the unload is given up
        assert A in backend.loaded
        await until(lambda: other.take_lease("default", A, 30), timeout_s=2)
        assert not core.ctx.shared.claims
        lease.release()
    finally:
        store.go.set()
        await core.cleanup()


# -- footprints and load times one replica measured, adopted by the others --------------------

REPORTING = Capabilities(manages_loading=True, reports_memory=True, self_evicts=False,
                         multi_instance=False, native_clients=False)


class TimedLoads(ScriptedBackend):
    """A host that says how long each load took, and reports its models' resident bytes."""

    async def load(self, key: str, options: Any) -> Any:
        result = await super().load(key, options)
        return dataclasses.replace(result, load_time_s=7.5)


async def test_a_replica_adopts_the_footprint_and_load_time_another_measured():
    facts = MemoryState("facts")
    host = TimedLoads({A: 4}, REPORTING, memory_gb={A: 3})    # one host, two replicas
    measuring, _ = replica_core(await alive(facts, "r1"), host)
    await measuring.start()
    (await measuring.acquire(A)).release()
    await measuring.reconcile()                 # the host reports A's 3 GB while it is loaded
    await until(lambda: _learned(facts, A, 3 * GB, 7.5))
    await measuring.unload(A)
    other, _ = replica_core(await alive(facts, "r2"), host)
    await other.start()                         # it has never seen A loaded
    try:
        e = other.registry.entries[A]
        await until(lambda: _adopted(e, 7.5))
        assert other.registry.footprint_bytes(e) == 3 * GB        # not 4 GB x 1.2 guessed
        assert other.registry.reload_s(e) == 7.5
        assert (e.footprint_samples, e.load_count) == (0, 0)      # adopted, not measured here
        assert other.row(A)["footprint_source"] == "shared"       # as /proxy/models shows it
        e.learn_footprint(3.2 * GB)             # measured here too: its own from now on
        assert other.row(A)["footprint_source"] == "learned"
        (await other.acquire(A)).release()      # its own load: its own measurement counts
        assert (e.load_time_s, e.load_count) == (7.5, 1)
    finally:
        await measuring.cleanup()
        await other.cleanup()


async def _learned(facts: MemoryState, key: str, footprint_bytes: float, load_s: float) -> bool:
    got = (await facts.learned("default")).get(key)
    return got is not None and got.footprint is not None and got.load is not None and \
        (got.footprint.value, got.load.value) == (footprint_bytes, load_s)


async def _adopted(e: Any, load_s: float) -> bool:
    return e.load_time_s == load_s and e.footprint_bytes is not None


async def test_an_own_measurement_gives_way_only_to_a_later_one():
    clock = ManualClock()
    facts = MemoryState("facts", clock=clock)
    r1, r2, r3 = (LearnedShare(facts.view(r), "h") for r in ("r1", "r2", "r3"))
    e1, e2, e3 = (ModelEntry(A, size_bytes=4 * GB) for _ in range(3))
    for share, e in ((r1, e1), (r2, e2)):
        await share.sync({A: e})                # first sight: nothing measured here yet
    e1.learn_load_time(5.0)
    clock.advance(1)
    await r1.sync({A: e1})                      # r1 measured: published
    e3.learn_load_time(3.0)                     # r3's, from its history file (age unknown)
    await r3.sync({A: e3})
    assert (e3.load_time_s, e3.load_count) == (3.0, 1)        # kept against r1's
    assert (await facts.learned("h"))[A].load.by == "r1"      # and not published over it
    await r2.sync({A: e2})
    assert (e2.load_time_s, e2.load_count) == (5.0, 0)        # r2 had only a guess
    e2.learn_load_time(8.0)
    assert (e2.load_time_s, e2.load_count) == (8.0, 1)        # its own replaces the adopted
    clock.advance(1)
    await r2.sync({A: e2})
    await r1.sync({A: e1})
    await r3.sync({A: e3})
    assert e1.load_time_s == 8.0 and e3.load_time_s == 8.0    # later than what each had
    await r2.sync({A: e2})
    clock.advance(1)
    e1.learn_load_time(6.0)                     # r1 measures again, later still
    await r1.sync({A: e1})
    await r2.sync({A: e2})
    assert e2.load_time_s == 6.0
    clock.advance(1)
    await r2.sync({A: e2})                      # nothing new: r2 publishes nothing
    assert (await facts.learned("h"))[A].load.by == "r1"


async def test_a_replicas_restored_measurement_fills_a_gap_in_the_fleets():
    facts = MemoryState("facts")
    restored = ModelEntry(A, size_bytes=4 * GB)
    restored.learn_load_time(3.0)
    await LearnedShare(facts.view("r1"), "h").sync({A: restored})
    guessing = ModelEntry(A, size_bytes=4 * GB)
    await LearnedShare(facts.view("r2"), "h").sync({A: guessing})
    assert guessing.load_time_s == 3.0 and guessing.footprint_bytes is None



async def test_a_restored_footprint_is_kept_but_not_published_over_the_fleets():
    clock = ManualClock()
    facts = MemoryState("facts", clock=clock)
    r1, r3 = LearnedShare(facts.view("r1"), "h"), LearnedShare(facts.view("r3"), "h")
    e1, e3 = ModelEntry(A, size_bytes=4 * GB), ModelEntry(A, size_bytes=4 * GB)
    await r1.sync({A: e1})
    e1.learn_footprint(5 * GB)                  # r1 measured it
    clock.advance(1)
    await r1.sync({A: e1})
    e3.learn_footprint(3 * GB)                  # r3's, from its history file
    await r3.sync({A: e3})
    assert e3.footprint_bytes == 3 * GB
    assert (await facts.learned("h"))[A].footprint.by == "r1"


async def test_the_hosts_own_figure_is_published_as_it_changes_and_never_displaced():
    clock = ManualClock()
    facts = MemoryState("facts", clock=clock)
    r1, r2 = LearnedShare(facts.view("r1"), "h"), LearnedShare(facts.view("r2"), "h")
    e1, e2 = ModelEntry(A, size_bytes=4 * GB), ModelEntry(A, size_bytes=4 * GB)
    e1.reported_bytes = 3 * GB
    await r1.sync({A: e1})
    e1.reported_bytes = 3.5 * GB                # the host reports anew: the fleet hears it
    clock.advance(1)
    await r1.sync({A: e1})
    assert (await facts.learned("h"))[A].footprint.value == 3.5 * GB
    await r2.sync({A: e2})
    e2.learn_footprint(6 * GB)                  # measured later by another replica
    clock.advance(1)
    await r2.sync({A: e2})
    await r1.sync({A: e1})
    assert e1.footprint_bytes is None           # the host's figure stays r1's to go by

class HeldRenewals(HeldLeases):
    """HeldLeases whose batch renewals wait for `go`; first leases pass at once."""

    def __init__(self, replica_id: str, facts: MemoryState) -> None:
        super().__init__()
        self.inner = facts.view(replica_id)

    async def take_lease(self, host: str, model: str, ttl_s: float,
                         fleet_loaded: Iterable[str] = ()) -> bool | None:
        return await self.inner.take_lease(host, model, ttl_s, fleet_loaded)


async def test_a_lease_taken_again_while_the_batch_drops_it_stays():
    facts = MemoryState("facts")
    await facts.view("r1").heartbeat(30)
    store = HeldRenewals("r1", facts)
    store.go.set()
    core, replica = replica_core(store, ScriptedBackend({A: 4, B: 4}, MANAGED))
    await core.start()
    try:
        (await core.acquire(A)).release()       # A's lease here has ended
        serving_b = await core.acquire(B)
        await replica.beat()                    # A's lease is kept one batch more
        store.go.clear()
        store.renewing.clear()
        beat = asyncio.ensure_future(replica.beat())
        await store.renewing.wait()             # the batch renews B, and will drop A...
        serving_a = await core.acquire(A)       # ...which a request has just taken again
        store.go.set()
        await beat
        assert await facts.leased_by("default", A) == {"r1"}
        serving_a.release()
        serving_b.release()
    finally:
        store.go.set()
        await core.cleanup()



class AnsweredLate(HeldRenewals):
    """HeldRenewals whose first leases reach the state at once, their answer held by `answer`."""

    def __init__(self, replica_id: str, facts: MemoryState) -> None:
        super().__init__(replica_id, facts)
        self.answer, self.taking = asyncio.Event(), asyncio.Event()

    async def take_lease(self, host: str, model: str, ttl_s: float,
                         fleet_loaded: Iterable[str] = ()) -> bool | None:
        taken = await self.inner.take_lease(host, model, ttl_s, fleet_loaded)
        self.taking.set()
        await self.answer.wait()
        return taken


async def test_a_lease_on_its_way_back_while_the_batch_drops_it_stays():
    facts = MemoryState("facts")
    await facts.view("r1").heartbeat(30)
    store = AnsweredLate("r1", facts)
    store.go.set()
    store.answer.set()
    core, replica = replica_core(store, ScriptedBackend({A: 4, B: 4}, MANAGED))
    await core.start()
    try:
        (await core.acquire(A)).release()       # A's lease here has ended
        serving_b = await core.acquire(B)
        await replica.beat()                    # A's lease is kept one batch more
        store.go.clear()
        store.renewing.clear()
        store.answer.clear()
        store.taking.clear()
        beat = asyncio.ensure_future(replica.beat())
        await store.renewing.wait()             # the batch renews B, and will drop A...
        taking = asyncio.ensure_future(core.acquire(A))
        await store.taking.wait()               # ...whose lease is in the state, not yet answered
        store.go.set()
        await beat
        store.answer.set()
        serving_a = await taking
        assert await facts.leased_by("default", A) == {"r1"}
        serving_a.release()
        serving_b.release()
    finally:
        store.go.set()
        store.answer.set()
        await core.cleanup()

class Unreachable(HeldLeases):
    """A state whose first leases fail as an unreachable Redis does (counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    async def take_lease(self, host: str, model: str, ttl_s: float,
                         fleet_loaded: Iterable[str] = ()) -> bool | None:
        self.asked += 1
        raise StateUnavailable("shared state unavailable: Redis at redis://r:6379 failed")


async def test_while_the_state_is_away_a_resident_model_serves_asking_it_once():
    store = Unreachable()
    backend = ScriptedBackend({A: 4}, MANAGED)
    backend.loaded.append(A)
    core, replica = replica_core(store, backend)
    await core.start()
    try:
        for _ in range(3):                      # served, not held up by each a timeout
            (await core.acquire(A)).release()
        assert store.asked == 1
        assert not replica.ok and "Redis at redis://r:6379" in replica.error
    finally:
        await core.cleanup()


async def test_a_lease_outlives_its_models_last_request_here_by_one_batch():
    facts = MemoryState("facts")
    await facts.view("r1").heartbeat(30)
    store = CountedLeases("r1", facts)
    store.go.set()
    backend = ScriptedBackend({A: 4}, MANAGED)
    backend.loaded.append(A)
    core, replica = replica_core(store, backend)
    await core.start()
    try:
        (await core.acquire(A)).release()       # its first request here: the lease taken
        await replica.beat()
        (await core.acquire(A)).release()       # a request in each batch: the hot path
        await replica.beat()
        (await core.acquire(A)).release()
        assert store.taken == 1 and await facts.leased_by("default", A) == {"r1"}
        await replica.beat()
        await replica.beat()                    # two batches without a request: dropped
        assert await facts.leased_by("default", A) == set()
        (await core.acquire(A)).release()
        assert store.taken == 2
    finally:
        await core.cleanup()


async def test_first_leases_do_not_hurry_the_batch_that_would_drop_others():
    facts = MemoryState("facts")
    store = CountedLeases("r1", facts)
    store.go.set()
    backend = ScriptedBackend({A: 4, B: 4, C: 4}, MANAGED)
    backend.loaded += [A, B, C]
    core, replica = replica_core(store, backend)
    await replica.start()                       # its batches every 10 s
    await core.start()
    try:
        for key in (A, B, C, A, B, C):
            (await core.acquire(key)).release()
            for _ in range(5):                  # the replica's loop runs, were it woken
                await asyncio.sleep(0)
        assert store.taken == 3                 # one first lease each, kept
        assert await facts.leased_by("default", A) == {"r1"}
    finally:
        await core.cleanup()
        await replica.close()
