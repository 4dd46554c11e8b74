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
