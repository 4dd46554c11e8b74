"""The Ollama backend (upstream.kind: ollama) against the Ollama emulator: loads through
keep_alive, unloads with keep_alive 0, memory from /api/ps, Ollama's own evictions and its
bounded queue."""
from __future__ import annotations

import asyncio
import math
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import openai
import pytest

from proxy.config import UpstreamConfig
from proxy.emulator.catalog import GB, CatalogModel
from proxy.emulator.ollama import OllamaEmulator, start_ollama_emulator
from proxy.emulator.ollama_state import MAX_QUEUE_MESSAGE, SettableClock
from proxy.engine.lifecycle import ModelStatus
from proxy.engine.reconcile import EVICTED_BY_BACKEND
from proxy.upstream import create_upstream
from proxy.upstream.base import ApiLevel
from proxy.upstream.ollama import OllamaProtocol

CATALOG = [CatalogModel("llama3.2", size_bytes=2 * GB, memory_bytes=int(2.6 * GB)),
           CatalogModel("qwen3:8b", size_bytes=5 * GB, memory_bytes=int(6.1 * GB)),
           CatalogModel("gemma3", size_bytes=3 * GB, memory_bytes=int(3.5 * GB)),
           CatalogModel("all-minilm", type="embedding", size_bytes=int(0.05 * GB))]
CHAT = {"messages": [{"role": "user", "content": "Hello"}]}


@pytest.fixture
async def make_ollama() -> AsyncIterator[Callable[..., Awaitable[OllamaEmulator]]]:
    started: list[OllamaEmulator] = []

    async def make(catalog: list[CatalogModel] = CATALOG, **options: Any) -> OllamaEmulator:
        options.setdefault("clock", SettableClock())
        emu = await start_ollama_emulator(catalog, **options)
        started.append(emu)
        return emu

    yield make
    for emu in started:
        await emu.close()


@pytest.fixture
async def backend_for() -> AsyncIterator[Callable[[str], Awaitable[OllamaProtocol]]]:
    made: list[OllamaProtocol] = []

    async def make(url: str) -> OllamaProtocol:
        backend = create_upstream(UpstreamConfig(kind="ollama", url=url))
        assert isinstance(backend, OllamaProtocol)
        await backend.start()
        made.append(backend)
        return backend

    yield make
    for b in made:
        await b.close()


def ollama_proxy(make_proxy: Callable[..., Awaitable[Any]], url: str, **overrides: Any):
    return make_proxy(url, **{"upstream.kind": "ollama", **overrides})


async def chat(http: aiohttp.ClientSession, url: str, model: str) -> tuple[int, Any]:
    async with http.post(f"{url}/v1/chat/completions", json={"model": model, **CHAT}) as r:
        return r.status, await r.json()


async def test_load_unload_and_memory_from_ps(make_ollama, backend_for):
    emu = await make_ollama()
    backend = await backend_for(emu.url)
    assert await backend.detect() is ApiLevel.MANAGED
    caps = backend.capabilities
    assert caps.manages_loading and caps.reports_memory and caps.self_evicts
    assert not caps.multi_instance and not caps.native_clients

    result = await backend.load("llama3.2", {})
    runner = emu.state.runners["llama3.2:latest"]
    assert result.instance_id == "llama3.2:latest"
    assert math.isinf(runner.keep_alive_s)          # keep_alive -1: Ollama never expires it
    model = {m.key: m for m in await backend.list_models()}["llama3.2:latest"]
    assert model.instance_ids == ("llama3.2:latest",) and model.aliases == ("llama3.2",)
    assert model.memory_bytes == int(2.6 * GB) and model.size_bytes == 2 * GB
    assert model.resident["size_vram"] == int(2.6 * GB)
    assert model.resident["expires_at"].startswith("23")   # "forever": Go's now + MaxInt64 ns

    await backend.unload(result.instance_id)
    assert emu.state.runners == {}
    assert not {m.key: m for m in await backend.list_models()}["llama3.2:latest"].loaded
    await backend.unload(result.instance_id)        # gone already: nothing to do, no error


async def test_an_embedding_model_is_loaded_by_an_embed_with_no_input(make_ollama, backend_for):
    emu = await make_ollama()
    backend = await backend_for(emu.url)
    await backend.load("all-minilm", {})
    assert "all-minilm:latest" in emu.state.runners
    models = {m.key: m for m in await backend.list_models()}
    assert models["all-minilm:latest"].type == "embedding"
    assert models["llama3.2:latest"].type == "llm"
    await backend.unload("all-minilm:latest")
    assert emu.state.runners == {}


async def test_a_load_ollama_refuses_for_memory_lets_the_engine_evict(make_ollama, backend_for):
    emu = await make_ollama()
    emu.state.load_fail["qwen3:8b"] = ("model requires more system memory (6.1 GiB) than is "
                                       "available (3.2 GiB)")
    backend = await backend_for(emu.url)
    with pytest.raises(Exception) as caught:
        await backend.load("qwen3:8b", {})
    assert caught.value.out_of_memory and "more system memory" in caught.value.message


