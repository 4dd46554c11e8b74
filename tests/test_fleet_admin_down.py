"""Admin calls for the whole fleet (no `host`) while one host cannot be reached: every other host
is acted on, and the answer says what was done on each host and names each host that failed and
why; when no host could be acted on, the answer is the error, naming each host."""
from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import pytest

from proxy.configload import load_config
from proxy.emulator.catalog import CatalogModel
from proxy.engine.clock import ManualClock
from .fakes import GB

pytestmark = pytest.mark.timeout(60)

SMALL, MID = "lab/small-2b", "lab/mid-6b"
CATALOG = [CatalogModel(key=SMALL, size_bytes=2 * GB, memory_bytes=2 * GB, load_time_s=0.0),
           CatalogModel(key=MID, size_bytes=5 * GB, memory_bytes=5 * GB, load_time_s=0.0)]
HOSTS = ("big", "mid", "small")


@pytest.fixture
async def fleet(make_emulator, make_proxy) -> Any:
    """SMALL loaded on big, mid and small (idle after a minute); MID on mid and small."""
    emus = {n: await make_emulator(catalog=CATALOG) for n in HOSTS}
    proxy = await make_proxy("", app_kwargs={"clock": ManualClock()}, config=load_config({
        "upstreams": [{"name": n, "url": emus[n].url, "budget_gb": 20} for n in HOSTS],
        "storage": {"enabled": False}, "eviction": {"hold": 0},
        "models": {SMALL: {"ttl_s": 60}},
        "memory": {"min_free_memory_gb": 0, "max_memory_usage_percent": 100}}))
    for n in HOSTS:
        await proxy.engine.load(SMALL, host=n)
    for n in ("mid", "small"):
        await proxy.engine.load(MID, host=n)
    return proxy, emus


async def lose(proxy: Any, emus: dict[str, Any], name: str, how: str) -> None:
    """`unreachable`: its server is gone and nothing has noticed yet; `down`: its engine's
    reconcile has seen it gone (the host is down)."""
    await emus[name].close()
    if how == "down":
        await proxy.engine.by_name[name].core.reconcile()
        assert not proxy.engine.by_name[name].up


async def post(http: Any, url: str, body: dict[str, Any]) -> tuple[int, dict]:
    async with http.post(url, json=body) as r:
        return r.status, await r.json()


def instances(emus: dict[str, Any], *names: str) -> dict[str, list]:
    return {n: [i for key in (SMALL, MID) for i in emus[n].state.instances_of(key)]
            for n in names}


def mid_failed(body: dict[str, Any], how: str) -> None:
    failed = body["failed"]
    assert list(failed) == ["mid"] and failed["mid"]["code"] == "upstream_unreachable"
    message = failed["mid"]["message"]
    if how == "down":
        assert message.startswith("down, not asked: cannot reach"), message
    else:
        assert message.startswith("cannot reach"), message


@pytest.mark.parametrize("how", ["unreachable", "down"])
async def test_a_clear_clears_every_host_it_reaches_and_names_the_one_it_could_not(
        fleet, http, how):
    proxy, emus = fleet
    await lose(proxy, emus, "mid", how)
    status, body = await post(http, f"{proxy.url}/proxy/clear", {})
    assert status == 200, body
    assert instances(emus, "big", "small") == {"big": [], "small": []}
    assert body["hosts"] == {"big": {"unloaded": [SMALL]},
                             "small": {"unloaded": [MID, SMALL]}}
    assert body["unloaded"] == [MID, SMALL]
    mid_failed(body, how)
    assert not proxy.engine.by_name["mid"].up   # an unreachable host is set aside meanwhile


@pytest.mark.parametrize("how", ["unreachable", "down"])
async def test_an_unload_with_no_host_unloads_it_wherever_it_can_and_names_where_not(
        fleet, http, how):
    proxy, emus = fleet
    await lose(proxy, emus, "mid", how)
    status, body = await post(http, f"{proxy.url}/proxy/models/unload", {"model": SMALL})
    assert status == 200, body
    assert not emus["big"].state.instances_of(SMALL)
    assert not emus["small"].state.instances_of(SMALL) and emus["small"].state.instances_of(MID)
    assert (body["unloaded"], body["unloaded_on"]) == (True, ["big", "small"])
    mid_failed(body, how)


