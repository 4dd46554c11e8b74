"""One relay per proxied request: one header policy both ways on every forwarding route, and
one record and access-log line however the request ends."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.emulator import GB, EmulatorOptions, EmulatorState, create_emulator_app, load_catalog
from proxy.server.keys import ACCESS_LOG
from proxy.server.serving import serve
from proxy.upstream import create_upstream

from .conftest import FIXED_CREATED_S, proxy_config

MODEL = "qwen/qwen3-4b"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
UPSTREAM_DATE = "Thu, 01 Jan 1970 00:00:00 GMT"
ROUTES = [("POST", "/v1/chat/completions", CHAT),
          ("POST", "/v1/chat/completions", {**CHAT, "stream": True}),
          ("POST", "/v1/embeddings", {"model": "text-embedding-nomic-embed-text-v1.5",
                                      "input": "hi"}),
          ("GET", "/v1/models", None),
          ("GET", "/lmstudio-greeting", None)]


class Records:
    """The engine's request records, as its listeners see them."""

    def __init__(self) -> None:
        self.seen: list[Any] = []
        self.arrived = asyncio.Event()

    def on_request(self, r: Any) -> None:
        self.seen.append(r)
        self.arrived.set()

    async def until(self, n: int) -> None:
        """Until the n-th record has arrived."""
        while len(self.seen) < n:
            self.arrived.clear()
            await self.arrived.wait()


def records_of(proxy: Any) -> Records:
    records = Records()
    proxy.engine.add_listener(records)
    return records


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def access_lines(proxy: Any, caplog: pytest.LogCaptureFixture) -> list[str]:
    proxy.app[ACCESS_LOG].flush()
    return [r.getMessage() for r in caplog.records if r.name == "proxy.request"]


async def decorated_emulator() -> tuple[Any, list[tuple[str, Any]]]:
    """The emulator answering every response with repeated and upstream-only headers, and
    recording the headers each request arrived with."""
    seen: list[tuple[str, Any]] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append((request.path, request.headers.copy()))
        return await handler(request)

    async def decorate(request: web.Request, response: web.StreamResponse) -> None:
        for name, value in (("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Upstream", "kept")):
            response.headers.add(name, value)
        response.headers["Server"] = "emulated-upstream"
        response.headers["Date"] = UPSTREAM_DATE
    app = create_emulator_app(EmulatorState(load_catalog(), capacity_bytes=64 * GB),
                              EmulatorOptions(created_s=FIXED_CREATED_S))
    app.middlewares.insert(0, record)
    app.on_response_prepare.append(decorate)
    return await serve(app), seen


@pytest.mark.parametrize("method,path,body", ROUTES,
                         ids=["chat", "chat-stream", "embeddings", "models", "greeting"])
async def test_one_header_policy_both_ways_on_every_forwarding_route(make_proxy, http, method,
                                                                     path, body):
    upstream, seen = await decorated_emulator()
    try:
        # This emulator loads in 2 s: a stream that waits that long starts with the proxy's
        # own headers, before the upstream's exist (test_progress.py).
        proxy = await make_proxy(upstream.url, **{"server.loading_progress": "off"})
        async with http.request(method, proxy.url + path, json=body,
                                headers={"X-Client-Trace": "t-1", "Cookie": "c=1"}) as r:
            await r.read()
        assert r.status == 200, path
        assert r.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert r.headers["X-Upstream"] == "kept"
        assert "emulated-upstream" not in r.headers.getall("Server")   # the proxy's own
        assert UPSTREAM_DATE not in r.headers.getall("Date")
        (arrived,) = [h for p, h in seen if p == path]
        assert arrived["X-Client-Trace"] == "t-1" and "Cookie" not in arrived
    finally:
        await upstream.close()


async def test_a_refusal_before_the_upstream_is_recorded_and_logged_once(make_proxy, emulator,
                                                                        http, caplog):
    caplog.set_level(logging.INFO, logger="proxy.request")
    proxy = await make_proxy(emulator.url, **{"memory.budget_gb": 1})   # MODEL can never fit
    records = records_of(proxy)
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                         headers={"X-Task-Type": "code"}) as r:
        assert r.status == 503 and (await r.json())["error"]["code"] == "model_too_large"
    async with http.post(f"{proxy.url}/v1/chat/completions", data=b"") as r:
        assert r.status == 400
    (too_large,) = records.seen     # the 400 is the client's, no model's: not recorded
    assert (too_large.model, too_large.status, too_large.ok) == (MODEL, 503, False)
    assert too_large.task is None   # the model never answered: no task's failure
    lines = access_lines(proxy, caplog)
    assert len(lines) == 2
    assert lines[0].startswith(f"POST /v1/chat/completions {MODEL} 503 ")
    assert lines[1].startswith("POST /v1/chat/completions - 400 ")


