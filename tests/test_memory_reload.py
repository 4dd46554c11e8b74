"""A reload that changes memory settings is judged at once — sampled, pressure re-evaluated and
relieved — not after the monitoring sleep (memory.monitoring_interval, 30 s by default); in a
fleet, on each host."""
from __future__ import annotations

import asyncio

import pytest

from proxy.server.reload import RELOADER

from .conftest import proxy_config
from .test_fleet import CATALOG, MID, SMALL, fleet_config

MODEL = "qwen/qwen3-4b"
ADMIN = {"Authorization": "Bearer adm"}
AUTH = {"auth.admin_token": "adm"}

pytestmark = pytest.mark.timeout(30)


class Unloads:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.arrived = asyncio.Event()

    def on_unload(self, model: str, reason: str) -> None:
        self.seen.append((model, reason))
        self.arrived.set()


@pytest.fixture
async def reloadable(make_proxy, emulator):
    box: dict = {}
    proxy = await make_proxy(emulator.url, config=proxy_config(emulator.url, **AUTH),
                             app_kwargs={"config_source": lambda: box["next"]})
    return proxy, box


async def stats(http, proxy) -> dict:
    async with http.get(f"{proxy.url}/proxy/stats", headers=ADMIN) as r:
        assert r.status == 200
        return await r.json()


async def reload(http, proxy) -> None:
    async with http.post(f"{proxy.url}/proxy/reload", headers=ADMIN) as r:
        assert r.status == 200, await r.text()


async def test_a_larger_budget_shows_at_once(reloadable, emulator, http):
    proxy, box = reloadable
    assert (await stats(http, proxy))["system_memory"]["total_gb"] == 64
    assert proxy.engine.config.memory.monitoring_interval == 30
    box["next"] = proxy_config(emulator.url, **AUTH, **{"memory.budget_gb": 80})
    await reload(http, proxy)
    assert (await stats(http, proxy))["system_memory"]["total_gb"] == 80
    # As SIGHUP does it: judged within the reload itself, before any other task runs.
    box["next"] = proxy_config(emulator.url, **AUTH, **{"memory.budget_gb": 96})
    assert proxy.app[RELOADER].reload(proxy.app)["reloaded"]
    assert proxy.engine.report()["system_memory"]["total_gb"] == 96


async def test_a_budget_below_the_resident_models_evicts_at_once(reloadable, emulator, http):
    proxy, box = reloadable
    await proxy.engine.load(MODEL)
    unloads = Unloads()
    proxy.engine.add_listener(unloads)
    box["next"] = proxy_config(emulator.url, **AUTH, **{"memory.budget_gb": 1})
    await reload(http, proxy)
    assert (await stats(http, proxy))["memory_pressure"] == "critical"
    await asyncio.wait_for(unloads.arrived.wait(), 10)   # not the 30 s monitoring sleep
    assert unloads.seen == [(MODEL, "pressure")]


async def test_a_fleet_judges_each_host_at_once(make_emulator, make_proxy, http):
    emus = {n: await make_emulator(catalog=CATALOG) for n in ("a", "b")}
    box: dict = {}

    def config(max_usage_percent: float):
        # Pinned: at high pressure they stay, so the level stays to be read.
        return fleet_config([(n, emus[n].url, 12) for n in emus], auth={"admin_token": "adm"},
                            models={MID: {"pinned": True}, SMALL: {"pinned": True}},
                            memory={"min_free_memory_gb": 0,
                                    "max_memory_usage_percent": max_usage_percent})
    proxy = await make_proxy("", config=config(100),
                             app_kwargs={"config_source": lambda: box["next"]})
    await proxy.engine.load(MID, host="a")       # 6 of 12 GB: 50 %
    await proxy.engine.load(SMALL, host="b")     # 2.4 of 12 GB: 20 %
    hosts = (await stats(http, proxy))["hosts"]
    assert (hosts["a"]["memory_pressure"], hosts["b"]["memory_pressure"]) == ("low", "low")
    box["next"] = config(40)
    assert proxy.app[RELOADER].reload(proxy.app)["reloaded"]   # as SIGHUP does it
    levels = [h.core.memory_pressure.value for h in proxy.engine.hosts]
    assert levels == ["high", "normal"]          # judged within the reload itself
    box["next"] = config(15)
    await reload(http, proxy)
    hosts = (await stats(http, proxy))["hosts"]
    assert (hosts["a"]["memory_pressure"], hosts["b"]["memory_pressure"]) == ("high", "high")
