"""Two proxy replicas, three emulated hosts, one real Redis (`state.backend: redis`): one load
however the requests split across replicas, no eviction of a model another replica serves,
memory never reserved twice, one leader, and serving on while Redis is away."""
from __future__ import annotations

import asyncio
from typing import Any, Callable

import pytest

from proxy.configload import load_config
from proxy.emulator.catalog import CatalogModel
from proxy.engine.memory import GB
from proxy.server.keys import REPLICA

from .redis_server import make_redis_server, redis_server  # noqa: F401
from .sse import SseReader

pytestmark = pytest.mark.timeout(90)

SMALL, MID, OTHER, COLD = "lab/small-2b", "lab/mid-6b", "lab/other-6b", "lab/cold-6b"
CATALOG = [CatalogModel(key=k, size_bytes=int(gb * GB), memory_bytes=int(gb * GB),
                        load_time_s=0.0)
           for k, gb in ((SMALL, 2), (MID, 5), (OTHER, 5), (COLD, 5))]


def replica_config(hosts: dict[str, tuple[str, float]], redis_url: str, name: str,
                   **extra: Any) -> Any:
    return load_config({
        "upstreams": [{"name": n, "url": url, "budget_gb": gb} for n, (url, gb) in
                      hosts.items()],
        "state": {"backend": "redis", "url": redis_url, "replica_id": name,
                  "lease_ttl_s": 1.5, "lock_ttl_s": 2.0, "unavailable_wait_s": 1.0,
                  "timeout_s": 0.5},
        "memory": {"min_free_memory_gb": 0, "max_memory_usage_percent": 100},
        "eviction": {"hold": 0}, "storage": {"enabled": False}, **extra})


@pytest.fixture
async def pair(make_emulator, make_proxy, redis_server) -> Callable[..., Any]:
    async def start(budgets: dict[str, float], **extra: Any) -> tuple[Any, Any, dict]:
        emus = {n: await make_emulator(catalog=CATALOG) for n in budgets}
        hosts = {n: (emus[n].url, gb) for n, gb in budgets.items()}
        a = await make_proxy("", config=replica_config(hosts, redis_server.url, "A", **extra))
        b = await make_proxy("", config=replica_config(hosts, redis_server.url, "B", **extra))
        return a, b, emus
    return start


async def chat(http: Any, proxy: Any, model: str, **kw: Any) -> tuple[int, Any, Any]:
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": model, "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}], **kw}) as r:
        return r.status, await r.json(), r.headers


