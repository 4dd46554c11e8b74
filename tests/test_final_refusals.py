"""Refusals that a retry cannot change say `x-should-retry: false`: the OpenAI SDKs, which retry
any 408/409/429/5xx twice by default, make one request and raise at once."""
from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest

from proxy.emulator.catalog import CatalogModel
from .fakes import GB

SMALL, HUGE, X, Y = "lab/small-2b", "lab/huge-70b", "lab/x-6g", "lab/y-6g"
UNDERSTATED = "lab/understated-4g"    # its 4 GB file needs 14 GB once loaded
CATALOG = [CatalogModel(key=SMALL, size_bytes=2 * GB, memory_bytes=2 * GB),
           CatalogModel(key=HUGE, size_bytes=50 * GB, memory_bytes=50 * GB),
           CatalogModel(key=X, size_bytes=6 * GB, memory_bytes=6 * GB),
           CatalogModel(key=Y, size_bytes=6 * GB, memory_bytes=6 * GB),
           CatalogModel(key=UNDERSTATED, size_bytes=4 * GB, memory_bytes=14 * GB)]
MEMORY = {"memory.budget_gb": 16, "memory.max_memory_usage_percent": 100}


def counting_client(url: str) -> tuple[openai.AsyncOpenAI, list[str]]:
    """The SDK with its default retries; every request it sends is counted."""
    sent: list[str] = []

    async def count(request: httpx.Request) -> None:
        sent.append(request.url.path)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", http_client=httpx.AsyncClient(
        event_hooks={"request": [count]}))
    assert client.max_retries == 2
    return client, sent


async def chat(client: openai.AsyncOpenAI, model: str) -> Any:
    return await client.chat.completions.create(
        model=model, max_tokens=2, messages=[{"role": "user", "content": "hi"}])


async def test_model_too_large_is_one_request_for_the_sdk(make_emulator, make_proxy):
    emu = await make_emulator(catalog=CATALOG)
    proxy = await make_proxy(emu.url, **MEMORY)
    client, sent = counting_client(proxy.url)
    async with client:
        with pytest.raises(openai.InternalServerError) as refused:
            await chat(client, HUGE)
        assert sent == ["/v1/chat/completions"]
        assert refused.value.status_code == 503 and refused.value.code == "model_too_large"
        assert refused.value.response.headers["x-should-retry"] == "false"
        assert "or memory.budget_gb," in refused.value.message      # one server's key
        assert (await chat(client, SMALL)).model == SMALL     # the same client goes on


async def test_a_pinned_exclusive_rival_refuses_once_a_busy_one_may_be_retried(
        make_emulator, make_proxy, http):
    emu = await make_emulator(catalog=CATALOG)
    proxy = await make_proxy(emu.url, **MEMORY, **{
        "groups": [{"name": "swap", "members": [X, Y], "policy": "exclusive"}],
        f"models.{X}.pinned": True})
    client, sent = counting_client(proxy.url)
    async with client:
        await chat(client, X)
        with pytest.raises(openai.InternalServerError) as refused:
            await chat(client, Y)
    assert sent == ["/v1/chat/completions"] * 2
    assert refused.value.code == "group_busy" and "pinned" in refused.value.message
    assert refused.value.response.headers["x-should-retry"] == "false"


async def test_a_model_the_server_refused_at_its_size_is_refused_once(make_emulator,
                                                                      make_proxy, http):
    emu = await make_emulator(catalog=CATALOG, capacity_bytes=16 * GB)
    proxy = await make_proxy(emu.url, **MEMORY, **{f"models.{X}.pinned": True})
    await proxy.engine.load(X)                 # 10 GB stay free: too few for its 14

    async def post() -> tuple[int, dict, Any]:
        async with http.post(f"{proxy.url}/v1/chat/completions", json={
                "model": UNDERSTATED, "max_tokens": 2, "messages": []}) as r:
            return r.status, await r.json(), r.headers
    status, body, headers = await post()       # the server's refusal: evicting may help
    assert body["error"]["code"] == "model_load_failed" and "x-should-retry" not in headers
    proxy.engine.entry(UNDERSTATED).retry_at_s = 0.0        # the backoff has passed
    status, body, headers = await post()       # known to fail: nothing changes until revised
    assert status == 503 and body["error"]["code"] == "insufficient_memory"
    assert headers["x-should-retry"] == "false" and "Retry-After" not in headers
    assert "(its file is 4.0 GB)" in body["error"]["message"]


