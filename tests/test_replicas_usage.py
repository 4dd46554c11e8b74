"""The requests one replica serves are heard by the others, who learn them as if asked there:
the leader does not unload as idle, nor a load take as the coldest victim, a model another
replica is asked for; patterns and a preload's use span the fleet (engine/shared_usage.py)."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator

import pytest

from proxy.configload import load_config
from proxy.engine.clock import ManualClock
from proxy.engine.core import EngineCore
from proxy.engine.learning import ModelPattern
from proxy.engine.replica import Replica
from proxy.errors import StateUnavailable
from proxy.engine.shared_usage import ARRIVALS_EVENT, ARRIVALS_MAX, BY_HAND_EVENT, PATTERNS_PER_WRITE
from proxy.observe.relayed import EventRelay
from proxy.state import MemoryState, create_state

from .redis_server import make_redis_server, redis_server  # noqa: F401
from .state_contract import Hub, until
from .test_replicas_contention import MANAGED, GatedBackend, _close

pytestmark = pytest.mark.timeout(30)
A, B, C = "lab/a", "lab/b", "lab/c"
HOUR_S = 3600.0


def _config(**preload: Any):
    return load_config({"memory": {"sampler": "budget", "budget_gb": 8,
                                   "min_free_memory_gb": 0, "max_memory_usage_percent": 100},
                        "preload": preload, "storage": {"enabled": False}})


async def _pair(backend: GatedBackend, clock: ManualClock, stores: tuple[Any, Any] | None = None,
                **preload: Any) -> tuple[EngineCore, EngineCore, list[EventRelay]]:
    """Two replicas' engines on one server and one clock, hearing each other as in the app;
    the first leads. The shared state keeps real time (heartbeats and leases live 30 s), and
    lease batches run when a test calls them (every 10 s otherwise)."""
    if stores is None:
        facts = MemoryState("r1")
        stores = (facts, facts.view("r2"))
    cores, relays = [], []
    for store in stores:
        replica = Replica(store, lease_ttl_s=30, lock_ttl_s=30, unavailable_wait_s=1)
        await replica.start()
        relay = EventRelay(Hub(), store)
        relay.on_remote.append(replica.heard)
        await relay.start()
        relays.append(relay)
        core = EngineCore(_config(**preload), backend, clock=clock,
                          shared=replica.host("default"))
        await core.start()
        cores.append(core)
    assert cores[0].leads and not cores[1].leads
    return cores[0], cores[1], relays


async def _end(cores: tuple[EngineCore, EngineCore], relays: list[EventRelay]) -> None:
    for relay in relays:
        await relay.close()
    await _close(*cores)


@contextlib.asynccontextmanager
async def _fleet(sizes: dict[str, float], stores: tuple[Any, Any] | None = None, **preload: Any
                 ) -> AsyncIterator[tuple[ManualClock, GatedBackend, EngineCore, EngineCore]]:
    """(clock, the server, the leader, the other replica), closed after."""
    clock = ManualClock()
    backend = GatedBackend(sizes, MANAGED)
    one, two, relays = await _pair(backend, clock, stores, **preload)
    try:
        yield clock, backend, one, two
    finally:
        await _end((one, two), relays)


async def _use(core: EngineCore, key: str) -> None:
    (await core.acquire(key)).release()


async def _told(teller: EngineCore, hearer: EngineCore) -> None:
    """The teller's lease batch runs; the hearer has heard every arrival it told."""
    told = teller.ctx.shared.arrivals_told
    await teller.ctx.shared.replica.beat()
    assert teller.ctx.shared.arrivals_told > told
    await until(lambda: _heard(hearer, teller.ctx.shared.arrivals_told))


async def _heard(core: EngineCore, n: int) -> bool:
    return core.ctx.shared.arrivals_heard >= n


async def _leases_lapse(core: EngineCore) -> None:
    """Two batches with no request: a lease outlives its model's last request by one."""
    for _ in range(2):
        await core.ctx.shared.replica.beat()
    assert not core.ctx.shared.renewed


async def test_the_leader_does_not_unload_as_idle_a_model_another_replica_uses():
    async with _fleet({A: 3, B: 3}) as (clock, backend, leader, other):
        await _use(other, A)                                 # loaded there
        await leader.reconcile()
        clock.advance(1.5 * HOUR_S)
        await _use(other, A)                                 # and asked for again there
        await _told(other, leader)
        await _leases_lapse(other)
        clock.advance(0.7 * HOUR_S)                          # 2.2 h after the load
        assert await leader.unload_idle_models() == []       # idle 0.7 h of its 2 h
        assert A in backend.loaded
        clock.advance(1.4 * HOUR_S)
        assert await leader.unload_idle_models() == [A]      # idle 2.1 h: it goes


