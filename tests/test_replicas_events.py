"""Where a replica starts reading the replicas' event stream: at the stream's own newest id, so
that no replica's clock decides what it misses or replays (observe/relayed.py)."""
from __future__ import annotations

import logging
import time
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from proxy.errors import StateUnavailable
from proxy.observe.relayed import EventRelay
from proxy.state import MemoryState

from .redis_server import make_redis_server, redis_server  # noqa: F401
from .state_contract import Fleet, Hub, until

pytestmark = pytest.mark.timeout(30)


async def relayed_after_start(a, b) -> list[dict]:  # noqa: ANN001 - StateStores
    """B's relay starts after A appended 'before'; A then appends 'after': what B shows."""
    hub = Hub()
    relay = EventRelay(hub, b)
    await relay.start()
    try:
        await a.append_event("load", {"model": "after", "replica": "a"})

        async def arrived() -> bool:
            return any(d["model"] == "after" for _, d in hub.seen)
        await until(arrived)
        return [d for _, d in hub.seen]
    finally:
        await relay.close()


async def test_a_starting_replica_reads_from_the_streams_last_id():
    a = MemoryState("a")          # its ids ("0-n") have nothing to do with any clock
    await a.append_event("load", {"model": "before", "replica": "a"})
    seen = await relayed_after_start(a, a.view("b"))
    assert [d["model"] for d in seen] == ["after"]



class AwayAtFirst:
    """A StateStore whose first question, the stream's newest id, finds it unreachable."""

    def __init__(self, inner: MemoryState) -> None:
        self.inner = inner
        self.asked = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def last_event_id(self) -> str:
        self.asked += 1
        if self.asked == 1:
            raise StateUnavailable("shared state unavailable: Redis at redis://r:6379 failed")
        return await self.inner.last_event_id()


async def test_a_replica_starting_while_the_state_is_away_still_replays_nothing():
    a = MemoryState("a")
    await a.append_event("load", {"model": "before", "replica": "a"})
    b = AwayAtFirst(a.view("b"))
    hub = Hub()
    relay = EventRelay(hub, b)
    await relay.start()
    try:
        await until(lambda: _asked_again(b))    # its reader asks once the state answers
        await a.append_event("load", {"model": "after", "replica": "a"})

        async def arrived() -> bool:
            return any(d["model"] == "after" for _, d in hub.seen)
        await until(arrived)
        assert [d["model"] for _, d in hub.seen] == ["after"]
    finally:
        await relay.close()


async def _asked_again(store: AwayAtFirst) -> bool:
    return store.asked >= 2

async def test_a_redis_clock_ahead_of_the_replicas_replays_nothing(redis_server):
    fleet = Fleet("redis", redis_server.url)
    a, b = fleet.replica("a"), fleet.replica("b")
    raw = aioredis.from_url(redis_server.url, decode_responses=True)
    try:
        # An event stamped by a Redis whose clock runs an hour ahead of this machine's.
        ahead_ms = int(time.time() * 1000) + 3_600_000
        await raw.xadd(fleet.prefix + "events", {"type": "load", "data": orjson.dumps(
            {"model": "before", "replica": "a"})}, id=f"{ahead_ms}-0")
        seen = await relayed_after_start(a, b)
        assert [d["model"] for d in seen] == ["after"]
    finally:
        await raw.aclose()
        await fleet.close()


async def test_entries_something_else_wrote_on_the_stream_are_gone_past(redis_server, caplog):
    """A hand or a peer of another version writes what no replica wrote: each such entry is
    skipped (said once), and the events after it still arrive."""
    fleet = Fleet("redis", redis_server.url)
    a, b = fleet.replica("a"), fleet.replica("b")
    raw = aioredis.from_url(redis_server.url)       # bytes: one entry is not UTF-8
    hub = Hub()
    relay = EventRelay(hub, b)
    await relay.start()
    caplog.set_level(logging.DEBUG, logger="proxy.events")   # whatever level an app left
    try:
        stream = fleet.prefix + "events"
        for fields in ({"type": "load", "data": "notjson{"}, {"type": "load", "data": "[1, 2]"},
                       {"data": orjson.dumps({"model": "x"})}, {"type": "load", "data": b"\xff"},
                       {"type": "load"}):
            await raw.xadd(stream, fields)
        await a.append_event("load", {"model": "after", "replica": "a"})

        async def arrived() -> bool:
            return any(d.get("model") == "after" for _, d in hub.seen)
        await until(arrived)
        assert [d["model"] for _, d in hub.seen] == ["after"]
        assert relay.unreadable == 5
        said = [r for r in caplog.records if "cannot read" in r.getMessage()]
        assert [r.levelname for r in said] == ["WARNING"] + ["DEBUG"] * len(said[1:])
    finally:
        await relay.close()
        await raw.aclose()
        await fleet.close()