async def test_keep_alive_expiry_shows_in_ps(make_ollama, backend_for, http):
    emu = await make_ollama()
    backend = await backend_for(emu.url)
    async with http.post(f"{emu.url}/api/generate",
                         json={"model": "gemma3", "keep_alive": "5m"}) as r:
        assert r.status == 200 and (await r.json())["done_reason"] == "load"
    assert {m.key for m in await backend.list_models() if m.loaded} == {"gemma3:latest"}
    emu.state.clock.advance(301)
    assert not any(m.loaded for m in await backend.list_models())
    assert emu.state.evictions == [("gemma3:latest", "keep_alive expired")]


async def test_the_proxy_loads_with_keep_alive_forever_and_serves(make_ollama, make_proxy,
                                                                     http):
    emu = await make_ollama()
    proxy = await ollama_proxy(make_proxy, emu.url)
    status, body = await chat(http, proxy.url, "llama3.2")
    assert status == 200 and body["choices"][0]["message"]["content"]
    assert emu.state.load_calls == {"llama3.2:latest": 1}
    assert math.isinf(emu.state.runners["llama3.2:latest"].keep_alive_s)
    assert proxy.engine.entry("llama3.2:latest").status is ModelStatus.LOADED
    assert await proxy.engine.unload("llama3.2")
    assert emu.state.runners == {}


async def test_the_short_name_and_the_listed_name_are_one_model(make_ollama, make_proxy,
                                                                http):
    emu = await make_ollama()
    proxy = await ollama_proxy(make_proxy, emu.url)
    async with http.get(f"{proxy.url}/v1/models") as r:
        listed = [m["id"] for m in (await r.json())["data"]]
    assert "llama3.2:latest" in listed and "qwen3:8b" in listed
    assert (await chat(http, proxy.url, "llama3.2"))[0] == 200
    assert (await chat(http, proxy.url, "llama3.2:latest"))[0] == 200
    assert emu.state.load_calls == {"llama3.2:latest": 1}
    assert proxy.engine.usage("llama3.2:latest").requests == 2
    async with http.get(f"{proxy.url}/v1/models/llama3.2:latest") as r:
        assert r.status == 200 and (await r.json())["id"] == "llama3.2:latest"


async def test_an_eviction_ollama_made_by_itself_is_reconciled(make_ollama, make_proxy, http):
    emu = await make_ollama(max_loaded_models=1)
    proxy = await ollama_proxy(make_proxy, emu.url)
    assert (await chat(http, proxy.url, "llama3.2"))[0] == 200
    assert (await chat(http, proxy.url, "gemma3"))[0] == 200
    assert emu.state.evictions == [("llama3.2:latest", "OLLAMA_MAX_LOADED_MODELS")]

    # Seen right after the load that caused it (self_evicts), not at the next reconcile tick.
    dropped = proxy.engine.entry("llama3.2:latest")
    assert dropped.status is ModelStatus.UNLOADED and dropped.last_error is None
    assert dropped.evictions[EVICTED_BY_BACKEND] == 1
    assert proxy.engine.entry("gemma3:latest").status is ModelStatus.LOADED
    assert (await chat(http, proxy.url, "llama3.2"))[0] == 200   # loads again, no error
    assert emu.state.load_calls["llama3.2:latest"] == 2


async def test_the_footprint_is_what_ps_reports(make_ollama, make_proxy, http):
    emu = await make_ollama()
    proxy = await ollama_proxy(make_proxy, emu.url)
    assert (await chat(http, proxy.url, "qwen3:8b"))[0] == 200
    e = proxy.engine.entry("qwen3:8b")      # a tag of its own: the key as it is
    assert proxy.engine.footprint_bytes(e) == int(6.1 * GB)   # not the file's 5 GB x factor
    assert proxy.engine.registry.footprint_source(e) == "reported"


async def test_a_full_queue_gives_a_503_with_its_own_cause(make_ollama, make_proxy, http):
    emu = await make_ollama(max_queue=1)
    proxy = await ollama_proxy(make_proxy, emu.url)
    assert (await chat(http, proxy.url, "llama3.2"))[0] == 200
    # Someone else's load holds Ollama's scheduler; one more request waits behind it.
    emu.state.load_gate = asyncio.Event()
    busy = [asyncio.create_task(native_load(http, emu.url, "qwen3:8b")),
            asyncio.create_task(chat(http, emu.url, "llama3.2"))]
    try:
        await asyncio.wait_for(emu.state.wait_for(lambda: emu.state.waiting == 1), 10)

        # Loaded: forwarded, and Ollama's answer relayed as it is (bounded: a queue that does
        # not turn it away would hold it behind the gate).
        status, body = await asyncio.wait_for(chat(http, proxy.url, "llama3.2"), 10)
        assert status == 503
        assert body == {"error": {"message": MAX_QUEUE_MESSAGE, "type": "api_error",
                                  "param": None, "code": None}}
        async with http.post(f"{proxy.url}/v1/chat/completions",
                             json={"model": "gemma3", **CHAT}) as r:   # cold: the proxy loads
            status, body, retry = r.status, await r.json(), r.headers.get("Retry-After")
        assert status == 503 and retry is not None
        assert body["error"]["code"] == "upstream_busy"
        assert "OLLAMA_MAX_QUEUE" in body["error"]["message"]
        assert MAX_QUEUE_MESSAGE in body["error"]["message"]
        assert emu.state.rejected == 2
    finally:
        emu.state.load_gate.set()
        done = await asyncio.gather(*busy)
    assert done == [200, (200, done[1][1])]