async def test_a_load_takes_the_model_used_least_lately_by_any_replica_as_its_victim():
    async with _fleet({A: 3, B: 3, C: 3}, enabled=False) as (clock, backend, one, two):
        await _use(two, A)                                   # loaded by the other replica
        await one.reconcile()
        clock.advance(50)
        await _use(one, B)                                   # used here at 50 s
        for _ in range(3):
            clock.advance(80)
            await _use(two, A)                               # there at 130, 210 and 290 s
        await _told(two, one)
        await _leases_lapse(two)
        await until(lambda: _reloads_alike(one, A, B))      # A's load time, as two measured
        await _use(one, C)                                   # needs one of them to go
        assert sorted(backend.loaded) == [A, C]
        assert one.registry.entries[A].last_used_at_s == clock.now()


async def _reloads_alike(core: EngineCore, *keys: str) -> bool:
    return len({core.registry.reload_s(core.registry.entries[k]) for k in keys}) == 1


async def test_among_models_used_moments_ago_the_one_asked_for_most_across_replicas_stays():
    # Both idle under cost-aware's recency floor: their heat decides.
    async with _fleet({A: 3, B: 3, C: 3}, enabled=False) as (clock, backend, one, two):
        await _use(two, A)
        await one.reconcile()
        await _use(one, B)
        for _ in range(4):
            clock.advance(1)
            await _use(two, A)                               # asked for five times there
        await _told(two, one)
        await _leases_lapse(two)
        await until(lambda: _reloads_alike(one, A, B))
        clock.advance(1)
        await _use(one, C)
        assert sorted(backend.loaded) == [A, C]


async def test_what_follows_a_model_on_another_replica_is_learned_here():
    async with _fleet({A: 3, B: 3}) as (clock, backend, one, two):
        for _ in range(6):                                   # planner, then coder: a pipeline
            await _use(two, A)
            clock.advance(5)
            await _use(two, B)
            await _told(two, one)
            clock.advance(300)
        assert one.learner.likely_next(A, 0.6) == [(B, 1.0)]
        assert one.learner.patterns[B].requests == 6
        assert one.learner.patterns[A].last_gap_s == 305
        assert one.ctx.shared.arrivals_heard == 12 and two.ctx.shared.arrivals_heard == 0


async def test_a_preload_another_replica_uses_counts_as_useful_on_the_leader():
    async with _fleet({A: 3}) as (clock, backend, leader, other):
        leader.preloader.queue(A, 1.0, "a test's reason")
        await until(lambda: _preloaded(leader, A))
        await other.reconcile()
        await _use(other, A)
        await _told(other, leader)
        assert (leader.preloads.useful, leader.preloads.wasted) == (1, 0)
        assert not leader.registry.entries[A].preloaded


async def test_a_request_on_another_replica_ends_the_quiet_of_an_unload_by_hand():
    async with _fleet({A: 3}) as (clock, backend, leader, other):
        await _use(leader, A)
        assert await leader.unload(A)
        assert leader.registry.entries[A].unloaded_by_hand_s is not None
        other.ctx.shared.arrived(A, clock.wall() - 1)        # before the unload, told after
        await _told(other, leader)
        assert leader.registry.entries[A].unloaded_by_hand_s is not None
        await _use(other, A)                                 # asked for again, there
        await _told(other, leader)
        assert leader.registry.entries[A].unloaded_by_hand_s is None


async def test_a_model_unloaded_by_hand_on_another_replica_is_kept_unloaded_by_the_leader():
    async with _fleet({A: 3}) as (clock, backend, leader, other):
        await _use(other, A)
        await leader.reconcile()
        assert await other.unload(A)                         # the operator, through the other
        await until(lambda: _kept_unloaded(leader, A))
        assert leader.registry.entries[A].unloaded_by_hand_s == clock.now()
        await asyncio.gather(*leader.ctx.shared._tasks)     # what it told in turn, if anything
        told = [e for e in await leader.ctx.shared.store.events_after(None, count=1000)
                if e.type == BY_HAND_EVENT]
        assert [(e.data["model"], e.data["replica"]) for e in told] == [(A, "r2")]


async def _kept_unloaded(core: EngineCore, key: str) -> bool:
    return core.registry.entries[key].unloaded_by_hand_s is not None


async def _preloaded(core: EngineCore, key: str) -> bool:
    e = core.registry.entries[key]
    return e.status.value == "loaded" and e.preloaded


