"""Several hosts behind one proxy: placement by memory, one load in the fleet however many race,
eviction on the cheapest host only, refusals that name the hosts, and admin calls per host.
(A host dying and coming back: tests/test_fleet_failover.py.)"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

import pytest

from proxy.configload import load_config
from proxy.emulator.catalog import CatalogModel
from proxy.engine.memory import GB
from proxy.fleet.views import full_view

pytestmark = pytest.mark.timeout(60)

SMALL, MID, OTHER, HUGE = "lab/small-2b", "lab/mid-6b", "lab/other-6b", "lab/huge-70b"
COLD = "lab/cold-6b"
CATALOG = [CatalogModel(key=SMALL, size_bytes=2 * GB, memory_bytes=2 * GB, load_time_s=0.0),
           CatalogModel(key=MID, size_bytes=5 * GB, memory_bytes=5 * GB, load_time_s=0.0),
           CatalogModel(key=OTHER, size_bytes=5 * GB, memory_bytes=5 * GB, load_time_s=0.0),
           CatalogModel(key=COLD, size_bytes=5 * GB, memory_bytes=5 * GB, load_time_s=0.0),
           CatalogModel(key=HUGE, size_bytes=50 * GB, memory_bytes=50 * GB, load_time_s=0.0)]
# Footprints are the file size × 1.2 until measured: SMALL 2.4 GB, MID and OTHER 6 GB.


def fleet_config(hosts: list[tuple[str, str, float]], patterns: dict[str, list[str]] | None = None,
                 **extra: Any) -> Any:
    """`patterns`: the `models` a host may hold, by host name (else it may hold any)."""
    raw: dict[str, Any] = {
        "upstreams": [{"name": n, "url": url, "budget_gb": gb,
                       **({"models": patterns[n]} if n in (patterns or {}) else {})}
                      for n, url, gb in hosts],
        "memory": {"min_free_memory_gb": 0, "max_memory_usage_percent": 100},
        "eviction": {"hold": 0}, "storage": {"enabled": False}}
    raw.update(extra)
    return load_config(raw)


@pytest.fixture
async def fleet(make_emulator, make_proxy) -> Callable[..., Any]:
    async def start(budgets: dict[str, float], patterns: dict[str, list[str]] | None = None,
                    **extra: Any) -> tuple[Any, dict[str, Any]]:
        emus = {n: await make_emulator(catalog=CATALOG) for n in budgets}
        proxy = await make_proxy("", config=fleet_config(
            [(n, emus[n].url, gb) for n, gb in budgets.items()], patterns, **extra))
        return proxy, emus
    return start


async def chat(http: Any, proxy: Any, model: str, **kw: Any) -> tuple[int, dict, Any]:
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": model, "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}], **kw}) as r:
        return r.status, await r.json(), r.headers


def loads(emus: dict[str, Any], key: str | None = None) -> dict[str, int]:
    return {n: (sum(e.state.load_calls.values()) if key is None else e.state.load_calls[key])
            for n, e in emus.items()}


async def test_a_cold_model_goes_to_the_host_with_room_and_then_where_it_is_resident(
        fleet, http):
    proxy, emus = await fleet({"tiny": 4, "roomy": 12, "busy": 12})
    await proxy.engine.load(OTHER, host="busy")          # busy: 6 GB taken, 6 GB left
    await proxy.engine.load(SMALL, host="busy")          # ... 3.6 GB left: MID does not fit
    status, _, headers = await chat(http, proxy, MID)
    assert status == 200 and headers["X-Proxy-Host"] == "roomy"
    assert loads(emus, MID) == {"tiny": 0, "roomy": 1, "busy": 0}
    for _ in range(3):
        status, _, headers = await chat(http, proxy, MID)
        assert status == 200 and headers["X-Proxy-Host"] == "roomy"
    assert loads(emus, MID) == {"tiny": 0, "roomy": 1, "busy": 0}
    assert proxy.engine.placements["free"] == 1 and proxy.engine.placements["resident"] >= 3


async def test_a_model_resident_on_one_host_is_served_there_even_where_others_have_room(
        fleet, http):
    proxy, emus = await fleet({"a": 30, "b": 30, "c": 30})
    await proxy.engine.load(SMALL, host="c")
    answers = [await chat(http, proxy, SMALL) for _ in range(10)]
    assert {h["X-Proxy-Host"] for _, _, h in answers} == {"c"}
    assert loads(emus) == {"a": 0, "b": 0, "c": 1}



async def test_a_models_one_copy_is_not_taken_on_a_host_to_avoid_or_one_that_is_down(fleet):
    proxy, emus = await fleet({"a": 20, "b": 20})
    f = proxy.engine
    await f.load(SMALL, host="a")
    lease = await f.acquire(SMALL, avoid="a")    # a retry after `a` failed the request
    assert lease.host == "b"
    lease.release()
    await f.unload(SMALL, host="b")
    await emus["a"].close()
    await f.by_name["a"].core.reconcile()
    assert not f.by_name["a"].up and f.by_name["a"].entry(SMALL).status.value == "loaded"
    lease = await f.acquire(SMALL)
    assert lease.host == "b"
    lease.release()


async def test_of_two_copies_a_request_goes_to_the_one_with_a_free_slot(fleet):
    proxy, _ = await fleet({"a": 20, "b": 20})
    f = proxy.engine
    for host in ("a", "b"):
        await f.load(SMALL, host=host)
    a = f.by_name["a"].core
    busy = [await a.acquire(SMALL) for _ in range(f.by_name["a"].config.parallel)]
    for _ in range(5):
        lease = await f.acquire(SMALL)
        assert lease.host == "b"
        lease.release()
    for lease in busy:
        lease.release()

async def test_fifty_racing_requests_for_a_cold_model_give_one_load_in_the_fleet(fleet, http):
    proxy, emus = await fleet({"a": 20, "b": 20, "c": 20})
    gates = {n: asyncio.Event() for n in emus}
    for n, e in emus.items():
        e.state.faults.load_gate[MID] = gates[n]
    racing = [asyncio.ensure_future(chat(http, proxy, MID)) for _ in range(50)]
    fleet_engine = proxy.engine
    async with asyncio.timeout(10):
        while sum(h.core.registry.entries[MID].waiting for h in fleet_engine.hosts) < 50:
            await asyncio.sleep(0.01)
    for g in gates.values():
        g.set()
    answers = await asyncio.gather(*racing)
    assert [s for s, _, _ in answers] == [200] * 50
    assert sum(loads(emus, MID).values()) == 1
    assert len({h["X-Proxy-Host"] for _, _, h in answers}) == 1


async def test_a_crowd_past_replicate_after_waiters_loads_a_second_copy_where_there_is_room(
        fleet, http):
    proxy, emus = await fleet({"a": 20, "b": 20},
                              placement={"replicate_after_waiters": 5})
    gates = {n: asyncio.Event() for n in emus}
    for n, e in emus.items():
        e.state.faults.load_gate[MID] = gates[n]
    first = [asyncio.ensure_future(chat(http, proxy, MID)) for _ in range(5)]
    hosts = proxy.engine.hosts
    async with asyncio.timeout(10):
        while sum(h.core.registry.entries[MID].waiting for h in hosts) < 5:
            await asyncio.sleep(0.01)
    crowd = [asyncio.ensure_future(chat(http, proxy, MID)) for _ in range(3)]
    async with asyncio.timeout(10):
        while sum(h.core.registry.entries[MID].waiting for h in hosts) < 8:
            await asyncio.sleep(0.01)
    for g in gates.values():
        g.set()
    answers = await asyncio.gather(*first, *crowd)
    assert [s for s, _, _ in answers] == [200] * 8
    assert loads(emus, MID) == {"a": 1, "b": 1}
    assert proxy.engine.placements["replicate"] >= 1


async def test_eviction_happens_on_the_cheapest_host_only(fleet, http):
    proxy, emus = await fleet({"a": 8, "b": 8})
    await proxy.engine.load(OTHER, host="a")
    await proxy.engine.load(COLD, host="b")    # both hosts full for MID (6 GB)
    for _ in range(6):                         # OTHER on a is in use: its reload would cost
        assert (await chat(http, proxy, OTHER))[0] == 200
    hosts = {h.name: h for h in proxy.engine.hosts}
    costs = {n: full_view(h, h.core.registry.entries[MID], False).evict_cost_s
             for n, h in hosts.items()}
    assert costs["a"] is not None and costs["b"] is not None and costs["b"] < costs["a"]
    status, _, headers = await chat(http, proxy, MID)
    assert status == 200 and headers["X-Proxy-Host"] == "b"
    assert sum(emus["a"].state.unload_calls.values()) == 0
    assert sum(emus["b"].state.unload_calls.values()) >= 1


def every_200_s(core: Any, key: str, n: int = 20) -> None:
    """key's history on this host: n requests 200 s apart, the last 30 s ago."""
    now = core.clock.now()
    for i in range(n, 0, -1):
        core.learner.observe(key, now - 30.0 - 200.0 * (i - 1), 0.0)


