"""What only RedisState has: a server that can go away and come back, round trips, and keys
that must not pile up. Against a real redis-server."""
from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis

from proxy.errors import StateUnavailable
from proxy.state import HostRecord, MemoryState, create_state
from proxy.state.redis import RedisState

from .redis_server import make_redis_server, redis_server  # noqa: F401
from .state_contract import TTL_S, Fleet, until

GB = 1024 ** 3
LONG_S = 60.0


@pytest.fixture
async def fleet(redis_server):
    f = Fleet("redis", redis_server.url)
    yield f
    await f.close()


@pytest.fixture
async def raw(redis_server):
    client = aioredis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


def calls(store: RedisState) -> dict:
    return {
        "heartbeat": lambda: store.heartbeat(LONG_S),
        "acquire_lock": lambda: store.acquire_lock("h1", "m", LONG_S),
        "check_fence": lambda: store.check_fence("h1", "m", 1),
        "reserve": lambda: store.reserve("h1", "x", GB, 10 * GB, LONG_S),
        "renew_leases": lambda: store.renew_leases([("h1", "m")], LONG_S),
        "leased_by": lambda: store.leased_by("h1", "m"),
        "take_lease": lambda: store.take_lease("h1", "m", LONG_S),
        "claim_unload": lambda: store.claim_unload("h1", "m", LONG_S),
        "want_unload": lambda: store.want_unload("h1", ["m"], LONG_S),
        "wanted_by": lambda: store.wanted_by("h1", "m"),
        "put_learned": lambda: store.put_learned("h1", "m", load_s=1.0, ttl_s=LONG_S),
        "learned": lambda: store.learned("h1"),
        "put_patterns": lambda: store.put_patterns("h1", {"m": {}}, LONG_S),
        "patterns": lambda: store.patterns("h1"),
        "last_event_id": store.last_event_id,
        "owned": lambda: store.owned("h1"),
        "campaign": lambda: store.campaign(LONG_S),
        "append_event": lambda: store.append_event("state", {}),
        "events_after": lambda: store.events_after(None),
        "put_host": lambda: store.put_host("h1", HostRecord(), LONG_S),
        "ping": store.ping,
    }


async def test_a_stopped_redis_is_state_unavailable_naming_its_redacted_url(make_redis_server):
    server = make_redis_server("--requirepass", "s3cret")
    url = f"redis://:s3cret@127.0.0.1:{server.port}/0"
    store = RedisState(url, "a")
    await store.ping()
    server.stop()
    try:
        for name, call in calls(store).items():
            started_s = time.monotonic()
            with pytest.raises(StateUnavailable) as raised:
                await call()
            assert time.monotonic() - started_s < 2.0, name     # no long client backoff
            e = raised.value
            assert f"Redis at redis://***@127.0.0.1:{server.port}/0" in e.message, name
            assert "s3cret" not in e.message
            assert e.status == 503 and e.body()["error"]["code"] == "state_unavailable"
            assert e.headers() == {"Retry-After": "1"}
    finally:
        await store.close()


async def test_a_hung_redis_fails_within_one_timeout(redis_server):
    store = RedisState(redis_server.url, "a", timeout_s=0.3)
    await store.heartbeat(LONG_S)
    redis_server.pause()
    try:
        started_s = time.monotonic()
        with pytest.raises(StateUnavailable, match="TimeoutError"):
            await store.acquire_lock("h1", "m", LONG_S)
        assert time.monotonic() - started_s < 1.5       # one timeout, no retries
    finally:
        redis_server.resume()
    assert await store.acquire_lock("h1", "m2", LONG_S) is not None
    await store.close()