async def test_past_its_bound_a_batch_tells_each_models_latest_arrival():
    async with _fleet({A: 3, B: 3}) as (clock, backend, one, two):
        shared = two.ctx.shared
        for i in range(ARRIVALS_MAX + 10):                   # the last 522 s, none ahead
            shared.arrived(A, clock.wall() - 530 + i)
        shared.arrived(B, clock.wall())
        await _told(two, one)
        assert shared.arrivals_told == ARRIVALS_MAX + 2 and shared.arrivals_untold == 9
        assert one.learner.patterns[A].requests == ARRIVALS_MAX + 1
        assert one.learner.patterns[B].requests == 1
        view = await one.ctx.shared.replica.view()
        assert view["arrivals"] == {"told": 0, "heard": ARRIVALS_MAX + 2, "untold": 0,
                                     "unlearned": 0}


@pytest.mark.parametrize("data", [
    {"models": [A], "t0_ms": "soon", "at": [[0, 0]]},
    {"models": [A], "t0_ms": 1, "at": [[1, 0]]},              # no such model
    {"models": [A], "t0_ms": 1, "at": [[0, -5]]},
    {"models": [A], "t0_ms": 1, "at": [[0, True]]},
    {"models": [A], "t0_ms": 10 ** 30, "at": [[0, 0]]},
    {"models": [A], "t0_ms": True, "at": [[0, 0]]},
    {"models": "lab/a", "t0_ms": 1, "at": [[0, 0]]},
    {"models": [A], "t0_ms": 1, "at": [[0, 0], [0]]},          # one bad pair spoils the lot
])
async def test_an_arrivals_event_not_as_written_is_ignored(data):
    async with _fleet({A: 3}) as (clock, backend, one, two):
        one.ctx.shared.replica.heard(ARRIVALS_EVENT, {"host": "default", **data})
        assert one.ctx.shared.arrivals_heard == 0 and A not in one.learner.patterns
        await _use(two, A)
        await _told(two, one)                                # the stream goes on
        assert one.learner.patterns[A].requests == 1


async def test_an_arrival_stamped_far_behind_this_replicas_clock_is_not_learned():
    async with _fleet({A: 3}) as (clock, backend, one, two):
        two.ctx.shared.arrived(A, clock.wall() - 3_600)
        two.ctx.shared.arrived(A, clock.wall() - 60)
        await _told(two, one)
        assert one.learner.patterns[A].requests == 1
        assert one.ctx.shared.arrivals_heard == 2
        assert one.ctx.shared.arrivals_unlearned == 1        # /proxy/stats says which


async def test_arrivals_reach_another_replica_through_redis(redis_server):  # noqa: F811
    stores = (create_state(redis_server.url, replica_id="r1"),
              create_state(redis_server.url, replica_id="r2"))
    async with _fleet({A: 3, B: 3}, stores) as (clock, backend, one, two):
        await _use(two, A)
        clock.advance(5)
        await _use(two, B)
        await _told(two, one)
        assert one.learner.follow_probability(A, B) == 1.0
        assert one.learner.patterns[A].last_at_s == clock.now() - 5   # when, not when heard
        assert one.registry.entries[B].last_used_at_s == clock.now()


class CountedWrites:
    """A replica's view of the shared state that counts its writes of usage patterns."""

    def __init__(self, inner: MemoryState) -> None:
        self.inner = inner
        self.written: list[set[str]] = []
        self.refuse = 0            # writes to refuse, as a Redis that is away does

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def put_patterns(self, host: str, patterns: Any, ttl_s: float) -> None:
        if self.refuse:
            self.refuse -= 1
            raise StateUnavailable("shared state unavailable: a test's")
        self.written.append(set(patterns))
        await self.inner.put_patterns(host, patterns, ttl_s)


async def _third(facts: Any, backend: GatedBackend, clock: ManualClock) -> EngineCore:
    """A replica that starts (facts: the shared state, or a view of it as its own)."""
    store = facts.view("r3") if isinstance(facts, MemoryState) else facts
    replica = Replica(store, lease_ttl_s=30, lock_ttl_s=30, unavailable_wait_s=1)
    await replica.start()
    core = EngineCore(_config(), backend, clock=clock, shared=replica.host("default"))
    await core.start()
    return core


