"""Stream shapes the LM Studio emulator does not make, from a small OpenAI-compatible server in
the test (upstream.kind: openai): tool-call and reasoning deltas, which are the first tokens of
their answers; usage on the final chunk that still has choices, and `"usage": null` on every
chunk as OpenAI sends it, which a client that did not ask for usage must not receive."""
from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator

import orjson
import pytest
from aiohttp import web

from proxy.server.keys import ACCESS_LOG
from proxy.server.serving import Served, serve

pytestmark = pytest.mark.timeout(30)

USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
DELTAS = {   # model → the deltas its answer streams, after a first chunk with the role only
    "tool-model": [{"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": "}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}],
    "reasoning-model": [{"reasoning_content": "The user"}, {"reasoning_content": " asks."}],
    "openai-style": [{"content": "Bonjour"}, {"content": " à vous"}],
}


class FakeOpenAI:
    """Streams DELTAS[model] as chat.completion.chunk events, formatted as Python's json does
    (", " and ": ": not how the proxy would write them). With include_usage, "tool-model" and
    "reasoning-model" put usage on the final chunk that still has choices, as several servers
    do; "openai-style" puts "usage": null on every chunk and ends with a usage-only chunk."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "owned_by": "test"} for m in DELTAS]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(body)
        model = body["model"]
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        null_each = usage and model == "openai-style"

        def chunk(choices: list, **extra: Any) -> bytes:
            data = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                    "model": model, "choices": choices, **extra}
            if null_each and "usage" not in extra:
                data["usage"] = None
            return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        deltas = [{"role": "assistant"}, *DELTAS[model]]
        for delta in deltas:
            await resp.write(chunk([{"index": 0, "delta": delta, "finish_reason": None}]))
        final = [{"index": 0, "delta": {}, "finish_reason": "stop"}]
        if usage and not null_each:
            await resp.write(chunk(final, usage=USAGE))
        else:
            await resp.write(chunk(final))
        if null_each:
            await resp.write(chunk([], usage=USAGE))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeOpenAI, Served]]:
    upstream = FakeOpenAI()
    served = await serve(upstream.app())
    yield upstream, served
    await served.close()


async def stream(http: Any, url: str, model: str, **extra: Any) -> bytes:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "?"}],
            **extra}
    async with http.post(f"{url}/v1/chat/completions", data=orjson.dumps(body)) as r:
        assert r.status == 200
        return await r.read()


@pytest.mark.parametrize("model", ["tool-model", "reasoning-model"])
async def test_tool_call_and_reasoning_deltas_give_a_time_to_first_token(fake, make_proxy, http,
                                                                         caplog, model):
    caplog.set_level(logging.INFO, logger="proxy.request")
    _, upstream = fake
    proxy = await make_proxy(upstream.url, **{"upstream.kind": "openai"})
    for _ in range(2):
        await stream(http, proxy.url, model)
    async with http.get(f"{proxy.url}/proxy/stats") as r:
        row = (await r.json())["models"][model]
    assert row["requests"] == 2 and row["avg_ttft_ms"] is not None
    assert proxy.engine.usage(model).ttft.count == 2
    proxy.app[ACCESS_LOG].flush()
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy.request"]
    assert len(lines) == 2 and not any("ttft=-" in line for line in lines)


@pytest.mark.parametrize("model", ["tool-model", "openai-style"],
                         ids=["usage-on-the-final-chunk", "null-on-each-then-usage-only"])
async def test_a_client_that_did_not_ask_for_usage_gets_none_and_the_tokens_are_counted(
        fake, make_proxy, http, model):
    upstream, served = fake
    proxy = await make_proxy(served.url, **{"upstream.kind": "openai"})
    direct = await stream(http, served.url, model)     # what the server sends this client
    relayed = await stream(http, proxy.url, model)
    assert upstream.received[-1]["stream_options"] == {"include_usage": True}   # asked for it
    assert b'"usage"' not in relayed and relayed == direct
    usage = proxy.engine.usage(model)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated_tokens) == (5, 7, 0)
    # A client that asked for usage gets the server's chunks as they are.
    asked = {"stream_options": {"include_usage": True}}
    assert await stream(http, proxy.url, model, **asked) == \
        await stream(http, served.url, model, **asked)
