"""Proxy replicas sharing one real Redis (state.backend: redis) while that Redis misbehaves
short of dying: it refuses writes (maxmemory under noeviction), it freezes, it asks for a
password nobody gave. What the replicas show, say and answer meanwhile."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy.configload import load_config
from proxy.server.keys import EVENTS, REPLICA

from .redis_server import make_redis_server, redis_server  # noqa: F401
from .test_replicas import CATALOG, MID, OTHER, _empty, chat, until, until_async

pytestmark = pytest.mark.timeout(60)
AWAY_WAIT_S = 1.0          # state.unavailable_wait_s


def config(url: str, redis_url: str, name: str, *, budget_gb: float = 7,
           lease_ttl_s: float = 1.5, lock_ttl_s: float = 2.0, **extra: Any) -> Any:
    """One host with room for one 5 GB model: the second needs an eviction."""
    return load_config({
        "upstreams": [{"name": "x", "url": url, "budget_gb": budget_gb}],
        "state": {"backend": "redis", "url": redis_url, "replica_id": name,
                  "lease_ttl_s": lease_ttl_s, "lock_ttl_s": lock_ttl_s,
                  "unavailable_wait_s": AWAY_WAIT_S, "timeout_s": 0.5},
        "memory": {"min_free_memory_gb": 0, "max_memory_usage_percent": 100},
        "eviction": {"hold": 0, "queue_timeout_s": 40},
        "upstream": {"reconcile_interval_s": 3600},
        "storage": {"enabled": False}, **extra})


async def config_set(redis_url: str, name: str, value: str) -> None:
    client = aioredis.from_url(redis_url)
    try:
        await client.config_set(name, value)
    finally:
        await client.aclose()


async def test_a_redis_refusing_writes_shows_as_unavailable_and_says_what_to_do(
        make_emulator, make_proxy, make_redis_server, http):
    server = make_redis_server("--maxmemory-policy", "noeviction")
    emu = await make_emulator(catalog=CATALOG)
    a = await make_proxy("", config=config(emu.url, server.url, "A"))
    replica = a.app[REPLICA]
    assert replica.ok
    await config_set(server.url, "maxmemory", "1")       # every write refused: OOM
    await until(lambda: not replica.ok)                   # the heartbeat itself is refused
    assert "maxmemory" in replica.error and "Raise maxmemory" in replica.error
    async with http.get(f"{a.url}/readyz") as r:
        ready = await r.json()
    assert ready["degraded"] is True and "maxmemory" in ready["state"]["error"]
    await config_set(server.url, "maxmemory", "0")
    await until(lambda: replica.ok)


async def test_a_load_that_needs_an_eviction_while_redis_is_frozen_is_refused_in_time(
        make_emulator, make_proxy, redis_server, http):
    emu = await make_emulator(catalog=CATALOG)
    # A heartbeat every 10 s: the eviction's own failure must tell that Redis is away.
    a = await make_proxy("", config=config(emu.url, redis_server.url, "A", lease_ttl_s=30,
                                           lock_ttl_s=12))
    assert (await chat(http, a, MID))[0] == 200
    redis_server.pause()
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        status, body, _ = await chat(http, a, OTHER)     # MID must go first: it cannot
    finally:
        redis_server.resume()
    waited_s = loop.time() - started
    assert status == 503, body
    assert body["error"]["code"] == "state_unavailable", body
    assert "redis://127.0.0.1" in body["error"]["message"] and OTHER in body["error"]["message"]
    assert waited_s < AWAY_WAIT_S + 5                   # not eviction.queue_timeout_s (40 s)
    await until(lambda: a.app[REPLICA].ok, 15)
    assert (await chat(http, a, OTHER))[0] == 200       # evicts once Redis answers
    assert emu.state.unload_calls[MID] == 1


@pytest.mark.parametrize("url_password, hint", [
    ("", "Redis requires a password: give it in state.url"),
    (":wrong@", "the password (or user) in state.url is not the one Redis has"),
])
async def test_a_redis_password_missing_or_wrong_is_named_with_what_to_do(
        make_emulator, make_proxy, make_redis_server, url_password, hint):
    server = make_redis_server("--requirepass", "s3cret")
    emu = await make_emulator(catalog=CATALOG)
    url = server.url.replace("redis://", "redis://" + url_password)
    a = await make_proxy("", config=config(emu.url, url, "A"))
    replica = a.app[REPLICA]
    await until(lambda: not replica.ok)
    assert hint in replica.error
    assert ":wrong@" not in replica.error                 # the URL's password stays hidden


async def errors_of(client: Any, kind: str) -> int:
    stats = await client.info("errorstats")
    return int(stats.get(f"errorstat_{kind}", {}).get("count", 0))


async def more_than(count: Any, than: int) -> bool:
    return await count > than


async def test_a_reservation_whose_release_redis_refused_is_released_when_it_answers(
        make_emulator, make_proxy, redis_server, http, monkeypatch):
    monkeypatch.setattr("proxy.engine.shared_load.RESERVATION_GRACE_S", 0.0)   # released at once
    emu = await make_emulator(catalog=CATALOG)
    a = await make_proxy("", config=config(emu.url, redis_server.url, "A"))
    store = a.app[REPLICA].store
    client = aioredis.from_url(redis_server.url)
    try:
        await client.acl_setuser("default", enabled=True, nopass=True, commands=["-hdel"])
        refused = await errors_of(client, "NOPERM")
        assert (await chat(http, a, MID))[0] == 200
        # The release of MID's reservation was refused (as by a Redis away a moment).
        await until_async(lambda: more_than(errors_of(client, "NOPERM"), refused), 10)
        await client.acl_setuser("default", enabled=True, nopass=True, commands=["+@all"])
        # Released once Redis takes it, not when the reservation lapses (the load's 600 s).
        await until_async(lambda: _empty(store.reserved_bytes("x")), 5)
    finally:
        await client.aclose()
    status, body, _ = await chat(http, a, OTHER)         # MID evicted: OTHER's room is free
    assert status == 200, body


def entry(proxy: Any, key: str) -> Any:
    return proxy.engine.host("x").core.registry.entries.get(key)


async def test_a_replica_that_joined_anothers_load_counts_the_copy_as_the_proxys_at_once(
        make_emulator, make_proxy, redis_server, http):
    emu = await make_emulator(catalog=CATALOG)
    a = await make_proxy("", config=config(emu.url, redis_server.url, "A"))
    b = await make_proxy("", config=config(emu.url, redis_server.url, "B"))
    gate = emu.state.faults.load_gate[MID] = asyncio.Event()
    owner_when_loaded: list[str | None] = []
    loop = asyncio.get_running_loop()

    def on_state(model: str, old: str, new: str) -> None:   # the owner is set in that step
        if model == MID and new == "loaded":
            loop.call_soon(lambda: owner_when_loaded.append(entry(b, MID).owner))
    b.engine.host("x").core.add_listener(type("Seen", (), {
        "on_state": lambda self, *args: on_state(*args)})())
    from_a = asyncio.ensure_future(chat(http, a, MID))
    await until(lambda: emu.state.load_calls[MID] == 1)      # A holds the load lock
    from_b = asyncio.ensure_future(chat(http, b, MID))
    await until(lambda: entry(b, MID).status.value == "loading")   # B waits for A's load
    gate.set()
    assert [s for s, _, _ in await asyncio.gather(from_a, from_b)] == [200, 200]
    # Not "loaded outside the proxy" until a reconcile says otherwise: B may evict it now
    # (a load needing its memory was refused as "not ours" meanwhile).
    assert owner_when_loaded == ["proxy"]
    status, body, _ = await chat(http, b, OTHER)
    assert status == 200, body
    assert emu.state.load_calls[MID] == 1


async def load_counts(http: Any, proxy: Any, model: str) -> list[str]:
    async with http.get(f"{proxy.url}/metrics") as r:
        return [line for line in (await r.text()).splitlines()
                if line.startswith("proxy_model_loads_total{") and f'"{model}"' in line]


async def test_one_load_joined_by_another_replica_is_counted_once_across_the_replicas(
        make_emulator, make_proxy, redis_server, http):
    emu = await make_emulator(catalog=CATALOG)
    a = await make_proxy("", config=config(emu.url, redis_server.url, "A"))
    b = await make_proxy("", config=config(emu.url, redis_server.url, "B"))
    seen_on_b: list[tuple[str, dict]] = []               # B's event stream, A's relayed too
    b.app[EVENTS].on_publish.append(lambda kind, data: seen_on_b.append((kind, data)))
    gate = emu.state.faults.load_gate[MID] = asyncio.Event()
    from_a = asyncio.ensure_future(chat(http, a, MID))
    await until(lambda: emu.state.load_calls[MID] == 1)
    from_b = asyncio.ensure_future(chat(http, b, MID))
    await until(lambda: entry(b, MID).status.value == "loading")   # B waits for A's load
    gate.set()
    assert [s for s, _, _ in await asyncio.gather(from_a, from_b)] == [200, 200]
    [on_a] = await load_counts(http, a, MID)
    assert on_a.endswith(" 1.0")
    assert await load_counts(http, b, MID) == []          # B waited; A loaded
    await until(lambda: ("load", "A") in [(t, d.get("replica")) for t, d in seen_on_b])
    assert [d.get("replica") for t, d in seen_on_b if t == "load"] == ["A"]   # none of B's


async def mid_loaded_by_a(make_emulator, make_proxy, redis_server, http, caplog):
    """Replicas A and B on one emulator; A has loaded MID and B has heard of it (no lease)."""
    caplog.set_level(logging.INFO, logger="proxy.engine")
    emu = await make_emulator(catalog=CATALOG)
    a = await make_proxy("", config=config(emu.url, redis_server.url, "A"))
    b = await make_proxy("", config=config(emu.url, redis_server.url, "B"))
    assert (await chat(http, a, MID))[0] == 200
    await until(lambda: entry(b, MID).owner == "proxy")
    return emu, a, b


async def test_a_request_that_met_another_replicas_unload_names_that_replica_not_the_server(
        make_emulator, make_proxy, redis_server, http, caplog):
    emu, a, b = await mid_loaded_by_a(make_emulator, make_proxy, redis_server, http, caplog)
    # A claims MID for its unload, as its eviction does; B's request meets the claim.
    store_a = a.app[REPLICA].store
    assert await store_a.claim_unload("x", MID, 10.0) == set()
    from_b = asyncio.ensure_future(chat(http, b, MID))
    await until(lambda: entry(b, MID).leases == 1)          # waiting on A's claim
    await emu.state.unload(MID)                # the unload ends before its event could tell
    await store_a.release_unload("x", MID)
    status, body, _ = await from_b
    assert status == 200, body                                # B loaded it again
    gone = [r.getMessage() for r in caplog.records
            if r.name.startswith("proxy.engine") and "was unloaded" in r.getMessage()
            and f"{MID} was unloaded" in r.getMessage()]
    assert gone and all(g.endswith("was unloaded by replica A") for g in gone), gone
    assert entry(b, MID).evictions["backend"] == 0            # not the server's eviction


async def test_an_unload_claim_given_up_leaves_no_name_for_a_later_unload(
        make_emulator, make_proxy, redis_server, http, caplog):
    emu, a, b = await mid_loaded_by_a(make_emulator, make_proxy, redis_server, http, caplog)
    store_a = a.app[REPLICA].store
    assert await store_a.claim_unload("x", MID, 10.0) == set()
    from_b = asyncio.ensure_future(chat(http, b, MID))
    await until(lambda: entry(b, MID).leases == 1)
    await store_a.release_unload("x", MID)       # A gave its eviction up: MID stays
    assert (await from_b)[0] == 200
    await emu.state.unload(MID)                  # later, the server's own eviction
    await b.engine.reconcile()
    gone = [r.getMessage() for r in caplog.records
            if r.name.startswith("proxy.engine") and "was unloaded" in r.getMessage()
            and f"{MID} was unloaded" in r.getMessage()]
    assert [g.split(": ")[-1] for g in gone] == [f"{MID} was unloaded by the server itself"]


async def test_a_starting_replica_says_where_it_shares_state_and_with_whom(
        make_emulator, make_proxy, redis_server, caplog):
    caplog.set_level(logging.INFO, logger="proxy.shared")
    emu = await make_emulator(catalog=CATALOG)
    await make_proxy("", config=config(emu.url, redis_server.url, "A"))
    await make_proxy("", config=config(emu.url, redis_server.url, "B"))
    said = [r.getMessage() for r in caplog.records if "shared state in Redis" in r.getMessage()]
    assert said[0] == (f"shared state in Redis at {redis_server.url}, key prefix 'lmproxy:', "
                       "as replica A; other live replicas: none; leader: A")
    assert said[1].endswith("as replica B; other live replicas: A; leader: A")


async def test_a_replica_that_adopts_a_later_load_time_keeps_its_count_of_loads(
        make_emulator, make_proxy, redis_server, http):
    emu = await make_emulator(catalog=CATALOG)
    a = await make_proxy("", config=config(emu.url, redis_server.url, "A", budget_gb=20))
    b = await make_proxy("", config=config(emu.url, redis_server.url, "B", budget_gb=20))
    assert (await chat(http, b, MID))[0] == 200          # B's own load, and its time
    b_core = b.engine.host("x").core
    own = entry(b, MID)
    assert own.load_count == 1
    await until_async(lambda: b_measured(a), 10)         # in Redis, B's
    await b.engine.unload(MID)
    gate = emu.state.faults.load_gate[MID] = asyncio.Event()
    from_a = asyncio.ensure_future(chat(http, a, MID))   # A's load, measured later
    await until(lambda: emu.state.load_calls[MID] == 2)
    gate.set()
    assert (await from_a)[0] == 200
    measured = entry(a, MID).load_time_s
    await until_async(lambda: a_measured(a), 10)
    await b_core.reconcile()                             # B reads A's, newer than its own
    await until(lambda: own.load_time_s == measured)
    async with http.get(f"{b.url}/proxy/models") as r:
        rows = [m for m in (await r.json())["data"] if m["model"] == MID]
    assert len(rows) == 1
    row = rows[0]
    assert row["loads"] == 1                             # not 0: B did load it once
    assert (await chat(http, b, MID))[0] == 200 and own.load_count == 1   # resident: no load


async def b_measured(a: Any) -> bool:
    learned = (await a.app[REPLICA].store.learned("x")).get(MID)
    return learned is not None and learned.load is not None and learned.load.by == "B"


async def a_measured(a: Any) -> bool:
    learned = (await a.app[REPLICA].store.learned("x")).get(MID)
    return learned is not None and learned.load is not None and learned.load.by == "A"