async def test_a_replica_that_starts_adopts_the_patterns_the_fleet_learned():
    clock = ManualClock()
    backend = GatedBackend({A: 3, B: 3}, MANAGED)
    facts = MemoryState("r1")
    written, not_leading = CountedWrites(facts), CountedWrites(facts.view("r2"))
    leader, other, relays = await _pair(backend, clock, (written, not_leading))
    new = None
    try:
        for _ in range(4):
            await _use(other, A)
            clock.advance(5)
            await _use(other, B)
            await _told(other, leader)          # the leader writes what changed as it beats
            clock.advance(300)
        await leader.ctx.shared.replica.beat()
        assert written.written == [{A, B}]
        await _use(other, A)
        await _told(other, leader)
        await leader.ctx.shared.replica.beat()
        assert len(written.written) == 1        # once a minute at most
        leader.ctx.shared.patterns_every_s = 0
        await leader.ctx.shared.replica.beat()
        assert written.written[1:] == [{A}]     # what changed since
        await leader.ctx.shared.replica.beat()
        assert len(written.written) == 2        # nothing new: nothing written
        clock.advance(5)
        await _use(other, B)                    # B's request, and A's follower
        await _told(other, leader)
        await leader.ctx.shared.replica.beat()
        assert written.written[2:] == [{A, B}]
        assert not_leading.written == []        # the leader writes them
        new = await _third(facts, backend, clock)
        assert new.ctx.shared.patterns_adopted == 2
        assert new.learner.likely_next(A, 0.6) == [(B, 1.0)]
        assert new.learner.patterns[A].requests == 5
        assert new.learner.patterns[A].last_at_s == leader.learner.patterns[A].last_at_s
        assert new.learner.dirty == {A, B}      # and kept in its own history
    finally:
        await _end((leader, other), relays)
        if new is not None:
            await _close(new)


async def test_the_leader_writes_what_it_learned_as_it_stops():
    clock = ManualClock()
    backend = GatedBackend({A: 3}, MANAGED)
    facts = MemoryState("r1")
    leader, other, relays = await _pair(backend, clock, (facts, facts.view("r2")))
    try:
        await _use(leader, A)
        await leader.ctx.shared.replica.beat()
        clock.advance(10)
        await _use(leader, A)
        assert (await facts.patterns("default"))[A]["requests"] == 1
    finally:
        await _end((leader, other), relays)
    assert (await facts.patterns("default"))[A]["requests"] == 2


async def test_a_pattern_from_the_replicas_own_history_gives_way_only_to_a_later_one():
    clock = ManualClock()
    backend = GatedBackend({A: 3, B: 3}, MANAGED)
    facts = MemoryState("r1")
    new = await _third(facts, backend, clock)
    try:
        for key, at_s in ((A, 100.0), (B, 200.0)):           # what the fleet learned
            fleet = ModelPattern()
            fleet.observe(clock.now() - at_s, clock.wall() - at_s)
            await facts.put_patterns("default", {key: fleet.snapshot(clock.now(), clock.wall())},
                                     ttl_s=60)
        for key in (A, B):                                    # its own, from its history
            new.learner.patterns[key] = own = ModelPattern()
            own.observe(clock.now() - 150, clock.wall() - 150)
            own.observe(clock.now() - 149, clock.wall() - 149)
        await new.ctx.shared.adopt_patterns()
        assert new.learner.patterns[A].requests == 1         # the fleet's: later
        assert new.learner.patterns[B].requests == 2         # its own: later than the fleet's
    finally:
        await _close(new)


async def test_patterns_adopted_and_not_learned_since_are_not_written_back():
    clock = ManualClock()
    backend = GatedBackend({A: 3}, MANAGED)
    facts = MemoryState("r0")
    fleet = ModelPattern()
    fleet.observe(clock.now() - 10, clock.wall() - 10)
    await facts.put_patterns("default", {A: fleet.snapshot(clock.now(), clock.wall())}, ttl_s=60)
    written = CountedWrites(facts.view("r3"))
    alone = await _third(written, backend, clock)        # the leader: alone
    try:
        assert alone.leads and alone.ctx.shared.patterns_adopted == 1
        await alone.ctx.shared.replica.beat()
        assert written.written == []
    finally:
        await _close(alone)


async def test_many_changed_patterns_are_written_a_batch_at_each_beat():
    clock = ManualClock()
    backend = GatedBackend({A: 3}, MANAGED)
    facts = MemoryState("r0")
    written = CountedWrites(facts.view("r3"))
    alone = await _third(written, backend, clock)
    try:
        keys = [f"lab/m{i:02d}" for i in range(PATTERNS_PER_WRITE + 8)]
        for key in keys:
            alone.learner.observe(key, clock.now(), clock.wall())
        written.refuse = 1
        await alone.ctx.shared.replica.beat()     # Redis away: nothing written, nothing lost
        await alone.ctx.shared.replica.beat()
        await alone.ctx.shared.replica.beat()     # within the minute: the rest of them
        assert [len(w) for w in written.written] == [PATTERNS_PER_WRITE, 8]
        assert set().union(*written.written) == set(keys)
        await alone.ctx.shared.replica.beat()
        assert len(written.written) == 2
        for key in keys:                          # learned again, and the replica stops
            alone.learner.observe(key, clock.now() + 1, clock.wall() + 1)
    finally:
        await _close(alone)
    assert [len(w) for w in written.written[2:]] == [len(keys)]    # all at once
