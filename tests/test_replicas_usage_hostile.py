"""What another writer leaves where the replicas share usage (engine/shared_usage.py): pattern
snapshots and arrivals not as a replica writes them, and a peer whose clock runs ahead. No
replica fails on them, and none learns them."""
from __future__ import annotations

import orjson
import pytest
import redis.asyncio as aioredis

from proxy.engine.clock import ManualClock
from proxy.engine.learner import MAX_FOLLOWERS
from proxy.engine.learning import ModelPattern
from proxy.state import create_state

from .redis_server import make_redis_server, redis_server  # noqa: F401
from .test_replicas_contention import MANAGED, GatedBackend, _close
from .test_replicas_usage import A, B, C, _third

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