async def test_everything_works_again_after_redis_restarts(redis_server, fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    before = await a.acquire_lock("h1", "m", LONG_S)
    await a.heartbeat(LONG_S)
    redis_server.stop()
    with pytest.raises(StateUnavailable):
        await b.acquire_lock("h1", "m2", LONG_S)
    redis_server.start()                # empty: Redis came back without its data
    await a.heartbeat(LONG_S)
    await b.heartbeat(LONG_S)
    after = await b.acquire_lock("h1", "m", LONG_S)
    assert after is not None and after.token > before.token     # fencing still increases
    assert not await before.valid() and await after.valid()
    assert (await a.reserve("h1", "x", GB, 2 * GB, LONG_S)).granted
    await a.renew_leases([("h1", "m")], LONG_S)
    assert await b.leased_by("h1", "m") == {"a"}
    assert await a.campaign(LONG_S)
    event_id = await a.append_event("state", {"up": True})
    assert [e.id for e in await b.events_after(None)] == [event_id]


async def test_lease_renewal_of_many_models_is_one_round_trip(fleet, raw):
    a = fleet.replica("a")
    leases = [("h1", f"m{i}") for i in range(50)]
    await a.heartbeat(LONG_S)
    await a.renew_leases(leases[:1], LONG_S)        # the script is loaded: EVALSHA from now
    async with raw.monitor() as monitor:
        await a.renew_leases(leases, LONG_S)
        await a.ping()                              # marks the end of what was sent
        sent = []
        while not sent or sent[-1] != "PING":
            seen = await monitor.next_command()
            if seen["client_type"] != "lua":        # commands a script ran are not sent
                sent.append(seen["command"].split()[0])
    assert sent == ["EVALSHA", "PING"]
    assert await fleet.replica("b").leased_by("h1", "m49") == {"a"}


async def test_every_key_has_a_ttl_and_the_key_count_returns_to_flat(fleet, raw):
    a = fleet.replica("a")
    for i in range(20):                 # a workload over many hosts and models
        host, model = f"h{i % 4}", f"m{i}"
        await a.heartbeat(TTL_S)
        await a.put_host(host, HostRecord(reported_by="a"), TTL_S)
        lock = await a.acquire_lock(host, model, TTL_S)
        await a.reserve(host, model, GB, 100 * GB, TTL_S)
        await a.renew_leases([(host, model)], TTL_S)
        await a.take_lease(host, f"taken-{model}", TTL_S)
        await a.claim_unload(host, f"other-{model}", TTL_S)
        await a.put_learned(host, model, footprint_bytes=GB, load_s=2.0, ttl_s=TTL_S)
        await a.add_owned(host, f"inst-{i}", model, fence=lock.token)
        await a.campaign(TTL_S)
        await a.append_event("load", {"model": model})
    keys = [k async for k in raw.scan_iter(match=fleet.prefix + "*")]
    ttls = {k: await raw.pttl(k) for k in keys}
    assert ttls and all(ms > 0 for ms in ttls.values()), ttls
    long_lived = {fleet.prefix + k for k in ("fence", "events", "owned:h0", "owned:h1",
                                             "owned:h2", "owned:h3")}

    async def flat() -> bool:
        return {k async for k in raw.scan_iter(match=fleet.prefix + "*")} == long_lived
    await until(flat)


async def test_names_with_separators_stay_apart(fleet):
    a = fleet.replica("a")
    assert await a.acquire_lock("h:1", "m", LONG_S) is not None
    assert await a.acquire_lock("h", "1:m", LONG_S) is not None
    await a.heartbeat(LONG_S)
    assert (await a.reserve("h", "k|x", GB, GB, LONG_S)).granted
    assert await a.reserved_bytes("h") == GB


async def test_create_state_picks_the_implementation_by_url(redis_server):
    assert isinstance(create_state(None, replica_id="a"), MemoryState)
    store = create_state(redis_server.url, replica_id="a", prefix="x:")
    assert isinstance(store, RedisState) and store.prefix == "x:"
    await store.ping()
    await store.close()
    assert create_state(None).replica_id != create_state(None).replica_id
    with pytest.raises(ValueError, match="redis://"):
        create_state("http://127.0.0.1:6379")


async def test_a_burst_of_calls_shares_a_bounded_pool_of_connections(redis_server, raw):
    from proxy.state.redis import MAX_CONNECTIONS
    import asyncio
    store = create_state(redis_server.url, replica_id="burst")
    try:
        await store.heartbeat(LONG_S)
        await asyncio.gather(*(store.reserve("h1", f"m{i}", GB, 100 * GB, LONG_S)
                               for i in range(50)))
        clients = [c for c in await raw.client_list() if c.get("name") != "raw"]
        # This test's own client is one of them; the burst did not open one per call.
        assert len(clients) - 1 <= MAX_CONNECTIONS and len(clients) - 1 < 50
        assert await store.reserved_bytes("h1") == 50 * GB
    finally:
        await store.close()


async def test_a_cancel_as_a_blocking_read_starts_ends_the_read(fleet):
    """A cancel that reaches redis-py as it sends an XREAD BLOCK: redis-py still reads the
    reply (empty, after the block) and returns it; the store raises the cancel, so a reader
    that loops on its reads stops instead of reading on, cancelled, forever."""
    import asyncio
    store = fleet.replica("a")
    last = await store.append_event("load", {"model": "m"})
    sending = asyncio.Event()
    xread = store.client.xread

    async def signalled_xread(*args, **kwargs):   # the moment the blocking read is sent
        sending.set()
        return await xread(*args, **kwargs)
    store.client.xread = signalled_xread

    async def reader() -> None:
        while True:
            await store.events_after(last, wait_s=1.0)
    task = asyncio.ensure_future(reader())
    await sending.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5.0)


async def test_calls_in_a_cancelled_tasks_cleanup_all_run(fleet):
    """A task cancelled before a call (its cleanup: releasing a lock, then a reservation) is
    not cancelled again by that call: only a cancel the call itself swallowed is raised."""
    import asyncio
    store = fleet.replica("a")
    started = asyncio.Event()

    async def work() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            await store.heartbeat(60.0)
            await store.renew_leases([("h", "m")], 60.0)
    task = asyncio.ensure_future(work())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5.0)
    assert await store.leased_by("h", "m") == {"a"}