async def test_a_victim_asked_for_every_few_minutes_is_priced_by_its_return_not_at_zero(
        fleet):
    """Within the evictor's minute OTHER is hardly due; within the placement horizon it
    surely is: evicting it costs about its reload, not nothing (else the fastest host churns)."""
    proxy, _ = await fleet({"a": 8, "b": 8})
    await proxy.engine.load(OTHER, host="a")
    await proxy.engine.load(COLD, host="b")
    a = proxy.engine.by_name["a"]
    every_200_s(a.core, OTHER)
    now = a.core.clock.now()
    assert a.core.learner.predict(OTHER, now, 60.0).p_within < 0.3
    other = a.core.registry.entries[OTHER]
    cost_a = full_view(a, a.core.registry.entries[MID], False).evict_cost_s
    reload_s = max(a.core.registry.reload_s(other), 0.01)   # the cost's floor
    assert cost_a is not None and cost_a >= 0.8 * reload_s


async def test_a_victim_no_other_host_can_hold_costs_the_newcomer_s_load_again(fleet):
    """OTHER (6 GB) fits only on a: evicted for SMALL, it comes back and pushes SMALL out."""
    proxy, _ = await fleet({"a": 8, "b": 4})
    await proxy.engine.load(OTHER, host="a")     # 2 GB left: SMALL (2.4 GB) must evict it
    a = proxy.engine.by_name["a"]
    every_200_s(a.core, OTHER)
    small = a.core.registry.entries[SMALL]
    p_return = a.core.learner.predict(OTHER, a.core.clock.now(), 300.0).p_within
    sole = full_view(a, small, False, elsewhere_ceiling_bytes=4 * GB).evict_cost_s
    shared = full_view(a, small, False, elsewhere_ceiling_bytes=20 * GB).evict_cost_s
    assert sole is not None and shared is not None and p_return > 0.8
    assert sole - shared == pytest.approx(a.core.registry.reload_s(small) * p_return,
                                          rel=0.05)


