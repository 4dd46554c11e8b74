"""What one replica loads or unloads reaches the others at once, not at their next reconcile
(state.backend: redis; two proxies, emulated hosts, one real Redis). Reconcile ticks are an
hour apart here, so nothing below is learned from them."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.configload import load_config
from proxy.engine.core import EngineCore
from proxy.engine.replica import Replica
from proxy.fleet import create_fleet
from proxy.liveconfig import LiveConfig
from proxy.server.keys import REPLICA
from proxy.state import MemoryState
from proxy.upstream.lmstudio import LMStudioUpstream

from .redis_server import make_redis_server, redis_server  # noqa: F401
from .test_replicas import CATALOG, MID, SMALL, chat, loads, pair, until  # noqa: F401

pytestmark = pytest.mark.timeout(60)
QUIET = {"upstream": {"reconcile_interval_s": 3600}}


def status_on(proxy: Any, key: str, host: str = "x") -> tuple[str, str | None]:
    e = proxy.engine.host(host).core.registry.entries.get(key)
    return (e.status.value, e.owner) if e is not None else ("unknown", None)


async def test_a_request_goes_where_another_replica_has_just_loaded_the_model(pair, http):
    # Room on both hosts, and A would choose x for MID (its preferred host): only knowing
    # that B has just loaded it on y keeps A from loading a second copy.
    a, b, emus = await pair({"x": 20, "y": 20}, models={MID: {"host": "x"}}, **QUIET)
    await b.engine.load(MID, host="y")
    status, _, headers = await chat(http, a, MID)
    assert status == 200 and headers["X-Proxy-Host"] == "y"
    assert loads(emus, MID) == 1


async def test_a_model_another_replica_unloaded_is_loaded_by_the_proxy_not_by_lm_studio(
        pair, http):
    a, b, emus = await pair({"x": 20}, **QUIET)
    await a.engine.load(MID)
    await b.engine.reconcile()                   # B knows A's copy
    assert status_on(b, MID) == ("loaded", "proxy")
    await a.engine.unload(MID)
    status, _, _ = await chat(http, b, MID)
    assert status == 200
    # Loaded by the proxy (managed, with its options), not by LM Studio's JIT behind its back.
    assert [i.jit for i in emus["x"].state.instances_of(MID)] == [False]
    assert status_on(b, MID) == ("loaded", "proxy")


async def test_a_load_and_an_unload_by_one_replica_reach_the_others_view_at_once(pair):
    a, b, _ = await pair({"x": 20, "y": 20}, **QUIET)
    await a.engine.load(SMALL, host="y")
    await until(lambda: status_on(b, SMALL, "y") == ("loaded", "proxy"))
    assert status_on(a, SMALL, "y") == ("loaded", "proxy")
    await a.engine.unload(SMALL)
    await until(lambda: status_on(b, SMALL, "y")[0] == "unloaded")


async def test_a_model_one_replica_loaded_is_the_proxys_on_every_replica(pair, http):
    a, b, _ = await pair({"x": 20}, **QUIET)
    assert (await chat(http, b, MID))[0] == 200
    await until(lambda: status_on(a, MID)[0] == "loaded")
    async with http.get(f"{a.url}/proxy/models") as r:
        rows = {m["model"]: m for m in (await r.json())["data"]}
    assert rows[MID]["owner"] == "proxy"
    assert a.app[REPLICA].hosts[0].owned.has(MID, (MID,))


# -- the checks made at the moment of deciding, without the event stream ------------------------
# Replicas in one process sharing MemoryState's facts, with no event relay: what they know of
# each other's acts comes from the state asked at that moment.

def engine_config(**raw: Any) -> Any:
    return load_config({"memory": {"min_free_memory_gb": 0, "max_memory_usage_percent": 100},
                        "eviction": {"hold": 0}, "storage": {"enabled": False},
                        "upstream": {"reconcile_interval_s": 3600}, **raw})


async def replica_cores(url: str, facts: Any, names: tuple[str, ...] = ("A", "B"),
                        ) -> list[EngineCore]:
    cores = []
    for name in names:
        config = engine_config(upstream={"url": url}, memory={
            "sampler": "budget", "budget_gb": 20, "min_free_memory_gb": 0})
        replica = Replica(facts.view(name), lease_ttl_s=30, lock_ttl_s=10, unavailable_wait_s=1)
        await replica.store.heartbeat(30)         # alive, as a started replica is
        core = EngineCore(config, LMStudioUpstream(config.upstream), owns_upstream=True,
                          shared=replica.host("default"))
        await core.start()
        cores.append(core)
    return cores


@pytest.fixture
async def two_cores(make_emulator) -> Any:
    emu = await make_emulator(catalog=CATALOG)
    facts = MemoryState("facts")
    cores = await replica_cores(emu.url, facts)
    yield emu, facts, cores
    for core in cores:
        await core.cleanup()


async def test_a_first_lease_on_a_copy_another_replica_unloaded_loads_it_again(two_cores):
    emu, _, (a, b) = two_cores
    (await a.acquire(MID)).release()
    await b.reconcile()
    assert b.registry.entries[MID].owner == "proxy"
    assert await a.unload(MID)
    lease = await b.acquire(MID)          # B still counts it resident: the state says not
    lease.release()
    assert emu.state.load_calls[MID] == 2 and emu.state.instances_of(MID)
    assert b.registry.entries[MID].owner == "proxy"


async def test_a_copy_the_fleets_record_lost_is_served_and_recorded_again(two_cores):
    emu, facts, (a, b) = two_cores
    (await a.acquire(MID)).release()
    await b.reconcile()
    await facts.remove_owned("default", MID)    # Redis lost it; the host still holds it
    (await b.acquire(MID)).release()
    assert emu.state.load_calls[MID] == 1
    assert await facts.owned("default") == {MID: MID}
    lease = await b.acquire(MID)            # the first lease after it is not refused again
    lease.release()
    assert emu.state.load_calls[MID] == 1


class HeldOwnership:
    """A StateStore (MemoryState's facts) whose ownership records wait until `go` is set: a
    load done on the host, not yet recorded as the fleet's."""

    def __init__(self, inner: MemoryState) -> None:
        self.inner = inner
        self.go = asyncio.Event()
        self.recording = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def add_owned(self, *args: Any, **kw: Any) -> bool:
        self.recording.set()
        await self.go.wait()
        return await self.inner.add_owned(*args, **kw)


async def test_a_copy_seen_before_its_loader_recorded_it_becomes_the_proxys(make_emulator):
    emu = await make_emulator(catalog=CATALOG)
    facts = MemoryState("facts")
    [b] = await replica_cores(emu.url, facts, ("B",))
    config = engine_config(upstream={"url": emu.url}, memory={
        "sampler": "budget", "budget_gb": 20, "min_free_memory_gb": 0})
    held = HeldOwnership(facts.view("A"))
    await held.inner.heartbeat(30)           # alive, as a started replica is
    a = EngineCore(config, LMStudioUpstream(config.upstream), owns_upstream=True, shared=Replica(
        held, lease_ttl_s=30, lock_ttl_s=10, unavailable_wait_s=1).host("default"))
    await a.start()
    try:
        loading = asyncio.ensure_future(a.acquire(MID))
        await held.recording.wait()          # loaded on the host; A has not recorded it yet
        await b.reconcile()
        assert b.registry.entries[MID].owner == "external"
        held.go.set()
        (await loading).release()
        await b.reconcile()
        assert b.registry.entries[MID].owner == "proxy"
    finally:
        held.go.set()
        await a.cleanup()
        await b.cleanup()


async def test_a_fleet_serves_a_model_where_another_replica_has_just_loaded_it(make_emulator):
    emus = {n: await make_emulator(catalog=CATALOG) for n in ("x", "y")}
    facts = MemoryState("facts")
    fleets = []
    for name in ("A", "B"):
        config = engine_config(
            upstreams=[{"name": n, "url": e.url, "budget_gb": 20} for n, e in emus.items()],
            models={MID: {"host": "x"}})
        replica = Replica(facts.view(name), lease_ttl_s=30, lock_ttl_s=10, unavailable_wait_s=1)
        await replica.store.heartbeat(30)    # alive, as a started replica is
        fleet = create_fleet(LiveConfig(config), replica=replica)
        await fleet.start()
        fleets.append(fleet)
    a, b = fleets
    try:
        await b.load(MID, host="y")
        lease = await a.acquire(MID)         # A would place it on x, its preferred host
        lease.release()
        assert lease.host == "y"
        assert sum(e.state.load_calls[MID] for e in emus.values()) == 1
    finally:
        for fleet in fleets:
            await fleet.cleanup()
            for h in fleet.hosts:
                await h.backend.close()
