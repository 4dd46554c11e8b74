"""What another writer leaves where the replicas share usage (engine/shared_usage.py): pattern
snapshots and arrivals not as a replica writes them, and a peer whose clock runs ahead. No
replica fails on them, and none learns them."""
from __future__ import annotations

from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from proxy.engine.clock import ManualClock
from proxy.engine.learner import MAX_FOLLOWERS
from proxy.engine.learning import ModelPattern
from proxy.engine.shared_usage import ARRIVALS_EVENT, ARRIVALS_MAX, LATEST_MAX
from proxy.engine.usage import RequestRecord
from proxy.errors import StateUnavailable
from proxy.state import MemoryState, create_state

from .redis_server import make_redis_server, redis_server  # noqa: F401
from .test_replicas_contention import MANAGED, GatedBackend, _close
from .test_replicas_usage import A, B, C, _end, _fleet, _pair, _third, _told, _use

pytestmark = pytest.mark.timeout(30)


async def test_a_replica_starts_past_pattern_snapshots_it_cannot_use(redis_server):  # noqa: F811
    clock = ManualClock()
    backend = GatedBackend({A: 3, B: 3, C: 3}, MANAGED)
    good = ModelPattern()
    good.observe(clock.now() - 10, clock.wall() - 10)
    snapshot = good.snapshot(clock.now(), clock.wall())
    raw = aioredis.from_url(redis_server.url)
    await raw.hset("lmproxy:patterns:default", mapping={
        A: orjson.dumps(snapshot),
        B: b"notjson{",                                          # not JSON
        "lab/list": b"[1, 2]",                                   # not an object
        "lab/huge": orjson.dumps({**snapshot, "pad": "x" * 100_000}),
        C: orjson.dumps({**snapshot, "gaps": [-5] * len(snapshot["gaps"])}),
        "lab/followers": orjson.dumps(
            {**snapshot, "followers": {f"m{i}": 1 for i in range(MAX_FOLLOWERS + 1)}}),
        "lab/types": orjson.dumps({**snapshot, "requests": "many"}),
        "lab/ahead": orjson.dumps({**snapshot, "minutes_since_wall_s": clock.wall() + 86_400}),
    })
    await raw.aclose()
    new = await _third(create_state(redis_server.url, replica_id="r3"), backend, clock)
    try:
        shared = new.ctx.shared
        assert set(new.learner.patterns) == {A, "lab/ahead"}
        assert shared.patterns_adopted == 2 and shared.patterns_refused == 3
        assert new.learner.patterns["lab/ahead"].minutes_since_wall_s == clock.wall()
    finally:
        await _close(new)


@pytest.mark.parametrize("n_at, n_models", [(ARRIVALS_MAX + LATEST_MAX + 1, 1), (1, 3)])
async def test_an_arrivals_event_larger_than_a_replica_writes_is_not_learned(n_at, n_models):
    """A batch tells at most ARRIVALS_MAX arrivals and LATEST_MAX models' latest, each model
    at least once: a larger event (a flood a peer wrote by hand) is ignored whole."""
    async with _fleet({A: 3}) as (clock, backend, one, two):
        one.ctx.shared.replica.heard(ARRIVALS_EVENT, {
            "host": "default", "models": [A] + [f"lab/x{i}" for i in range(n_models - 1)],
            "t0_ms": round(clock.wall() * 1000), "at": [[0, i] for i in range(n_at)]})
        assert one.ctx.shared.arrivals_heard == 0 and A not in one.learner.patterns


async def test_a_batch_past_both_bounds_is_still_one_the_others_learn():
    async with _fleet({A: 3}) as (clock, backend, one, two):
        shared = two.ctx.shared
        for _ in range(ARRIVALS_MAX):
            shared.arrived(A, clock.wall() - 1)
        for i in range(LATEST_MAX + 5):                 # a fleet of many models, all asked for
            shared.arrived(f"lab/m{i}", clock.wall())
        await _told(two, one)
        assert shared.arrivals_told == ARRIVALS_MAX + LATEST_MAX
        assert shared.arrivals_untold == 5
        assert one.learner.patterns[A].requests == ARRIVALS_MAX


async def test_arrivals_told_by_a_replica_whose_clock_runs_ahead_keep_their_gaps():
    async with _fleet({A: 3}) as (clock, backend, one, two):
        ahead_ms = round(clock.wall() * 1000) + 90_000      # its clock 90 s ahead of this one
        one.ctx.shared.replica.heard(ARRIVALS_EVENT, {
            "host": "default", "models": [A], "t0_ms": ahead_ms - 20_000,
            "at": [[0, 0], [0, 10_000], [0, 20_000]]})
        p = one.learner.patterns[A]
        assert p.requests == 3 and p.gaps.total == 2
        assert p.last_gap_s == 10.0 and p.last_at_s == clock.now()     # not a burst at now
        assert p.first_wall_s == clock.wall() - 20 and p.minutes_since_wall_s <= clock.wall()


async def test_a_models_last_use_is_its_last_request_on_any_replica():
    async with _fleet({A: 3}) as (clock, backend, one, two):
        await _use(one, A)                                   # asked here once
        one.record(RequestRecord(model=A, ok=True, latency_s=0.1, at_s=clock.now()))
        clock.advance(600)
        await _use(two, A)                                   # and there, 10 minutes later
        await _told(two, one)
        clock.advance(5)
        assert one.row(A)["last_used_s_ago"] == 5.0
        assert one.row(A)["requests"] == 1             # its own statistics stay its own


class AwayForViews:
    """A replica's view of the shared state that cannot be reached for /proxy/stats's view."""

    def __init__(self, inner: MemoryState) -> None:
        self.inner = inner
        self.away = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def replicas(self) -> list[str]:
        if self.away:
            raise StateUnavailable("shared state unavailable: a test's")
        return await self.inner.replicas()


async def test_the_arrivals_counts_show_while_the_state_is_away():
    clock = ManualClock()
    backend = GatedBackend({A: 3}, MANAGED)
    facts = MemoryState("r1")
    store = AwayForViews(facts)
    one, two, relays = await _pair(backend, clock, (store, facts.view("r2")))
    try:
        await _use(two, A)
        await _told(two, one)
        await _use(one, A)
        store.away = True
        view = await one.ctx.shared.replica.view()
        assert view["ok"] is False and "a test's" in view["error"]
        assert view["arrivals"] == {"told": 0, "heard": 1, "untold": 0,
                                     "unlearned": 0}
        assert view["leases_given_up"] == 0
    finally:
        store.away = False
        await _end((one, two), relays)
