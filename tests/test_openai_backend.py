"""The plain OpenAI-compatible backend (upstream.kind: openai): relay and measure only, against
the LM Studio emulator's /v1 surface."""
from __future__ import annotations

import aiohttp

from proxy.config import UpstreamConfig
from proxy.emulator import EmulatorOptions
from proxy.errors import ModelLoadFailed
from proxy.upstream import create_upstream
from proxy.upstream.base import ApiLevel
from proxy.upstream.openai import OpenAIProtocol
from .conftest import FIXED_CREATED_S

MODEL = "qwen/qwen3-4b"
STREAM = {"model": MODEL, "stream": True, "stream_options": {"include_usage": True},
          "messages": [{"role": "user", "content": "Say something"}]}


async def raw_stream(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with http.post(f"{url}/v1/chat/completions", json=STREAM) as r:
        return r.status, await r.read()


async def test_models_come_from_v1_models_with_the_token(make_emulator):
    emu = await make_emulator(options=EmulatorOptions(api_token="sk-upstream",
                                                      created_s=FIXED_CREATED_S))
    backend = create_upstream(UpstreamConfig(kind="openai", url=emu.url,
                                             api_token="sk-upstream"))
    assert isinstance(backend, OpenAIProtocol)
    await backend.start()
    try:
        assert await backend.detect() is ApiLevel.JIT_ONLY
        assert not backend.capabilities.manages_loading
        assert not backend.capabilities.reports_memory
        keys = {m.key for m in await backend.list_models()}
        assert keys == set(emu.state.catalog)
        try:
            await backend.load(MODEL, {})
        except ModelLoadFailed as exc:
            assert "relays only" in exc.message
        else:
            raise AssertionError("an OpenAI-compatible upstream cannot load on request")
    finally:
        await backend.close()


async def test_streams_pass_through_byte_for_byte_and_stats_are_kept(make_emulator,
                                                                    make_proxy, http):
    emu = await make_emulator()
    proxy = await make_proxy(emu.url, **{"upstream.kind": "openai"})
    status, direct = await raw_stream(http, emu.url)
    assert status == 200
    status, relayed = await raw_stream(http, proxy.url)
    assert status == 200 and relayed == direct and relayed.endswith(b"data: [DONE]\n\n")

    usage = proxy.engine.usage(MODEL)
    assert usage.requests == 1 and usage.failures == 0 and usage.ttft.count == 1
    assert usage.completion_tokens == 24 and usage.estimated_tokens == 0   # the stream's usage
    async with http.get(f"{proxy.url}/proxy/stats") as r:
        stats = await r.json()
    assert stats["models"][MODEL]["requests"] == 1
    assert proxy.engine.entry(MODEL).load_count == 0     # the server loaded it, not the proxy
    assert emu.state.unload_calls == {}


async def test_readyz_says_an_openai_server_has_no_load_api_not_an_old_lm_studio(
        make_emulator, make_proxy, http):
    emu = await make_emulator()
    proxy = await make_proxy(emu.url, **{"upstream.kind": "openai"})
    async with http.get(f"{proxy.url}/readyz") as r:
        ready = await r.json()
    assert r.status == 200 and ready["manages_loading"] is False
    assert ready["note"] == ("an OpenAI-compatible server (upstream.kind: openai) has no "
                             "load/unload API: it decides itself what is loaded and memory is "
                             "not managed")
    assert "LM Studio" not in ready["note"]


async def admin(http: aiohttp.ClientSession, url: str, path: str, body: dict) -> tuple[int, dict]:
    async with http.post(f"{url}{path}", json=body) as r:
        return r.status, await r.json()


async def test_a_load_or_unload_by_hand_is_refused_naming_the_kind(make_emulator, make_proxy,
                                                                   http):
    """The server loaded the model for a request; the proxy can do neither: an unload answered
    `{"unloaded": true}` while the model stayed where it was."""
    emu = await make_emulator()
    proxy = await make_proxy(emu.url, **{"upstream.kind": "openai"})
    assert (await raw_stream(http, proxy.url))[0] == 200
    for path, done in (("/proxy/models/load", "loaded"), ("/proxy/models/unload", "unloaded")):
        status, body = await admin(http, proxy.url, path, {"model": MODEL})
        assert status == 409 and body["error"]["code"] == "model_unavailable", body
        assert body["error"]["message"] == (
            f"'{MODEL}' cannot be {done} through the proxy: an OpenAI-compatible server "
            f"(upstream.kind: openai) has no load/unload API; it decides itself what is loaded.")
    assert await admin(http, proxy.url, "/proxy/clear", {}) == (200, {"unloaded": []})
    assert emu.state.unload_calls == {}
    assert [i.model.key for i in emu.state.instances_of(MODEL)] == [MODEL]


async def test_models_are_in_an_unknown_state_with_no_footprint(make_emulator, make_proxy,
                                                                 http):
    """The proxy cannot know what such a server holds: no model is shown `unloaded` (the one
    that just served a request least of all), and no footprint is made up."""
    emu = await make_emulator()
    proxy = await make_proxy(emu.url, **{"upstream.kind": "openai"})
    assert (await raw_stream(http, proxy.url))[0] == 200
    async with http.get(f"{proxy.url}/proxy/models") as r:
        listing = await r.json()
    rows = {row["model"]: row for row in listing["data"]}
    assert set(rows) == set(emu.state.catalog)
    assert {row["state"] for row in rows.values()} == {"unknown"}
    assert {(row["footprint_mb"], row["footprint_source"]) for row in rows.values()} == \
        {(None, None)}
    assert rows[MODEL]["requests"] == 1
    assert rows[MODEL]["backend"] == {"owned_by": "qwen"}   # what the server's list says
    assert listing["memory_pressure"] is None


async def test_memory_is_not_reported_where_the_proxy_does_not_manage_it(make_emulator,
                                                                         make_proxy, http):
    """memory.* has no effect here: /proxy/stats, /proxy/health and /metrics say so instead of
    showing this machine's memory, a pressure and an alert the proxy would never act on."""
    from proxy.engine.memory import MemoryPressure
    from .fakes import SettableSampler
    emu = await make_emulator()
    proxy = await make_proxy(emu.url, app_kwargs={"sampler": SettableSampler(32, 0.5)},
                             **{"upstream.kind": "openai", "memory.min_free_memory_gb": 4})
    assert (await raw_stream(http, proxy.url))[0] == 200
    await proxy.engine.sample_memory()
    assert proxy.engine.memory_pressure is MemoryPressure.CRITICAL   # were it managed
    async with http.get(f"{proxy.url}/proxy/stats") as r:
        stats = await r.json()
    assert stats["memory_managed"] is False
    assert (stats["system_memory"], stats["gpu_memory"], stats["memory_pressure"]) == \
        (None, None, None)
    assert stats["model_counts"]["unknown"] == len(emu.state.catalog)
    assert stats["model_counts"]["unloaded"] == 0
    async with http.get(f"{proxy.url}/proxy/health") as r:
        health = await r.json()
    assert health["alerts"] == [] and health["status"] == "ok"
    assert health["system_health"]["memory_pressure"] is None
    assert health["models"][MODEL]["state"] == "unknown"
    async with http.get(f"{proxy.url}/metrics") as r:
        metrics = await r.text()
    for absent in ("proxy_memory_pressure", "proxy_memory_total_bytes",
                   "proxy_memory_available_bytes", "proxy_model_footprint_bytes{",
                   "proxy_model_loaded{"):
        assert absent not in metrics, absent
    assert f'proxy_model_requests_in_flight{{model="{MODEL}"}} 0.0' in metrics