async def test_memory_only_pinned_models_hold_is_refused_once(make_emulator, make_proxy):
    emu = await make_emulator(catalog=CATALOG)
    proxy = await make_proxy(emu.url, **MEMORY, **{f"models.{X}.pinned": True,
                                                   f"models.{Y}.pinned": True})
    await proxy.engine.load(X)
    await proxy.engine.load(Y)                 # 12 GB pinned: the most models may take
    client, sent = counting_client(proxy.url)
    async with client:
        with pytest.raises(openai.InternalServerError) as refused:
            await asyncio.wait_for(chat(client, SMALL), 10)
    assert sent == ["/v1/chat/completions"]    # not three tries, 30 s apart
    assert refused.value.code == "insufficient_memory" and "(pinned)" in refused.value.message
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert "Retry-After" not in refused.value.response.headers
    assert "a retry helps only once memory is freed by hand" in refused.value.message


async def test_memory_a_model_not_the_proxys_holds_is_refused_once(make_emulator, make_proxy,
                                                                   http):
    emu = await make_emulator(catalog=CATALOG)
    await emu.state.load(X)                    # both loaded in LM Studio, not by the proxy
    await emu.state.load(Y)
    proxy = await make_proxy(emu.url, **MEMORY)
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": SMALL, "max_tokens": 2, "messages": []}) as r:
        body = await r.json()
    assert r.status == 503 and body["error"]["code"] == "insufficient_memory"
    assert "(not ours)" in body["error"]["message"]
    assert r.headers["x-should-retry"] == "false" and "Retry-After" not in r.headers


async def test_a_waiting_refusal_may_still_be_retried(make_emulator, make_proxy, http):
    await refused_while_x_serves(make_emulator, make_proxy, http)


async def refused_while_x_serves(make_emulator, make_proxy, http, **config) -> None:
    """X serves (it stays) while a request for Y waits past the queue timeout: its refusal
    says when to retry, and is not final."""
    emu = await make_emulator(catalog=CATALOG)
    proxy = await make_proxy(emu.url, **{**MEMORY, "memory.budget_gb": 12,
                                         "eviction.queue_timeout_s": 0.2, **config})
    lease = await proxy.engine.acquire(X)
    try:
        async with http.post(f"{proxy.url}/v1/chat/completions", json={
                "model": Y, "max_tokens": 2, "messages": []}) as r:
            body = await r.json()
        assert body["error"]["code"] == "insufficient_memory" and "Retry-After" in r.headers
        assert "x-should-retry" not in r.headers
    finally:
        lease.release()


async def test_a_server_that_cannot_load_on_request_refuses_once(make_emulator, make_proxy,
                                                                 http):
    emu = await make_emulator(catalog=CATALOG)
    proxy = await make_proxy(emu.url, **{"upstream.kind": "openai"})
    async with http.post(f"{proxy.url}/proxy/models/load", json={"model": SMALL}) as r:
        body = await r.json()
    assert r.status == 409 and body["error"]["code"] == "model_unavailable"
    assert r.headers["x-should-retry"] == "false"


async def test_a_refusal_that_fits_exactly_once_what_may_go_goes_may_be_retried(
        make_emulator, make_proxy, http):
    """Models may take 6 GB; X (6 GB) serves while Y (6 GB) waits: once X goes, Y fits to the
    byte, so the refusal is not final."""
    await refused_while_x_serves(make_emulator, make_proxy, http, **{
        "memory.min_free_memory_gb": 6, f"models.{X}.footprint_gb": 6,
        f"models.{Y}.footprint_gb": 6})
