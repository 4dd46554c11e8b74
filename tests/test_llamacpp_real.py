"""The llama.cpp backend against a real llama-server in router mode, over tiny GGUF models
(started with the recommended `--models-max 0 --no-models-autoload`). Skipped with one line
when the binary is not built; a failure when REQUIRE_LLAMA_SERVER=1."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from tests.llama.fixtures import llama_server_or_skip
from tests.llama.router import LlamaRouter

from . import llamacpp_scenarios as s

llama_server_or_skip(module_level=True)


@dataclass
class RealRouter:
    router: LlamaRouter

    @property
    def url(self) -> str:
        return self.router.url

    @property
    def chat_small(self) -> str:
        return self.router.models.chat_small

    @property
    def chat_large(self) -> str:
        return self.router.models.chat_large

    @property
    def embedding(self) -> str:
        return self.router.models.embedding

    @property
    def broken(self) -> str:
        return self.router.models.broken

    async def restart(self) -> None:
        await asyncio.to_thread(self.router.restart)   # SIGTERM; the same port again


@pytest.fixture
def router(llama_router: LlamaRouter) -> RealRouter:
    return RealRouter(llama_router)


@pytest.mark.parametrize("scenario", [
    s.cold_model_loads_through_the_proxy, s.the_proxy_evicts_for_a_budget_of_one,
    s.streaming_carries_usage, s.embeddings_are_served, s.a_broken_file_is_a_failed_load,
    s.a_restarted_router_is_reconciled], ids=lambda f: f.__name__)
async def test_scenario(scenario, router, make_proxy, http):
    await scenario(router, make_proxy, http)


async def test_a_models_memory_is_its_child_process_rss(router, make_proxy, http):
    proxy = await s.proxy_for(make_proxy, router, models={})
    assert (await s.chat(http, proxy, router.chat_large))[0] == 200
    await proxy.engine.reconcile()
    e = proxy.engine.entry(router.chat_large)
    children = await asyncio.to_thread(router.router.children)
    rss = [c.memory_info().rss for c in children]
    assert proxy.engine.registry.footprint_source(e) == "reported"
    assert len(rss) == 1 and 0.5 * rss[0] <= e.reported_bytes <= 2 * rss[0]


async def test_the_routers_own_lru_eviction_is_recorded_as_the_backends(make_llama_router,
                                                                        make_proxy, http):
    router = RealRouter(make_llama_router("--models-max", "1"))   # against the advice
    proxy = await s.proxy_for(make_proxy, router, **{"memory.budget_gb": 64})
    assert (await s.chat(http, proxy, router.chat_small))[0] == 200
    assert (await s.chat(http, proxy, router.chat_large))[0] == 200
    small = proxy.engine.entry(router.chat_small)
    await s.until(lambda: small.status.value == "unloaded")
    assert dict(small.evictions) == {"backend": 1} and small.last_error is None
    assert await s.router_status(http, router, router.chat_small) == "unloaded"