async def test_a_clients_bad_request_is_refused_not_a_failure_of_the_model(make_proxy, emulator,
                                                                           http, caplog):
    caplog.set_level(logging.INFO, logger="proxy.request")
    proxy = await make_proxy(emulator.url, **{"server.max_body_bytes": 32_768,
                                              "models": {MODEL: {"load": {
                                                  "context_length": 2048}}}})
    records = records_of(proxy)
    url = f"{proxy.url}/v1/chat/completions"
    long_prompt = [{"role": "user", "content": "hello world " * 1800}]   # ≥ 2700 tokens
    for body, status in ((b"{", 400), (orjson.dumps({**CHAT, "model": "qwen-typo"}), 404),
                         (b" " * 40_000, 413),
                         (orjson.dumps({**CHAT, "messages": long_prompt}), 400)):
        async with http.post(url, data=body) as r:
            assert r.status == status, await r.text()
    assert records.seen == []
    usage = proxy.engine.usage(MODEL)
    assert (usage.requests, usage.failures) == (0, 0)
    assert proxy.engine.entry(MODEL).leases == 0     # the context check held it, and let go
    async with http.get(f"{proxy.url}/metrics") as r:
        m = samples(await r.text())
    ep = "/v1/chat/completions"
    assert m[("proxy_requests_total", (("endpoint", ep), ("model", MODEL),
                                       ("outcome", "refused")))] == 1
    assert m[("proxy_requests_total", (("endpoint", ep), ("model", "__other__"),
                                       ("outcome", "refused")))] == 3
    assert not any(name == "proxy_requests_total" and dict(labels)["outcome"] == "error"
                   for name, labels in m)
    assert [line.split()[3] for line in access_lines(proxy, caplog)] == [
        "400", "404", "413", "400"]


async def test_a_client_that_leaves_mid_stream_gets_its_access_log_line(proxy, emulator, http,
                                                                        caplog):
    caplog.set_level(logging.INFO, logger="proxy.request")
    records = records_of(proxy)
    await (await http.post(f"{proxy.url}/proxy/models/load", json={"model": MODEL})).read()
    emulator.state.faults.stream_gate = asyncio.Event()   # never set: the stream stalls
    resp = await http.post(f"{proxy.url}/v1/chat/completions", json={**CHAT, "stream": True})
    await resp.content.readuntil(b"\n\n")
    resp.close()                                          # the client goes away
    await records.arrived.wait()
    (line,) = access_lines(proxy, caplog)
    assert line.startswith(f"POST /v1/chat/completions {MODEL} 499 ")
    assert "ttft=-" not in line                           # the first token had come
    assert proxy.engine.entry(MODEL).leases == 0


async def test_a_stream_read_to_its_end_is_a_success_though_the_sdk_closes_at_done(proxy,
                                                                                   emulator):
    records = records_of(proxy)
    # The upstream's end comes only after the client has gone: the SDK closes at [DONE].
    emulator.state.faults.stream_end_gate = asyncio.Event()
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    chunks = [c async for c in await client.chat.completions.create(
        model=MODEL, messages=CHAT["messages"], max_tokens=4, stream=True,
        stream_options={"include_usage": True})]
    await client.close()
    await records.arrived.wait()
    (record,) = records.seen
    assert chunks[-1].usage.completion_tokens == 4
    assert (record.status, record.ok, record.completion_tokens) == (200, True, 4)
    assert not record.tokens_estimated and record.prompt_tokens > 0
    assert proxy.engine.entry(MODEL).leases == 0


