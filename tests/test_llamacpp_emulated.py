"""The llama.cpp backend against the router emulator (`--flavor llamacpp`): the scenarios the
real router also runs, and the router's own quirks that the real one is told not to show."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from proxy.emulator.catalog import GB, CatalogModel
from proxy.emulator.llamacpp import RouterEmulator, start_router_emulator

from . import llamacpp_scenarios as s

CATALOG = [CatalogModel("tiny-chat-small", size_bytes=GB // 2, load_time_s=0.05),
           CatalogModel("tiny-chat-large", size_bytes=GB, load_time_s=0.05),
           CatalogModel("tiny-embed", type="embedding", size_bytes=GB // 10, load_time_s=0.05),
           CatalogModel("tiny-broken", size_bytes=GB // 10, load_time_s=0.05)]


@dataclass
class EmulatedRouter:
    emu: RouterEmulator
    chat_small: str = "tiny-chat-small"
    chat_large: str = "tiny-chat-large"
    embedding: str = "tiny-embed"
    broken: str = "tiny-broken"

    @property
    def url(self) -> str:
        return self.emu.url

    @property
    def state(self) -> Any:
        return self.emu.state

    async def restart(self) -> None:
        self.emu.state.restart()


@pytest.fixture
async def make_router(tmp_path: Path) -> AsyncIterator[Any]:
    started: list[RouterEmulator] = []

    async def make(**options: Any) -> EmulatedRouter:
        options = {"models_max": 0, "autoload": False, "load_time_scale": 1.0,
                   "broken": frozenset({"tiny-broken"}), "models_dir": tmp_path, **options}
        emu = await start_router_emulator(CATALOG, **options)
        started.append(emu)
        return EmulatedRouter(emu)

    yield make
    for emu in started:
        await emu.close()


@pytest.fixture
async def router(make_router: Any) -> EmulatedRouter:
    return await make_router()


@pytest.mark.parametrize("scenario", [
    s.cold_model_loads_through_the_proxy, s.the_proxy_evicts_for_a_budget_of_one,
    s.streaming_carries_usage, s.embeddings_are_served, s.a_broken_file_is_a_failed_load,
    s.a_restarted_router_is_reconciled], ids=lambda f: f.__name__)
async def test_scenario(scenario, router, make_proxy, http):
    await scenario(router, make_proxy, http)
    assert router.state.lru_evictions == []      # the router never evicted by itself


async def test_the_routers_own_lru_eviction_is_recorded_as_the_backends(make_router,
                                                                        make_proxy, http):
    router = await make_router(models_max=1)      # against the recommended settings
    proxy = await s.proxy_for(make_proxy, router, **{"memory.budget_gb": 64})
    assert (await s.chat(http, proxy, router.chat_small))[0] == 200
    assert (await s.chat(http, proxy, router.chat_large))[0] == 200
    assert router.state.lru_evictions == [router.chat_small]
    small = proxy.engine.entry(router.chat_small)
    await s.until(lambda: small.status.value == "unloaded")
    assert dict(small.evictions) == {"backend": 1} and small.last_error is None


async def test_file_sizes_on_the_routers_host_are_the_footprints_until_loaded(router,
                                                                              make_proxy):
    proxy = await s.proxy_for(make_proxy, router, models={})
    e = proxy.engine.entry(router.chat_large)
    assert e.size_bytes == GB                       # the .gguf's size, before any load
    assert proxy.engine.footprint_bytes(e) == pytest.approx(1.2 * GB)


async def test_the_router_answers_like_the_real_one(router, http):
    async with http.post(router.url + "/models/load", json={"model": "nope"}) as r:
        assert r.status == 404 and (await r.json())["error"]["message"] == "File Not Found"
    async with http.post(router.url + "/models/load", json={"model": router.chat_small}) as r:
        assert r.status == 200 and await r.json() == {"success": True}
    assert await s.router_status(http, router, router.chat_small) == "loading"
    async with http.post(router.url + "/models/load", json={"model": router.chat_small}) as r:
        assert r.status == 400
        assert (await r.json())["error"]["message"] == "model is already running"
    async with http.post(router.url + "/v1/chat/completions",
                         json={"model": router.chat_large, **s.CHAT}) as r:
        assert r.status == 400
        assert (await r.json())["error"]["message"] == "model is not loaded"
    async with http.post(router.url + "/models/unload", json={"model": router.chat_large}) as r:
        assert (await r.json())["error"]["message"] == "model is not running"


async def test_lm_studio_sdk_connections_are_refused_with_the_reason(router, make_proxy, http):
    proxy = await s.proxy_for(make_proxy, router)
    async with http.get(proxy.url + "/llm") as r:
        assert r.status == 404
        assert "no native client protocol" in (await r.json())["error"]["message"]


async def test_a_load_the_router_does_not_finish_in_time_is_a_timeout(make_router, make_proxy,
                                                                      http):
    router = await make_router(load_time_scale=100.0)          # 5 s per load
    proxy = await s.proxy_for(make_proxy, router, **{"upstream.load_timeout_s": 0.2})
    status, body = await s.chat(http, proxy, router.chat_small)
    assert status == 504 and "did not finish the load" in body["error"]["message"], body
    assert await s.router_status(http, router, router.chat_small) == "loading"