async def until(condition: Callable[[], Any], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


def loads(emus: dict[str, Any], key: str) -> int:
    return sum(e.state.load_calls[key] for e in emus.values())


async def test_fifty_cold_requests_split_across_two_replicas_give_one_load(pair, http):
    a, b, emus = await pair({"x": 20, "y": 20, "z": 20})
    gates = {n: asyncio.Event() for n in emus}
    for n, e in emus.items():
        e.state.faults.load_gate[MID] = gates[n]
    racing = [asyncio.ensure_future(chat(http, a if i % 2 else b, MID)) for i in range(50)]
    await until(lambda: loads(emus, MID) >= 1)
    for _ in range(20):                    # time for a second load to start, were there one
        await asyncio.sleep(0.05)
    for g in gates.values():
        g.set()
    answers = await asyncio.gather(*racing)
    assert [s for s, _, _ in answers] == [200] * 50
    assert loads(emus, MID) == 1
    assert len({h["X-Proxy-Host"] for _, _, h in answers}) == 1


async def test_a_model_one_replica_streams_from_is_never_evicted_by_the_other(pair, http):
    a, b, emus = await pair({"x": 8})
    emu = emus["x"]
    await a.engine.load(OTHER)
    gate = emu.state.faults.stream_gate = asyncio.Event()
    async with http.post(f"{a.url}/v1/chat/completions", json={
            "model": OTHER, "stream": True, "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}]}) as stream:
        assert stream.status == 200
        await stream.content.readuntil(b"\n\n")              # A is serving it now
        await until(lambda: a.app[REPLICA].hosts[0].renewed)  # its lease is in Redis
        await b.engine.reconcile()
        # B needs OTHER's memory for MID; OTHER is the fleet's (A loaded it) and idle on B.
        waiting = asyncio.ensure_future(chat(http, b, MID))
        b_core = b.engine.hosts[0].core
        await until(lambda: b_core.registry.entries[OTHER].key in
                    b_core.ctx.shared.remote_busy)
        assert emu.state.unload_calls[OTHER] == 0 and not waiting.done()
        row = b.engine.row(MID)
        assert row["waiting"] == 1
        gate.set()
        await stream.read()
    # A's stream is over and its lease lapses: B's request goes on, evicting OTHER.
    status, _, headers = await asyncio.wait_for(waiting, 20)
    assert status == 200 and emu.state.unload_calls[OTHER] == 1


async def test_memory_is_never_reserved_twice_under_racing_loads(pair, http):
    a, b, emus = await pair({"x": 12})
    emu = emus["x"]
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, emu.state.used_bytes())
            await asyncio.sleep(0.005)

    watcher = asyncio.ensure_future(watch())
    gate = emu.state.faults.load_gate[MID] = asyncio.Event()
    emu.state.faults.load_gate[OTHER] = gate
    emu.state.faults.load_gate[COLD] = gate
    # Three 6 GB models on a 12 GB host, asked of both replicas at once: two fit.
    racing = [asyncio.ensure_future(chat(http, r, m))
              for r, m in ((a, MID), (b, OTHER), (a, COLD), (b, MID), (a, OTHER))]
    await until(lambda: sum(emu.state.load_calls.values()) >= 1)
    for _ in range(20):
        await asyncio.sleep(0.05)
    gate.set()
    answers = await asyncio.gather(*racing)
    assert not watcher.done()            # it watched all along
    watcher.cancel()
    assert peak <= 12 * GB, f"{peak / GB:.1f} GB resident on a 12 GB host"
    assert sum(emu.state.load_calls.values()) >= 2


async def test_one_leader_and_the_other_takes_over_within_the_lease(pair):
    a, b, _ = await pair({"x": 8})
    ra, rb = a.app[REPLICA], b.app[REPLICA]
    await until(lambda: ra.leader or rb.leader)
    assert ra.leader != rb.leader
    leader, other, proxy = (ra, rb, a) if ra.leader else (rb, ra, b)
    assert proxy.engine.hosts[0].core.leads
    leader._task.cancel()                 # the leader stops renewing (as if it hung or died)
    await until(lambda: other.leader, 5)  # lease_ttl_s is 1.5 s


async def test_redis_away_resident_models_serve_loads_refuse_naming_redis_then_resume(
        pair, http, redis_server):
    a, b, emus = await pair({"x": 20})
    await a.engine.load(SMALL)
    await b.engine.reconcile()
    redis_server.stop()
    status, _, _ = await chat(http, b, SMALL)        # resident: no Redis on the hot path
    assert status == 200
    status, body, _ = await chat(http, a, MID)       # a load needs the lock
    assert status == 503 and body["error"]["code"] == "state_unavailable"
    assert "redis://" in body["error"]["message"]
    await until(lambda: not a.app[REPLICA].ok)
    async with http.get(f"{a.url}/readyz") as r:
        ready = await r.json()
    assert r.status == 200 and ready["degraded"] is True and ready["state"]["ok"] is False
    redis_server.start()
    await until(lambda: a.app[REPLICA].ok and b.app[REPLICA].ok)
    status, _, _ = await chat(http, a, MID)
    assert status == 200 and loads(emus, MID) == 1
    # Nothing left open or counted twice: no lease once nothing serves, no reservation once
    # the load's grace is over, one owner record per loaded instance.
    store = a.app[REPLICA].store
    await until_async(lambda: _empty(store.leased_by("x", MID)), 10)
    await until_async(lambda: _zero(store.reserved_bytes("x")), 10)
    # Redis restarted empty: the new load, and SMALL's record written back by A.
    await until_async(lambda: _owned_are(store, [MID, SMALL]), 10)


async def until_async(condition: Callable[[], Any], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not await condition():
            await asyncio.sleep(0.05)


async def _empty(call: Any) -> bool:
    return not await call


async def _zero(call: Any) -> bool:
    return await call == 0


async def _owned_are(store: Any, keys: list[str]) -> bool:
    return sorted((await store.owned("x")).values()) == keys


async def test_an_event_on_one_replica_shows_on_the_others_event_stream(pair, http):
    a, b, _ = await pair({"x": 20})
    async with http.get(f"{b.url}/proxy/events") as r:
        events = SseReader(r)
        await events.next()                            # B's snapshot
        await a.engine.load(SMALL)                     # on A
        seen = await asyncio.wait_for(events.until(
            lambda e: e.type == "load" and e.data.get("replica") == "A"), 10)
    load = seen[-1].data
    assert load["model"] == SMALL and load["host"] == "x"
    # B's own events are not echoed back to it from Redis.
    assert all(e.data.get("replica") != "B" for e in seen)


async def test_a_refusal_for_memory_teaches_a_replica_no_lower_bound(make_emulator, make_proxy,
                                                                    redis_server, http):
    # The host is fuller than this replica knows (another replica's loads, say): LM Studio
    # refuses for lack of memory. That is no fact about the model's size.
    emu = await make_emulator(catalog=CATALOG, capacity_bytes=4 * GB)
    a = await make_proxy("", config=replica_config({"x": (emu.url, 20)}, redis_server.url,
                                                   "A"))
    status, body, _ = await chat(http, a, MID)
    assert status == 503 and body["error"]["code"] == "model_load_failed"
    e = a.engine.hosts[0].core.registry.entries[MID]
    assert e.footprint_floor_bytes is None
    assert a.engine.row(MID)["footprint_source"] == "estimated"


async def test_stats_show_the_replicas_the_leader_and_what_each_host_holds(pair, http):
    a, b, _ = await pair({"x": 20, "y": 20})
    await a.engine.load(SMALL, host="y")
    await until(lambda: a.app[REPLICA].leader or b.app[REPLICA].leader)
    await until(lambda: not a.app[REPLICA].hosts[1]._tasks)   # A's record of y is written
    async with http.get(f"{b.url}/proxy/stats") as r:
        replicas = (await r.json())["replicas"]
    assert replicas["ok"] and replicas["replica"] == "B"
    assert replicas["replicas"] == ["A", "B"] and replicas["leader"] in ("A", "B")
    assert replicas["hosts"]["y"]["resident"] == [SMALL]
    assert replicas["hosts"]["y"]["budget_gb"] == 20.0


async def test_a_cold_models_lease_is_in_redis_before_its_request_goes_on(pair):
    a, b, _ = await pair({"x": 20})
    replica = a.app[REPLICA]
    replica._task.cancel()              # no batch renewal: only the lease taken at once counts
    lease = await a.engine.acquire(SMALL)
    try:
        assert await replica.store.leased_by("x", SMALL) == {"A"}
    finally:
        lease.release()


async def test_only_the_leader_unloads_idle_models(pair):
    a, b, _ = await pair({"x": 20}, models={SMALL: {"ttl_s": 60}})
    await until(lambda: a.app[REPLICA].leader or b.app[REPLICA].leader)
    leader, follower = (a, b) if a.app[REPLICA].leader else (b, a)
    await follower.engine.load(SMALL)
    await leader.engine.reconcile()
    store = leader.app[REPLICA].store
    await until_async(lambda: _empty(store.leased_by("x", SMALL)), 10)   # the load's lease ends
    for proxy in (leader, follower):        # an hour unused on both replicas' books
        e = proxy.engine.hosts[0].core.registry.entries[SMALL]
        e.last_used_at_s = e.loaded_at_s = proxy.engine.clock.now() - 3600
    await follower.engine.hosts[0].core._idle_tick()
    assert follower.engine.hosts[0].core.registry.entries[SMALL].status.value == "loaded"
    await leader.engine.hosts[0].core._idle_tick()
    assert leader.engine.hosts[0].core.registry.entries[SMALL].status.value == "unloaded"


async def test_a_replica_shows_its_own_events_once(pair, http):
    a, b, _ = await pair({"x": 20})
    async with http.get(f"{a.url}/proxy/events") as r:
        events = SseReader(r)
        await events.next()
        await a.engine.load(SMALL)
        await b.engine.load(MID)        # B's load reaching A means A's reader has run past A's
        seen = await asyncio.wait_for(events.until(
            lambda e: e.type == "load" and e.data.get("replica") == "B"), 10)
    own = [e for e in seen if e.type == "load" and e.data["model"] == SMALL]
    assert len(own) == 1 and "replica" not in own[0].data


async def test_a_replica_that_gets_the_lock_as_anothers_load_finishes_adopts_the_model(
        pair, http):
    # Room for one copy only: were B to reserve memory for its own load of MID after A's
    # finished, it would be refused; it must see the host holds MID and adopt it.
    a, b, emus = await pair({"x": 6.5})
    emu = emus["x"]
    gate = emu.state.faults.load_gate[MID] = asyncio.Event()
    from_a = asyncio.ensure_future(chat(http, a, MID))
    await until(lambda: emu.state.load_calls[MID] == 1)
    from_b = asyncio.ensure_future(chat(http, b, MID))
    b_core = b.engine.hosts[0].core
    await until(lambda: b_core.registry.entries[MID].status.value == "loading")
    gate.set()
    answers = await asyncio.gather(from_a, from_b)
    assert [s for s, _, _ in answers] == [200, 200]
    assert emu.state.load_calls[MID] == 1


async def test_a_load_time_one_replica_measured_is_adopted_by_the_other(pair, http):
    a, b, _ = await pair({"x": 20})
    assert (await chat(http, a, MID))[0] == 200
    measured = a.engine.hosts[0].core.registry.entries[MID]
    assert measured.load_count == 1
    store = a.app[REPLICA].store
    async with asyncio.timeout(10):             # A has written it to Redis
        while MID not in await store.learned("x"):
            await asyncio.sleep(0.02)
    b_core = b.engine.hosts[0].core
    await b_core.reconcile()                    # B publishes its record, and reads A's
    adopted = b_core.registry.entries[MID]
    await until(lambda: adopted.load_time_s == measured.load_time_s)
    assert adopted.load_count == 0              # A's measurement; B has loaded nothing