async def test_a_host_known_down_is_not_asked_so_a_silent_one_holds_nothing_up(fleet, http):
    """mid is down, and then its port accepts connections but never answers (a frozen
    server): a clear does not wait for it (upstream.read_timeout_s is minutes)."""
    proxy, emus = fleet
    await lose(proxy, emus, "mid", "down")
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1",
                                        urlsplit(emus["mid"].url).port)
    try:
        status, body = await asyncio.wait_for(
            post(http, f"{proxy.url}/proxy/clear", {}), 10)
    finally:
        silent.close()
    assert status == 200 and set(body["hosts"]) == {"big", "small"}
    mid_failed(body, "down")


async def test_optimize_with_no_host_answers_for_the_hosts_it_reached(fleet, http):
    proxy, emus = fleet
    await lose(proxy, emus, "mid", "unreachable")
    proxy.engine.clock.advance(120)     # SMALL idle past its ttl_s on every host
    status, body = await post(http, f"{proxy.url}/proxy/optimize", {})
    assert status == 200, body
    assert {n: h["unloaded_idle"] for n, h in body["hosts"].items()} == {
        "big": [SMALL], "small": [SMALL]}
    assert body["unloaded_idle"] == [SMALL] and not emus["big"].state.instances_of(SMALL)
    mid_failed(body, "unreachable")


@pytest.mark.parametrize("how", ["unreachable", "down"])
async def test_when_no_host_could_be_acted_on_the_answer_is_the_error_naming_each(
        fleet, http, how):
    proxy, emus = fleet
    for n in HOSTS:
        await lose(proxy, emus, n, how)
    status, body = await post(http, f"{proxy.url}/proxy/clear", {})
    assert status == 502 and body["error"]["code"] == "upstream_unreachable", body
    message = body["error"]["message"]
    assert message.startswith("No host could be cleared: 'big': "), message
    assert "; 'mid': " in message and "; 'small': " in message
    status, body = await post(http, f"{proxy.url}/proxy/models/unload", {"model": MID})
    assert status == 502 and body["error"]["code"] == "upstream_unreachable", body
    assert body["error"]["message"].startswith(f"'{MID}' could be unloaded on no host: 'mid': ")


@pytest.mark.parametrize("how", ["unreachable", "down"])
async def test_a_named_host_that_cannot_be_reached_is_that_hosts_error(fleet, http, how):
    """Named, a host is asked even when known down, and its own error is the answer (not the
    fleet-wide 'No host could be cleared: ...')."""
    proxy, emus = fleet
    await lose(proxy, emus, "mid", how)
    status, body = await post(http, f"{proxy.url}/proxy/clear", {"host": "mid"})
    assert status == 502 and body["error"]["code"] == "upstream_unreachable"
    assert body["error"]["message"].startswith("cannot reach"), body
    assert instances(emus, "big")["big"]       # the others untouched


async def test_a_down_hosts_memory_is_counted_nowhere(fleet, http):
    """The fleet's memory is that of the hosts up; /metrics has no memory series for a host
    that is down (its last figures are not its memory now), only proxy_host_up 0."""
    proxy, emus = fleet
    async with http.get(f"{proxy.url}/proxy/stats") as r:
        assert (await r.json())["system_memory"]["total_gb"] == pytest.approx(60.0)
    await lose(proxy, emus, "small", "down")
    async with http.get(f"{proxy.url}/proxy/stats") as r:
        assert (await r.json())["system_memory"]["total_gb"] == pytest.approx(40.0)
    async with http.get(f"{proxy.url}/metrics") as r:
        text = await r.text()
    assert 'proxy_host_up{host="small"} 0.0' in text
    assert 'proxy_host_memory_total_bytes{host="big"}' in text
    assert 'host="small"' not in "".join(
        line for line in text.splitlines() if line.startswith("proxy_host_memory_"))