async def test_a_model_larger_than_every_host_is_refused_at_once_naming_each_ceiling(
        fleet, http):
    proxy, emus = await fleet({"a": 8, "b": 16})
    status, body, _ = await chat(http, proxy, HUGE)
    assert status == 503 and body["error"]["code"] == "model_too_large"
    message = body["error"]["message"]
    assert "'a' 8.0 GB" in message and "'b' 16.0 GB" in message
    assert loads(emus) == {"a": 0, "b": 0}


async def test_a_host_that_may_not_hold_a_model_never_gets_it(fleet, http):
    proxy, emus = await fleet({"small": 30, "any": 7}, {"small": ["lab/small-*"]})
    small_only, anything = emus["small"], emus["any"]
    await proxy.engine.load(OTHER)             # only "any" may hold it: placed there
    assert anything.state.instances_of(OTHER)
    # MID would fit the roomy "small" at once, but only "any" may hold it: it evicts there.
    status, _, headers = await chat(http, proxy, MID)
    assert status == 200 and headers["X-Proxy-Host"] == "any"
    assert small_only.state.load_calls[MID] == 0 and anything.state.unload_calls[OTHER] == 1
    async with http.get(f"{proxy.url}/proxy/models") as r:
        rows = {row["model"]: row for row in (await r.json())["data"]}
    assert rows[MID]["hosts"] == {"any": "loaded"}


