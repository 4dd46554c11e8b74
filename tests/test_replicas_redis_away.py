"""Two proxy replicas and one real Redis that dies or restarts empty in the middle of their work
(state.backend: redis): what a replica waits for, what it writes back, and what it shows; and
replicas that name one server differently."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from proxy.configload import load_config
from proxy.server.keys import REPLICA

from .redis_server import make_redis_server, redis_server  # noqa: F401
from .test_replicas import CATALOG, MID, OTHER, _empty, chat, until, until_async

pytestmark = pytest.mark.timeout(60)
AWAY_WAIT_S = 5.0          # state.unavailable_wait_s: how long a load waits for Redis


def config(url: str, redis_url: str, name: str, budget_gb: float = 20, host: str = "x",
           **extra: Any) -> Any:
    return load_config({
        "upstreams": [{"name": host, "url": url, "budget_gb": budget_gb}],
        "state": {"backend": "redis", "url": redis_url, "replica_id": name,
                  "lease_ttl_s": 1.5, "lock_ttl_s": 2.0, "unavailable_wait_s": AWAY_WAIT_S,
                  "timeout_s": 0.5},
        "memory": {"min_free_memory_gb": 0, "max_memory_usage_percent": 100},
        "eviction": {"hold": 0}, "storage": {"enabled": False}, **extra})


@pytest.fixture
async def replicas(make_emulator, make_proxy, redis_server) -> Any:
    async def start(**extra: Any) -> tuple[Any, Any, Any]:
        emu = await make_emulator(catalog=CATALOG)
        a = await make_proxy("", config=config(emu.url, redis_server.url, "A", **extra))
        b = await make_proxy("", config=config(emu.url, redis_server.url, "B", **extra))
        return a, b, emu
    return start


def entry(proxy: Any, key: str) -> Any:
    return proxy.engine.host("x").core.registry.entries.get(key)


async def test_a_load_waiting_on_another_replicas_adopts_it_when_redis_dies_meanwhile(
        replicas, redis_server, http):
    a, b, emu = await replicas()
    gate = emu.state.faults.load_gate[MID] = asyncio.Event()
    from_a = asyncio.ensure_future(chat(http, a, MID))
    await until(lambda: emu.state.load_calls[MID] == 1)      # A holds the load lock
    from_b = asyncio.ensure_future(chat(http, b, MID))
    await until(lambda: entry(b, MID) is not None and entry(b, MID).status.value == "loading")
    redis_server.stop()                                      # B waits for A's load, blind
    gate.set()                                               # A's load ends on the host
    loop = asyncio.get_running_loop()
    started = loop.time()
    (status_a, _, _), (status_b, body_b, _) = await asyncio.gather(from_a, from_b)
    assert status_a == 200
    assert status_b == 200, body_b                  # not 503 state_unavailable
    assert loop.time() - started < AWAY_WAIT_S      # as soon as the host listed it
    assert emu.state.load_calls[MID] == 1


QUIET = {"upstream": {"reconcile_interval_s": 3600}}   # nothing learned from reconcile ticks


def owner(proxy: Any, key: str) -> str | None:
    e = entry(proxy, key)
    return e.owner if e is not None and e.status.value == "loaded" else None


async def test_ownership_redis_lost_during_a_load_is_written_back_when_it_returns(
        replicas, redis_server, http):
    a, b, emu = await replicas(budget_gb=7, **QUIET)    # room for one 6 GB model
    gate = emu.state.faults.load_gate[MID] = asyncio.Event()
    from_a = asyncio.ensure_future(chat(http, a, MID))
    await until(lambda: emu.state.load_calls[MID] == 1)
    redis_server.stop()                       # the load ends while Redis is away
    await until(lambda: not a.app[REPLICA].ok and not b.app[REPLICA].ok)
    gate.set()
    assert (await from_a)[0] == 200
    await b.engine.reconcile()                # B sees the copy; the record cannot say whose
    assert (owner(a, MID), owner(b, MID)) == ("proxy", "external")
    redis_server.start()                      # back, and empty
    await until(lambda: owner(b, MID) == "proxy")
    assert await a.app[REPLICA].store.owned("x") == {MID: MID}
    status, body, _ = await chat(http, b, OTHER)          # B may evict it now
    assert status == 200, body
    assert emu.state.unload_calls[MID] == 1


async def test_ownership_redis_lost_in_a_restart_is_written_back_for_a_new_replica(
        replicas, redis_server, make_proxy, http):
    a, b, emu = await replicas(**QUIET)
    assert (await chat(http, b, MID))[0] == 200          # B loads it: the fleet's
    redis_server.stop()
    redis_server.start()                                 # empty, maybe unnoticed
    c = await make_proxy("", config=config(emu.url, redis_server.url, "C", **QUIET))
    assert owner(c, MID) == "external"                   # nothing says otherwise yet
    await b.engine.reconcile()                           # B's next look at the host
    await until(lambda: owner(c, MID) == "proxy")
    assert await c.app[REPLICA].store.owned("x") == {MID: MID}


async def health_and_gauge(http: Any, proxy: Any) -> tuple[dict, str]:
    async with http.get(f"{proxy.url}/proxy/health") as r:
        health = await r.json()
    async with http.get(f"{proxy.url}/metrics") as r:
        gauge = [line for line in (await r.text()).splitlines()
                 if line.startswith("proxy_shared_state_up ")]
    return health, gauge[0] if gauge else ""


async def test_redis_away_shows_in_health_and_metrics_until_it_returns(
        replicas, redis_server, http, caplog):
    caplog.set_level(logging.WARNING, logger="proxy.shared")
    a, _, _ = await replicas()
    health, gauge = await health_and_gauge(http, a)
    assert gauge == "proxy_shared_state_up 1.0"
    assert health["system_health"]["shared_state"] == {
        "ok": True, "replica": "A", "leader": a.app[REPLICA].leader, "error": None}
    redis_server.stop()
    await until(lambda: not a.app[REPLICA].ok)
    health, gauge = await health_and_gauge(http, a)
    assert gauge == "proxy_shared_state_up 0.0"
    [alert] = [x for x in health["alerts"] if x["rule"] == "shared_state_unavailable"]
    assert alert["severity"] == "warning" and "redis://" in alert["message"]
    assert health["status"] == "degraded"
    assert health["system_health"]["shared_state"]["ok"] is False
    warned = lines(caplog, "Redis at", "proxy.shared")     # A's, and B's if it noticed
    assert warned and all(w.startswith("shared state unavailable: Redis at redis://")
                          for w in warned)                   # the prefix said once
    redis_server.start()
    await until(lambda: a.app[REPLICA].ok)
    health, gauge = await health_and_gauge(http, a)
    assert gauge == "proxy_shared_state_up 1.0"
    assert not [x for x in health["alerts"] if x["rule"] == "shared_state_unavailable"]


def lines(caplog: Any, text: str, logger: str = "proxy") -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith(logger) and text in r.getMessage()]


async def test_a_catch_up_names_its_host_and_the_replica_that_unloaded(replicas, caplog):
    caplog.set_level(logging.INFO, logger="proxy")
    a, b, _ = await replicas(**QUIET)
    await a.engine.load(MID)
    await until(lambda: owner(b, MID) == "proxy")        # B heard of A's load
    assert lines(caplog, "is loaded and the proxy's")[0].startswith(f"host x: {MID} ")
    await a.engine.unload(MID)
    await until(lambda: entry(b, MID).status.value == "unloaded")
    assert lines(caplog, "was unloaded") == [f"host x: {MID} was unloaded by replica A"]
    assert entry(b, MID).evictions["backend"] == 0       # A's eviction, not LM Studio's


async def test_a_second_copy_loaded_as_redis_restarted_is_charged_then_unloaded_when_idle(
        replicas, redis_server, http):
    a, b, emu = await replicas(**QUIET)
    gate = emu.state.faults.load_gate[MID] = asyncio.Event()
    from_a = asyncio.ensure_future(chat(http, a, MID))
    await until(lambda: emu.state.load_calls[MID] == 1)
    redis_server.stop()
    redis_server.start()                      # empty: A's load lock is gone
    from_b = asyncio.ensure_future(chat(http, b, MID))
    await until(lambda: emu.state.load_calls[MID] == 2)   # so B loads it again
    gate.set()
    assert [s for s, _, _ in await asyncio.gather(from_a, from_b)] == [200, 200]
    for proxy in (a, b):                      # each replica's next look at the host
        await proxy.engine.reconcile()
    both = (MID, f"{MID}:2")
    for proxy in (a, b):                      # each instance holds its memory
        core = proxy.engine.host("x").core
        e = entry(proxy, MID)
        assert e.instance_ids == both
        assert core.last_sample.available_bytes == 20 * 10**9 - 2 * core.footprint_bytes(e)
    await until(lambda: a.app[REPLICA].leader or b.app[REPLICA].leader)
    leader, other = (a, b) if a.app[REPLICA].leader else (b, a)
    store = leader.app[REPLICA].store
    await until_async(lambda: _empty(store.leased_by("x", MID)), 10)   # idle everywhere
    # Redis lost every lease: no eviction until the leader's heartbeat is back, and the
    # replicas have put their leases back.
    await until_async(lambda: _has(store.replicas(), leader.app[REPLICA].id), 10)
    await until(lambda: leader.app[REPLICA].leases_back(), 10)
    await leader.engine.host("x").core._idle_tick()
    assert [i.instance_id for i in emu.state.instances_of(MID)] == [MID]
    await until(lambda: entry(other, MID).instance_ids == (MID,))      # told at once
    assert entry(leader, MID).instance_ids == (MID,)
    assert sorted(await store.owned("x")) == [MID]
    assert (await chat(http, other, MID))[0] == 200 and emu.state.load_calls[MID] == 2


async def test_a_second_instance_someone_else_loaded_beside_the_proxys_is_left_alone(
        replicas, http):
    a, _, emu = await replicas(**QUIET)
    assert (await chat(http, a, MID))[0] == 200
    await emu.state.load(MID)                 # the GUI's second instance, beside the proxy's
    await a.engine.reconcile()
    assert entry(a, MID).instance_ids == (MID, f"{MID}:2")
    store = a.app[REPLICA].store
    assert await store.owned("x") == {MID: MID}      # not recorded as the fleet's
    await until(lambda: a.app[REPLICA].leader)
    await until_async(lambda: _empty(store.leased_by("x", MID)), 10)
    await a.engine.host("x").core._idle_tick()
    assert len(emu.state.instances_of(MID)) == 2     # nor unloaded as a duplicate


async def name_alerts(http: Any, proxy: Any) -> list[str]:
    async with http.get(f"{proxy.url}/proxy/health") as r:
        return [x["message"] for x in (await r.json())["alerts"]
                if x["rule"] == "host_name_conflict"]


async def test_replicas_naming_one_server_differently_are_warned(
        make_emulator, make_proxy, redis_server, http, caplog):
    caplog.set_level(logging.WARNING, logger="proxy.shared")
    emu = await make_emulator(catalog=CATALOG)
    a = await make_proxy("", config=config(emu.url, redis_server.url, "A", host="big"))
    b = await make_proxy("", config=config(emu.url, redis_server.url, "B", host="bigbox"))
    await b.engine.reconcile()                # each replica's record, read by the other
    await a.engine.reconcile()
    await until(lambda: a.app[REPLICA].name_conflicts() and b.app[REPLICA].name_conflicts())
    server = emu.url
    [on_a] = await name_alerts(http, a)
    assert on_a == f"host 'big': replica B calls {server} host 'bigbox', this replica calls " \
                   "it 'big'"
    assert (await name_alerts(http, b))[0].startswith("host 'bigbox': replica A calls ")
    assert any(r.levelname == "WARNING" and "name each server alike" in r.getMessage()
               for r in caplog.records)
    async with http.get(f"{b.url}/proxy/stats") as r:
        hosts = (await r.json())["replicas"]["hosts"]
    assert hosts["big"]["url"] == hosts["bigbox"]["url"] == server


async def test_replicas_giving_one_name_to_two_servers_are_warned(
        make_emulator, make_proxy, redis_server, http):
    one, two = await make_emulator(catalog=CATALOG), await make_emulator(catalog=CATALOG)
    a = await make_proxy("", config=config(one.url, redis_server.url, "A"))
    b = await make_proxy("", config=config(two.url, redis_server.url, "B"))
    await a.engine.reconcile()                # A's record of x, then B's over it
    await b.engine.reconcile()
    await until(lambda: b.app[REPLICA].name_conflicts())
    await a.engine.reconcile()
    await until(lambda: a.app[REPLICA].name_conflicts())
    [on_b] = await name_alerts(http, b)
    assert on_b.startswith("host 'x': replica A has host 'x' at http://") and \
        "this replica at" in on_b
    assert await name_alerts(http, a)


async def _has(names: Any, name: str) -> bool:
    return name in await names