async def test_a_done_in_a_later_chunk_is_the_end_too_when_the_sdk_closes_there(proxy,
                                                                                emulator):
    """[DONE] arriving after the first chunk (the stream paused after its first event) settles
    the outcome as it goes out, as [DONE] in the first chunk does."""
    records = records_of(proxy)
    emulator.state.faults.stream_gate = asyncio.Event()
    emulator.state.faults.stream_end_gate = asyncio.Event()   # never set: the SDK leaves first
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    chunks = []
    async for chunk in await client.chat.completions.create(
            model=MODEL, messages=CHAT["messages"], max_tokens=4, stream=True,
            stream_options={"include_usage": True}):
        chunks.append(chunk)
        emulator.state.faults.stream_gate.set()
    await client.close()
    await records.arrived.wait()
    (record,) = records.seen
    assert chunks[-1].usage.completion_tokens == 4
    assert (record.status, record.ok, record.completion_tokens) == (200, True, 4)


async def test_an_upstream_silent_after_done_ends_the_stream_without_an_error(make_proxy,
                                                                             emulator, http):
    """The upstream holds its end past read_timeout_s after [DONE]: the client has its whole
    answer, so the stream just ends, a success, with no error event after [DONE]."""
    proxy = await make_proxy(emulator.url, **{"upstream.read_timeout_s": 0.5})
    records = records_of(proxy)
    await (await http.post(f"{proxy.url}/proxy/models/load", json={"model": MODEL})).read()
    emulator.state.faults.stream_end_gate = asyncio.Event()   # never set
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         json={**CHAT, "stream": True}) as r:
        raw = await r.read()
    assert raw.rstrip().endswith(b"data: [DONE]") and b'"error"' not in raw
    await records.arrived.wait()
    (record,) = records.seen
    assert (record.status, record.ok, record.completion_tokens) == (200, True, 2)


async def test_an_upstream_failure_after_the_lease_counts_for_the_task(proxy, emulator, http):
    records = records_of(proxy)
    emulator.state.faults.drop_stream_after_chunks = 2
    async with http.post(f"{proxy.url}/v1/chat/completions", json={**CHAT, "stream": True},
                         headers={"X-Task-Type": "code"}) as r:
        assert b'"code":"upstream_error"' in await r.read()
    await records.arrived.wait()
    (record,) = records.seen
    assert (record.model, record.status, record.ok, record.task) == (MODEL, 502, False, "code")
    assert proxy.engine.entry(MODEL).leases == 0


class BuggyForwarding:
    """An `Upstream` whose forwarding of chat fails with a bug, not a ProxyError."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def request(self, method: str, path: str, headers: dict[str, str], body: Any) -> Any:
        if path == "/v1/chat/completions":
            raise RuntimeError("a bug on the way upstream")
        return self.inner.request(method, path, headers, body)


async def test_a_bug_on_the_way_upstream_is_recorded_as_the_500_it_answers(make_proxy,
                                                                           emulator, http):
    config = proxy_config(emulator.url)
    proxy = await make_proxy(emulator.url, config=config, app_kwargs={
        "upstream": BuggyForwarding(create_upstream(config.upstream))})
    records = records_of(proxy)
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as r:
        assert r.status == 500
        assert (await r.json())["error"]["code"] == "internal_error"
    (record,) = records.seen
    assert (record.model, record.status, record.ok) == (MODEL, 500, False)
    assert proxy.engine.entry(MODEL).leases == 0


async def test_include_usage_asked_for_the_client_is_stripped_and_counted(proxy, emulator,
                                                                         http):
    records = records_of(proxy)
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         json={**CHAT, "stream": True, "max_tokens": 3}) as r:
        body = await r.read()
    assert b'"usage"' not in body and body.endswith(b"data: [DONE]\n\n")
    await records.arrived.wait()
    (record,) = records.seen
    assert record.completion_tokens == 3 and not record.tokens_estimated


async def test_a_stream_that_ends_with_nothing_in_it_is_no_success(make_proxy, http):
    """An upstream 200 event stream that closes cleanly before any event or [DONE]: the client
    got no answer, and the record says so."""
    @web.middleware
    async def empty_stream(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/v1/chat/completions":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write_eof()
            return resp
        return await handler(request)
    app = create_emulator_app(EmulatorState(load_catalog(), capacity_bytes=64 * GB),
                              EmulatorOptions(created_s=FIXED_CREATED_S))
    app.middlewares.insert(0, empty_stream)
    upstream = await serve(app)
    try:
        proxy = await make_proxy(upstream.url)
        records = records_of(proxy)
        async with http.post(f"{proxy.url}/v1/chat/completions",
                             json={**CHAT, "stream": True}) as r:
            await r.read()
        await records.arrived.wait()
        (record,) = records.seen
        assert (record.model, record.ok) == (MODEL, False)
    finally:
        await upstream.close()