async def test_admin_calls_take_a_host(fleet, http):
    proxy, emus = await fleet({"a": 20, "b": 20})
    async with http.post(f"{proxy.url}/proxy/models/load",
                         json={"model": SMALL, "host": "b"}) as r:
        body = await r.json()
        assert r.status == 200 and body["host"] == "b" and body["hosts"]["b"] == "loaded"
    async with http.post(f"{proxy.url}/proxy/models/load",
                         json={"model": SMALL, "host": "a"}) as r:
        assert r.status == 200 and (await r.json())["hosts"] == {"a": "loaded", "b": "loaded"}
    async with http.post(f"{proxy.url}/proxy/models/unload",
                         json={"model": SMALL, "host": "a"}) as r:
        assert r.status == 200 and (await r.json())["hosts"]["a"] == "unloaded"
    assert emus["b"].state.instances_of(SMALL) and not emus["a"].state.instances_of(SMALL)
    async with http.post(f"{proxy.url}/proxy/models/load",
                         json={"model": SMALL, "host": "nowhere"}) as r:
        body = await r.json()
        assert r.status == 400 and body["error"]["param"] == "host"
        assert "'a', 'b'" in body["error"]["message"] or "a, b" in body["error"]["message"]
    await proxy.engine.load(MID, host="a")
    async with http.post(f"{proxy.url}/proxy/clear?host=b") as r:
        assert r.status == 200 and (await r.json())["unloaded"] == [SMALL]
    assert emus["a"].state.instances_of(MID)     # the other host kept its model
    async with http.post(f"{proxy.url}/proxy/optimize", json={"host": "a"}) as r:
        assert r.status == 200 and set((await r.json())["hosts"]) == {"a"}


async def test_stats_and_models_show_every_host_and_where_each_model_lives(fleet, http):
    proxy, emus = await fleet({"a": 10, "b": 20})
    await proxy.engine.load(MID, host="b")
    async with http.get(f"{proxy.url}/proxy/stats") as r:
        stats = await r.json()
    assert set(stats["hosts"]) == {"a", "b"}
    assert stats["hosts"]["b"]["loaded_models"] == [MID]
    assert stats["hosts"]["a"]["memory"]["total_gb"] == 10.0
    assert stats["system_memory"]["total_gb"] == 30.0
    assert stats["hosts"]["b"]["url"] == emus["b"].url
    async with http.get(f"{proxy.url}/proxy/models") as r:
        rows = {row["model"]: row for row in (await r.json())["data"]}
    assert rows[MID]["host"] == "b" and rows[MID]["hosts"] == {"a": "unloaded", "b": "loaded"}
    assert rows[MID]["state"] == "loaded"


async def test_a_single_server_refuses_a_host_parameter(make_emulator, make_proxy, http):
    emu = await make_emulator(catalog=CATALOG)
    proxy = await make_proxy(emu.url)
    async with http.post(f"{proxy.url}/proxy/models/load",
                         json={"model": SMALL, "host": "a"}) as r:
        body = await r.json()
        assert r.status == 400 and body["error"]["param"] == "host"
        assert "upstreams" in body["error"]["message"]
    status, _, headers = await chat(http, proxy, SMALL)
    assert status == 200 and "X-Proxy-Host" not in headers


def test_check_validates_the_hosts():
    from proxy.errors import ConfigError
    with pytest.raises(ConfigError) as err:
        load_config({"upstreams": [
            {"name": "a", "url": "http://127.0.0.1:1"},
            {"name": "a", "url": "http://127.0.0.1:2"},
            {"name": "b c", "url": "http://127.0.0.1:3"},
            {"name": "d", "url": "gopher://x"},
            {"name": "e", "url": "http://10.9.8.7:1234"},
            {"url": "http://127.0.0.1:4"}],
            "placement": {"native_host": "zzz"},
            "models": {SMALL: {"host": "nope"}}})
    problems = err.value.problems
    assert "upstreams[1].name: 'a' names another host too" in problems
    assert any(p.startswith("upstreams[2].name: 'b c' must be") for p in problems)
    assert "upstreams[3].url: 'gopher://x' is not an http(s) URL with a host" in problems
    assert any(p.startswith("upstreams[4].budget_gb: required for a host on another machine")
               for p in problems)
    assert any(p.startswith("upstreams[5].name: required") for p in problems)
    assert any(p.startswith("placement.native_host: 'zzz' is not a host") for p in problems)
    assert any(p.startswith(f"models.{SMALL}.host: 'nope' is not a host") for p in problems)


async def test_a_task_that_names_a_host_places_its_model_there(fleet, http):
    proxy, emus = await fleet({"a": 20, "b": 20, "c": 20},
                              tasks={"coding": [{"model": MID, "host": "b"}, SMALL]})
    for host in ("a", "c"):      # a and c have loaded it fast; b's load time is a guess
        await proxy.engine.load(MID, host=host)
        await proxy.engine.unload(MID, host=host)
    assert proxy.engine.host("a").core.registry.reload_s(
        proxy.engine.host("a").entry(MID)) < proxy.engine.host("b").core.registry.reload_s(
        proxy.engine.host("b").entry(MID))
    for _ in range(2):
        status, _, headers = await chat(http, proxy, "auto:coding")
        assert status == 200 and headers["X-Proxy-Model"] == MID
        assert headers["X-Proxy-Host"] == "b"
        await proxy.engine.unload(MID, host="b")
    assert loads(emus, MID) == {"a": 1, "b": 2, "c": 1}
    status, _, headers = await chat(http, proxy, SMALL)   # a model no entry places: anywhere
    assert status == 200 and headers["X-Proxy-Host"] in {"a", "b", "c"}


