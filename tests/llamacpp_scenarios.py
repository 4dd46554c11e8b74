"""What the proxy must do in front of a llama.cpp router, written once and run against the
router emulator (test_llamacpp_emulated.py) and a real llama-server (test_llamacpp_real.py).

A `Router` is either: its URL, the ids of four models (two chat models, an embedding model and
a broken file), and a restart (killed and started again: every model unloaded).
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable, Protocol

import aiohttp

CHAT = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8,
        "temperature": 0, "seed": 1}


class Router(Protocol):
    url: str
    chat_small: str
    chat_large: str
    embedding: str
    broken: str

    async def restart(self) -> None: ...


async def router_status(http: aiohttp.ClientSession, router: Router, key: str) -> str:
    async with http.get(router.url + "/models") as r:
        body = await r.json()
    return next(m["status"]["value"] for m in body["data"] if m["id"] == key)


async def proxy_for(make_proxy: Callable[..., Awaitable[Any]], router: Router,
                    **overrides: Any) -> Any:
    """A proxy of kind llamacpp; each chat model takes 1 GB, the budget holds one of them."""
    footprints = {k: {"footprint_gb": 1.0} for k in (router.chat_small, router.chat_large)}
    settings = {"upstream.kind": "llamacpp", "upstream.load_timeout_s": 30,
                "memory.budget_gb": 1.5, "models": footprints, **overrides}
    return await make_proxy(router.url, **settings)


async def chat(http: aiohttp.ClientSession, proxy: Any, model: str, **extra: Any
               ) -> tuple[int, Any]:
    async with http.post(proxy.url + "/v1/chat/completions",
                         json={"model": model, **CHAT, **extra}) as r:
        return r.status, await r.json()


async def cold_model_loads_through_the_proxy(router: Router, make_proxy: Any,
                                             http: aiohttp.ClientSession) -> None:
    proxy = await proxy_for(make_proxy, router)
    assert await router_status(http, router, router.chat_small) == "unloaded"
    status, body = await chat(http, proxy, router.chat_small)
    assert status == 200, body
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert await router_status(http, router, router.chat_small) == "loaded"
    e = proxy.engine.entry(router.chat_small)
    assert e.status.value == "loaded" and e.owner == "proxy" and e.load_count == 1


async def the_proxy_evicts_for_a_budget_of_one(router: Router, make_proxy: Any,
                                               http: aiohttp.ClientSession) -> None:
    proxy = await proxy_for(make_proxy, router)
    assert (await chat(http, proxy, router.chat_small))[0] == 200
    assert (await chat(http, proxy, router.chat_large))[0] == 200
    small = proxy.engine.entry(router.chat_small)
    assert small.status.value == "unloaded" and dict(small.evictions) == {"admission": 1}
    assert await router_status(http, router, router.chat_small) == "unloaded"
    assert await router_status(http, router, router.chat_large) == "loaded"


async def streaming_carries_usage(router: Router, make_proxy: Any,
                                  http: aiohttp.ClientSession) -> None:
    proxy = await proxy_for(make_proxy, router)
    events = []
    async with http.post(proxy.url + "/v1/chat/completions",
                         json={"model": router.chat_small, **CHAT, "stream": True,
                               "stream_options": {"include_usage": True}}) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        async for line in r.content:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                events.append(json.loads(line[6:]))
    usage = events[-1]["usage"]
    assert events[-1]["choices"] == [] and usage["completion_tokens"] > 0
    assert any(e["choices"] and e["choices"][0]["delta"].get("content") for e in events)
    stats = proxy.engine.usage(router.chat_small)
    await until(lambda: stats.requests == 1)
    assert stats.completion_tokens == usage["completion_tokens"]


async def embeddings_are_served(router: Router, make_proxy: Any,
                                http: aiohttp.ClientSession) -> None:
    proxy = await proxy_for(make_proxy, router)
    async with http.post(proxy.url + "/v1/embeddings",
                         json={"model": router.embedding, "input": ["one", "two"]}) as r:
        assert r.status == 200, await r.text()
        body = await r.json()
    vectors = [d["embedding"] for d in body["data"]]
    assert len(vectors) == 2 and len(vectors[0]) > 0 and vectors[0] != vectors[1]
    assert proxy.engine.entry(router.embedding).status.value == "loaded"


async def a_broken_file_is_a_failed_load(router: Router, make_proxy: Any,
                                         http: aiohttp.ClientSession) -> None:
    proxy = await proxy_for(make_proxy, router)
    status, body = await chat(http, proxy, router.broken)
    assert status == 503 and body["error"]["code"] == "model_load_failed", body
    assert "exited with code 1" in body["error"]["message"]
    assert proxy.engine.entry(router.broken).status.value == "error"


async def a_restarted_router_is_reconciled(router: Router, make_proxy: Any,
                                           http: aiohttp.ClientSession) -> None:
    proxy = await proxy_for(make_proxy, router)
    assert (await chat(http, proxy, router.chat_small))[0] == 200
    await router.restart()
    await proxy.engine.reconcile()
    e = proxy.engine.entry(router.chat_small)
    assert e.status.value == "unloaded" and e.last_error is None
    assert (await chat(http, proxy, router.chat_small))[0] == 200   # loaded again
    assert e.status.value == "loaded" and e.load_count == 2


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll a condition with a deadline (a request's statistics land after its last byte)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)