async def native_load(http: aiohttp.ClientSession, url: str, model: str) -> int:
    async with http.post(f"{url}/api/generate", json={"model": model}) as r:
        return r.status


async def test_an_eviction_ollama_made_by_itself_is_written_to_the_history(
        make_ollama, make_proxy, http, tmp_path):
    """Its statistics were written before it was evicted: the eviction marks them to be
    written again, so that a restart keeps it."""
    from proxy.store import UsageStore
    path = tmp_path / "history.sqlite3"
    emu = await make_ollama(max_loaded_models=1)
    proxy = await ollama_proxy(make_proxy, emu.url, **{"storage.enabled": True,
                                                       "storage.path": str(path)})
    assert (await chat(http, proxy.url, "llama3.2"))[0] == 200
    await proxy.engine.flush()
    assert (await chat(http, proxy.url, "gemma3"))[0] == 200   # Ollama evicts llama3.2
    await proxy.engine.flush()
    store = UsageStore(path)
    assert store.open()
    try:
        saved = store.load()["stats"]["llama3.2:latest"]
    finally:
        store.close()
    assert saved["evictions"] == {EVICTED_BY_BACKEND: 1}


async def test_the_models_row_shows_how_much_of_it_is_on_the_gpu(make_ollama, make_proxy, http):
    """docs/backends.md: Ollama's size_vram and expires_at are shown with the footprint (they
    were kept inside the engine only), while the model is loaded."""
    emu = await make_ollama(vram_bytes=4 * GB)
    proxy = await ollama_proxy(make_proxy, emu.url)
    assert (await chat(http, proxy.url, "qwen3:8b"))[0] == 200

    async def row() -> dict[str, Any]:
        async with http.get(f"{proxy.url}/proxy/models") as r:
            return {m["model"]: m for m in (await r.json())["data"]}["qwen3:8b"]

    loaded = await row()
    assert loaded["footprint_mb"] == round(6.1 * GB / 1e6)        # `size`: RAM and VRAM
    assert loaded["backend"]["size_vram"] == 4 * GB                # what fitted the GPU
    assert loaded["backend"]["expires_at"].startswith("23")        # keep_alive -1: never
    assert loaded["backend"]["family"]                             # from /api/tags
    async with http.get(f"{proxy.url}/proxy/stats") as r:
        assert (await r.json())["models"]["qwen3:8b"]["backend"] == loaded["backend"]

    status, body = await unload(http, proxy.url, "qwen3:8b")
    assert status == 200 and body["unloaded"] is True
    unloaded = await row()
    assert "size_vram" not in unloaded["backend"] and "expires_at" not in unloaded["backend"]
    assert unloaded["backend"]["family"] == loaded["backend"]["family"]


async def unload(http: aiohttp.ClientSession, url: str, model: str) -> tuple[int, Any]:
    async with http.post(f"{url}/proxy/models/unload", json={"model": model}) as r:
        return r.status, await r.json()


async def test_the_sdks_models_retrieve_takes_the_short_name_as_chat_does(make_ollama,
                                                                         make_proxy):
    """`chat.completions.create(model="qwen/qwen3-4b")` served `qwen/qwen3-4b:latest` while
    `models.retrieve("qwen/qwen3-4b")` was a 404."""
    emu = await make_ollama(CATALOG + [CatalogModel("qwen/qwen3-4b", size_bytes=2 * GB)])
    proxy = await ollama_proxy(make_proxy, emu.url)
    async with openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x",
                                  max_retries=0) as client:
        for name, listed in (("qwen/qwen3-4b", "qwen/qwen3-4b:latest"),
                             ("llama3.2", "llama3.2:latest"),
                             ("qwen3:8b", "qwen3:8b")):
            model = await client.models.retrieve(name)
            assert (model.id, model.object) == (listed, "model")
            reply = await client.chat.completions.create(model=name, **CHAT)
            assert reply.choices[0].message.content
        with pytest.raises(openai.NotFoundError) as info:
            await client.models.retrieve("qwen/qwen3-5b")
    assert info.value.code == "model_not_found" and "qwen/qwen3-5b" in info.value.message