def test_check_validates_the_hosts_tasks_name():
    from proxy.errors import ConfigError
    hosts = [{"name": "a", "url": "http://127.0.0.1:1"},
             {"name": "b", "url": "http://127.0.0.1:2", "models": ["lab/*"]}]
    with pytest.raises(ConfigError) as err:
        load_config({"upstreams": hosts, "models": {MID: {"host": "a"}}, "tasks": {
            "coding": [{"host": "a"}, {"model": "other/x", "host": "b"},
                       {"model": SMALL, "host": "zzz"}, {"model": MID, "host": "b"}],
            "chat": [{"model": SMALL, "hots": "a"}]}})
    assert err.value.problems == [
        "tasks.chat[0].hots: unknown key (known: host, model)"]
    with pytest.raises(ConfigError) as err:
        load_config({"upstreams": hosts, "models": {MID: {"host": "a"}}, "tasks": {
            "coding": [{"host": "a"}, {"model": "other/x", "host": "b"},
                       {"model": SMALL, "host": "zzz"}, {"model": MID, "host": "b"}]}})
    assert err.value.problems == [
        "tasks.coding[0].model: required (the model key that serves it)",
        "tasks.coding[1].host: host 'b' may not hold 'other/x' (its models: lab/*)",
        "tasks.coding[2].host: 'zzz' is not a host in upstreams (a, b)",
        f"tasks.coding[3].host: 'b' for '{MID}', but models.{MID}.host names 'a'; a model "
        "has one preferred host"]
    c = load_config({"upstreams": hosts, "tasks": {"coding": [SMALL, {"model": MID,
                                                                       "host": "b"}]}})
    assert c.task_models == {"coding": (SMALL, MID)} and c.preferred_host(MID) == "b"
    assert c.preferred_host(SMALL) is None



def test_a_models_preferred_host_is_its_own_else_one_its_tasks_name():
    from proxy.errors import ConfigError
    hosts = [{"name": "a", "url": "http://127.0.0.1:1"},
             {"name": "b", "url": "http://127.0.0.1:2"}]
    c = load_config({"upstreams": hosts, "models": {SMALL: {"host": "a"}}, "tasks": {
        "coding": [{"model": MID, "host": "b"}, {"model": SMALL}], "chat": [{"model": MID}]}})
    assert (c.preferred_host(SMALL), c.preferred_host(MID)) == ("a", "b")
    with pytest.raises(ConfigError) as err:     # two tasks, two hosts for one model
        load_config({"upstreams": hosts, "tasks": {"coding": [{"model": MID, "host": "a"}],
                                                   "chat": [{"model": MID, "host": "b"}]}})
    assert err.value.problems == [
        f"tasks.chat[0].host: 'b' for '{MID}', but tasks.coding[0].host names 'a'; a model "
        "has one preferred host"]
    with pytest.raises(ConfigError) as err:     # neither a key nor a {model, host} entry
        load_config({"tasks": {"coding": [5]}})
    assert err.value.problems == ["tasks.coding[0]: must be a string (got int 5)"]

def test_a_host_takes_what_it_does_not_set_from_upstream():
    c = load_config({"upstream": {"read_timeout_s": 12, "url": "http://127.0.0.1:9",
                                  "api_token": "secret"},
                     "upstreams": [{"name": "a", "url": "http://127.0.0.1:1"},
                                   {"name": "b", "url": "http://127.0.0.1:2",
                                    "read_timeout_s": 3}]})
    a, b = c.upstreams
    assert (a.read_timeout_s, b.read_timeout_s) == (12, 3)
    assert a.api_token is None and a.url == "http://127.0.0.1:1"   # its own address and token


async def test_a_host_does_not_preload_a_model_another_host_holds(fleet, http):
    proxy, emus = await fleet({"a": 20, "b": 20})
    await proxy.engine.load(MID, host="a")
    b = proxy.engine.by_name["b"].core
    b.preloader.queue(MID, 0.9, "a test's prediction")
    assert MID not in b.scheduler.pending and b.preloads.queued == 0
    b.preloader.queue(SMALL, 0.9, "a test's prediction")   # held nowhere: queued
    assert SMALL in b.scheduler.pending


async def test_an_lm_studio_sdk_connection_goes_to_the_host_it_names(fleet, http):
    proxy, emus = await fleet({"a": 20, "b": 20})
    await proxy.engine.load(SMALL, host="b")

    async def loaded_through(query: str) -> list[str]:
        async with http.ws_connect(f"{proxy.url}/llm{query}") as ws:
            await ws.send_json({"authVersion": 1, "clientIdentifier": "raw",
                                "clientPasskey": "LM Studio's own passkey"})
            assert (await ws.receive_json())["success"] is True
            await ws.send_json({"type": "rpcCall", "endpoint": "listLoaded", "callId": 1})
            reply = await ws.receive_json()
            return [m["modelKey"] for m in reply["result"]]

    assert await loaded_through("?host=b") == [SMALL]
    assert await loaded_through("") == []              # the default: the first host, a
    assert await loaded_through("?host=a") == []
    async with http.get(f"{proxy.url}/llm?host=nowhere",
                        headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                 "Sec-WebSocket-Version": "13",
                                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as r:
        body = await r.json()
        assert r.status == 400 and body["error"]["param"] == "host"


async def test_a_load_with_a_priority_is_placed_once_and_the_priority_kept_everywhere(fleet):
    proxy, emus = await fleet({"a": 20, "b": 20})
    await proxy.engine.load(SMALL, priority=9)
    assert sum(loads(emus, SMALL).values()) == 1
    assert {h.core.priority(SMALL) for h in proxy.engine.hosts} == {9}


async def test_the_hot_path_finds_copies_by_the_index_of_loaded_models(fleet):
    proxy, emus = await fleet({"a": 20, "b": 20})
    f = proxy.engine
    assert f._copies(SMALL, None) == []
    await f.load(SMALL, host="b")
    assert [name for name, _, _ in f._copies(SMALL, None)] == ["b"]
    await f.load(SMALL, host="a")
    assert sorted(name for name, _, _ in f._copies(SMALL, None)) == ["a", "b"]
    assert [name for name, _, _ in f._copies(SMALL, "b")] == ["a"]
    await f.unload(SMALL, host="b")
    assert [name for name, _, _ in f._copies(SMALL, None)] == ["a"]
    # A copy loaded outside the proxy is found too (the reconcile's state change).
    emus["b"].state.faults.load_gate.clear()
    await emus["b"].state.load(SMALL)
    await f.reconcile()
    assert sorted(name for name, _, _ in f._copies(SMALL, None)) == ["a", "b"]


def test_a_pin_and_priority_naming_a_host_apply_on_that_host_only():
    from proxy.fleet.hosts import host_config
    c = load_config({"upstreams": [{"name": "a", "url": "http://127.0.0.1:1"},
                                   {"name": "b", "url": "http://127.0.0.1:2"}],
                     "models": {SMALL: {"pinned": True, "priority": 9, "host": "a"}}})
    here, there = (host_config(c, h).models[SMALL] for h in c.upstreams)
    assert (here.pinned, here.priority) == (True, 9)
    default = load_config({}).model(SMALL)
    assert (there.pinned, there.priority) == (False, default.priority)


async def test_a_load_on_a_host_that_may_not_hold_the_model_is_refused(fleet, http):
    proxy, emus = await fleet({"small": 30, "any": 30}, {"small": ["lab/small-*"]})
    small_only = emus["small"]
    async with http.post(f"{proxy.url}/proxy/models/load",
                         json={"model": MID, "host": "small"}) as r:
        body = await r.json()
        assert r.status == 404 and body["error"]["code"] == "model_not_found"
        assert "'small'" in body["error"]["message"]
    assert small_only.state.load_calls[MID] == 0


async def test_requests_for_a_model_queued_on_a_host_join_that_queue(fleet, http):
    proxy, emus = await fleet({"a": 8, "b": 8})
    await proxy.engine.load(OTHER, host="a")
    await proxy.engine.load(COLD, host="b")
    gates = []
    streams = []
    for model in (OTHER, COLD):          # both hosts full with a model that is serving
        gate = asyncio.Event()
        emus["a" if model == OTHER else "b"].state.faults.stream_gate = gate
        gates.append(gate)
        r = await http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": model, "stream": True, "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}]})
        await r.content.readuntil(b"\n\n")
        streams.append(r)
    waiting = [asyncio.ensure_future(chat(http, proxy, MID)) for _ in range(10)]
    hosts = proxy.engine.hosts
    async with asyncio.timeout(10):
        while sum(h.core.registry.entries[MID].waiting for h in hosts) < 10:
            await asyncio.sleep(0.01)
    queued_on = [h.name for h in hosts if MID in h.core.scheduler.pending]
    assert len(queued_on) == 1                 # ten requests, one queue, one host
    for gate in gates:
        gate.set()
    for r in streams:
        await r.read()
        r.release()
    answers = await asyncio.gather(*waiting)
    assert {h["X-Proxy-Host"] for _, _, h in answers} == set(queued_on)
    assert sum(loads(emus, MID).values()) == 1


async def test_a_copy_loaded_outside_on_a_host_that_may_not_hold_it_is_not_served(fleet, http):
    proxy, emus = await fleet({"small": 30, "any": 30}, {"small": ["lab/small-*"]})
    small_only = emus["small"]
    await small_only.state.load(MID)           # someone loads it there by hand
    await proxy.engine.reconcile()
    status, _, headers = await chat(http, proxy, MID)
    assert status == 200 and headers["X-Proxy-Host"] == "any"


async def test_a_timeout_is_not_retried_on_another_host(fleet, http):
    proxy, emus = await fleet({"a": 20, "b": 20}, upstream={"read_timeout_s": 0.5})
    await proxy.engine.load(SMALL, host="a")
    emus["a"].state.faults.hang_inference = True
    status, body, _ = await chat(http, proxy, SMALL)
    assert status == 504 and body["error"]["code"] == "upstream_timeout"
    assert emus["b"].state.load_calls[SMALL] == 0
    assert not proxy.engine.by_name["a"].suspect


async def test_a_host_that_broke_off_after_its_response_head_is_not_retried(fleet, http):
    proxy, emus = await fleet({"a": 20, "b": 20})
    await proxy.engine.load(SMALL, host="a")
    emus["a"].state.faults.drop_stream_after_chunks = 0    # head sent, then the line drops
    status, body, _ = await chat(http, proxy, SMALL, stream=True)
    assert status == 502 and body["error"]["code"] == "upstream_error"
    assert emus["b"].state.load_calls[SMALL] == 0
    assert not proxy.engine.by_name["a"].suspect


async def test_a_models_use_on_every_host_adds_up_in_stats_and_models(fleet, http):
    proxy, emus = await fleet({"a": 20, "b": 20})
    served = {"a": 0, "b": 0}
    for host in ("a", "b"):
        await proxy.engine.load(MID, host=host)
        for _ in range(3 if host == "a" else 2):
            status, _, headers = await chat(http, proxy, MID)
            served[headers["X-Proxy-Host"]] += 1
        await proxy.engine.unload(MID, host=host)
    assert served == {"a": 3, "b": 2}
    async with http.get(f"{proxy.url}/proxy/stats") as r:
        stats = await r.json()
    row = stats["models"][MID]
    assert row["requests"] == 5 and row["completion_tokens"] > 0
    assert stats["top_models_by_usage"][0]["model"] == MID
    assert stats["top_models_by_usage"][0]["requests"] == 5
    async with http.get(f"{proxy.url}/proxy/models") as r:
        rows = {x["model"]: x for x in (await r.json())["data"]}
    assert rows[MID]["requests"] == 5
    assert proxy.engine.usage(MID).latency.count == 5


async def test_the_engines_log_lines_name_the_host_they_work_for(fleet, http, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="proxy")
    proxy, emus = await fleet({"a": 20, "b": 20})
    await proxy.engine.load(SMALL, host="b")            # an admin load on one host
    status, _, headers = await chat(http, proxy, MID)   # a load the placer starts
    placed = headers["X-Proxy-Host"]
    engine_lines = [r.getMessage() for r in caplog.records if r.name == "proxy.engine"]
    assert any(m.startswith(f"host b: loaded {SMALL}") for m in engine_lines), engine_lines
    assert any(m.startswith(f"host {placed}: loaded {MID}") for m in engine_lines)
    assert all(m.startswith(("host a: ", "host b: ")) for m in engine_lines), engine_lines
