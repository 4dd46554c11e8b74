"""Loading progress: a streaming request that waits for its model's load hears about it.

The emulator's load gate holds a load for as long as a test needs; notes are awaited as they
arrive (the response's headers come with the first one), never slept for.
"""
from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.app import create_app
from proxy.configload import replace_config
from proxy.engine.lifecycle import ModelEntry, ModelStatus
from proxy.server.progress import note_text
from proxy.server.serving import serve

from .conftest import proxy_config
from .test_relay import records_of

SMALL, LARGE, MID = "qwen/qwen3-4b", "openai/gpt-oss-20b", "google/gemma-3-12b"
MESSAGES = [{"role": "user", "content": "Say hello"}]
FAST = {"server.loading_progress_interval_s": 0.1}   # the first note after 0.1 s
BODIES = {
    "/v1/chat/completions": {"messages": MESSAGES, "max_tokens": 6},
    "/v1/completions": {"prompt": "Say hello", "max_tokens": 6},
    "/v1/responses": {"input": "Say hello", "max_output_tokens": 6},
    "/v1/messages": {"messages": MESSAGES, "max_tokens": 6},
}


def body(path: str, model: str = SMALL, **extra: Any) -> bytes:
    return orjson.dumps({"model": model, "stream": True, **BODIES[path], **extra})


def gate(emulator: Any, model: str = SMALL) -> asyncio.Event:
    """The model's next load waits until the event is set."""
    g = emulator.state.faults.load_gate[model] = asyncio.Event()
    return g


async def note(resp: aiohttp.ClientResponse) -> bytes:
    """The next SSE comment line (and the blank line after it)."""
    line = await resp.content.readline()
    assert line.startswith(b": "), line
    assert await resp.content.readline() == b"\n"
    return line.rstrip(b"\n")


def data_events(raw: bytes) -> list[Any]:
    return [orjson.loads(line[6:]) if line != b"data: [DONE]" else "[DONE]"
            for line in raw.split(b"\n") if line.startswith(b"data: ")]


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)


async def chat_stream(client: openai.AsyncOpenAI) -> Any:
    return await client.chat.completions.create(model=SMALL, messages=MESSAGES, max_tokens=8,
                                                stream=True)


@pytest.mark.parametrize("path", list(BODIES))
async def test_comment_lines_arrive_while_the_model_loads(make_proxy, emulator, http, path):
    proxy = await make_proxy(emulator.url, **FAST)
    loaded = gate(emulator)
    async with http.post(f"{proxy.url}{path}", data=body(path)) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        first, second = await note(resp), await note(resp)   # before any data event
        assert emulator.state.loading[SMALL] == 1              # ... while it loads
        loaded.set()
        rest = await resp.read()
    assert re.fullmatch(rb": loading qwen/qwen3-4b, \d+ s so far", first), first
    assert second.startswith(b": loading qwen/qwen3-4b, ")
    events = data_events(rest)
    assert events and all("error" not in e for e in events if e != "[DONE]")


async def test_the_early_headers_name_the_model_auto_picked(make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url, **FAST, tasks={"chat": [SMALL]})
    loaded = gate(emulator)
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         data=body("/v1/chat/completions", "auto:chat")) as resp:
        await note(resp)
        picked = resp.headers.get("X-Proxy-Model")
        loaded.set()
        await resp.read()
    assert picked == SMALL and resp.headers["Cache-Control"] == "no-cache"


async def test_the_openai_sdk_sees_the_same_content_as_directly(make_proxy, emulator):
    proxy = await make_proxy(emulator.url, **FAST)
    loaded = gate(emulator)
    via_proxy = sdk(proxy.url)
    stream = await chat_stream(via_proxy)   # returns with the headers: a note came first
    assert not loaded.is_set() and emulator.state.loading[SMALL] == 1
    loaded.set()
    chunks = [c async for c in stream]
    direct = sdk(emulator.url)
    expected = [c async for c in await chat_stream(direct)]
    await via_proxy.close()
    await direct.close()
    assert [(c.choices[0].delta.content, c.choices[0].finish_reason) for c in chunks] == \
        [(c.choices[0].delta.content, c.choices[0].finish_reason) for c in expected]


async def test_a_resident_model_gets_no_note_and_the_upstreams_headers(make_proxy, emulator,
                                                                       http):
    proxy = await make_proxy(emulator.url, **FAST)
    await proxy.engine.load(SMALL)
    async with http.post(f"{emulator.url}/v1/chat/completions",
                         data=body("/v1/chat/completions")) as direct:
        direct_type = direct.headers["Content-Type"]
        await direct.read()
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         data=body("/v1/chat/completions")) as resp:
        raw = await resp.read()
    assert resp.headers["Content-Type"] == direct_type and "X-Accel-Buffering" not in resp.headers
    assert raw.startswith(b"data: ") and b"\n:" not in raw


async def test_a_load_quicker_than_the_first_delay_adds_no_byte(make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url)    # default interval: the first note after 1 s
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         data=body("/v1/chat/completions")) as resp:
        raw = await resp.read()
    assert emulator.state.load_calls[SMALL] == 1     # it was cold, and loaded for this request
    assert raw.startswith(b"data: ") and b"\n:" not in raw
    assert "X-Accel-Buffering" not in resp.headers


async def test_the_first_note_comes_after_a_second_not_a_whole_interval(make_proxy, emulator,
                                                                        http):
    proxy = await make_proxy(emulator.url, **{"server.loading_progress_interval_s": 10})
    loaded = gate(emulator)
    started_s = time.monotonic()
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         data=body("/v1/chat/completions")) as resp:
        await note(resp)
        waited_s = time.monotonic() - started_s
        loaded.set()
        await resp.read()
    assert 0.9 <= waited_s < 5


async def test_a_learned_load_time_gives_the_time_left(make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url, **FAST)
    proxy.engine.entry(SMALL).load_time_s = 30.0    # as learned from earlier loads
    loaded = gate(emulator)
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         data=body("/v1/chat/completions")) as resp:
        first = await note(resp)
        loaded.set()
        await resp.read()
    assert re.fullmatch(rb": loading qwen/qwen3-4b, \d+ s so far, about (29|30) s left", first)


async def test_a_load_that_fails_after_a_note_is_an_error_event(make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url, **FAST)
    records = records_of(proxy)
    loaded = gate(emulator)
    emulator.state.faults.load_fail[SMALL] = "GGUF file is corrupt"
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         data=body("/v1/chat/completions")) as resp:
        assert resp.status == 200
        await note(resp)
        loaded.set()
        events = data_events(await resp.read())
    assert len(events) == 1 and events[0]["error"]["code"] == "model_load_failed"
    assert "GGUF file is corrupt" in events[0]["error"]["message"]
    await asyncio.wait_for(records.arrived.wait(), 5)
    assert [(r.status, r.ok) for r in records.seen] == [(503, False)]


async def test_the_openai_sdk_raises_a_failed_load_as_an_api_error(make_proxy, emulator):
    proxy = await make_proxy(emulator.url, **FAST)
    loaded = gate(emulator)
    emulator.state.faults.load_fail[SMALL] = "GGUF file is corrupt"
    client = sdk(proxy.url)
    stream = await chat_stream(client)      # the headers (200) came with the first note
    loaded.set()
    with pytest.raises(openai.APIError) as failed:
        async for _ in stream:
            pass
    await client.close()
    assert failed.value.code == "model_load_failed" and "corrupt" in failed.value.message


async def test_a_load_past_the_queue_deadline_is_an_error_event(make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url, **FAST, **{"eviction.queue_timeout_s": 0.5})
    records = records_of(proxy)
    loaded = gate(emulator)                 # LM Studio takes longer than the proxy waits
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         data=body("/v1/chat/completions")) as resp:
        assert resp.status == 200
        await note(resp)
        events = data_events(await resp.read())
    loaded.set()
    assert [e["error"]["code"] for e in events] == ["upstream_timeout"]
    await asyncio.wait_for(records.arrived.wait(), 5)
    assert records.seen[0].status == 504


async def test_a_model_that_can_never_fit_is_refused_at_once_with_its_real_status(
        make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url, **{"memory.budget_gb": 1})
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         data=body("/v1/chat/completions")) as resp:
        refused = await resp.json()       # fail fast: before the first note was due
    assert resp.status == 503 and refused["error"]["code"] == "model_too_large"


async def test_off_answers_a_refusal_with_its_real_status(make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url, **FAST, **{"eviction.queue_timeout_s": 0.5,
                                                      "server.loading_progress": "off"})
    loaded = gate(emulator)
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         data=body("/v1/chat/completions")) as resp:
        refused = await resp.json()       # after 0.5 s of waiting: 5 intervals, no note
    loaded.set()
    assert resp.status == 504 and resp.content_type == "application/json"
    assert refused["error"]["code"] == "upstream_timeout"


async def test_a_model_queued_for_memory_says_so_then_is_refused_in_the_stream(
        make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url, **FAST, **{"memory.budget_gb": 20,
                                                      "eviction.queue_timeout_s": 0.5})
    serving = await proxy.engine.acquire(LARGE)    # in use: it cannot make room yet
    try:
        async with http.post(f"{proxy.url}/v1/chat/completions",
                             data=body("/v1/chat/completions", MID)) as resp:
            first = await note(resp)
            events = data_events(await resp.read())
    finally:
        serving.release()
    assert first.startswith(b": waiting to load google/gemma-3-12b, ")
    assert [e["error"]["code"] for e in events] == ["insufficient_memory"]


async def test_an_upstream_error_after_the_headers_is_an_error_event(make_proxy, emulator,
                                                                      http):
    proxy = await make_proxy(emulator.url, **FAST)
    records = records_of(proxy)
    loaded = gate(emulator)
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         data=body("/v1/chat/completions")) as resp:
        await note(resp)
        emulator.state.faults.inference_status = 500
        loaded.set()
        events = data_events(await resp.read())
    assert [e["error"]["message"] for e in events] == ["Injected upstream failure"]
    await asyncio.wait_for(records.arrived.wait(), 5)
    assert [(r.status, r.ok) for r in records.seen] == [(500, False)]


async def test_a_client_that_leaves_during_the_load_holds_nothing(make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url, **FAST)
    records = records_of(proxy)
    loaded = gate(emulator)
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         data=body("/v1/chat/completions")) as resp:
        await note(resp)
        resp.close()                         # the user gave up
    await asyncio.wait_for(records.arrived.wait(), 5)   # the next note found it gone
    loaded.set()
    await proxy.engine.load(SMALL)           # joins the load still under way
    assert records.seen[0].status == 499 and proxy.engine.entry(SMALL).busy == 0


async def test_at_the_shutdown_deadline_a_waiting_stream_gets_an_error_event(emulator, http):
    app = create_app(proxy_config(emulator.url, **FAST))
    served = await serve(app, shutdown_timeout_s=0.3)
    loaded = gate(emulator)
    async with http.post(f"{served.url}/v1/chat/completions",
                         data=body("/v1/chat/completions")) as resp:
        await note(resp)
        closing = asyncio.ensure_future(served.close())
        events = data_events(await resp.read())
    await closing
    loaded.set()
    assert [e["error"]["code"] for e in events] == ["shutting_down"]


async def test_content_mode_sends_the_note_as_reasoning(make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url, **FAST, **{"server.loading_progress": "content"})
    loaded = gate(emulator)
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         data=body("/v1/chat/completions")) as resp:
        line = await resp.content.readline()
        loaded.set()
        rest = await resp.read()
    chunk = orjson.loads(line.removeprefix(b"data: "))
    assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == SMALL
    delta = chunk["choices"][0]["delta"]
    assert delta["reasoning_content"].startswith("loading qwen/qwen3-4b, ")
    assert "content" not in delta
    assert data_events(rest)[-1] == "[DONE]"


async def test_content_mode_reaches_the_openai_sdk_as_reasoning_content(make_proxy, emulator):
    proxy = await make_proxy(emulator.url, **FAST, **{"server.loading_progress": "content"})
    loaded = gate(emulator)
    client = sdk(proxy.url)
    stream = await chat_stream(client)
    first = await anext(aiter(stream))
    loaded.set()
    rest = [c async for c in stream]
    await client.close()
    assert first.choices[0].delta.model_extra["reasoning_content"].startswith("loading ")
    assert first.choices[0].delta.content is None
    assert "".join(c.choices[0].delta.content or "" for c in rest)


async def test_content_mode_falls_back_to_comments_off_chat(make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url, **FAST, **{"server.loading_progress": "content"})
    loaded = gate(emulator)
    async with http.post(f"{proxy.url}/v1/completions", data=body("/v1/completions")) as resp:
        first = await note(resp)
        loaded.set()
        await resp.read()
    assert first.startswith(b": loading qwen/qwen3-4b, ")


async def test_a_non_streaming_request_waits_as_before(make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url, **FAST, **{"eviction.queue_timeout_s": 0.5})
    loaded = gate(emulator)
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         data=orjson.dumps({"model": SMALL, "messages": MESSAGES})) as resp:
        await resp.read()
    loaded.set()
    assert resp.status == 504


def entry(status: ModelStatus, *, loading_since_s: float | None = None,
          load_time_s: float | None = None) -> ModelEntry:
    return ModelEntry(SMALL, status=status, loading_since_s=loading_since_s,
                      load_time_s=load_time_s)


@pytest.mark.parametrize("e, text", [
    (entry(ModelStatus.LOADING, loading_since_s=100, load_time_s=20),
     "loading qwen/qwen3-4b, 12 s so far, about 8 s left"),
    (entry(ModelStatus.LOADING, loading_since_s=100),
     "loading qwen/qwen3-4b, 12 s so far"),
    (entry(ModelStatus.LOADING, loading_since_s=80, load_time_s=20),
     "loading qwen/qwen3-4b, 12 s so far, longer than its usual 20 s"),
    (entry(ModelStatus.UNLOADED, load_time_s=20),
     "waiting to load qwen/qwen3-4b, 12 s so far, then about 20 s to load"),
    (entry(ModelStatus.UNLOADED), "waiting to load qwen/qwen3-4b, 12 s so far"),
])
def test_note_text(e, text):
    assert note_text(SMALL, e, now_s=112.0, waiting_since_s=100.0) == text


async def test_a_prompt_past_the_context_found_after_the_notes_is_refused_not_failed(
        make_emulator, make_proxy, http):
    """A fitted model's context is chosen at admission, below its configured one, and known
    once it is loaded; the headers went out with the first note, so the refusal is an error
    event, and it is still the client's, not the model's: counted as refused, not recorded as
    a failure."""
    from .test_fit import BIG, FIT, catalog, config
    from .test_relay import samples
    emulator = await make_emulator(catalog=catalog((BIG, 9)), capacity_bytes=16 * 10**9)
    fitted = config(emulator.url, {BIG: 9}, fit={"min_context_length": 8192})
    proxy = await make_proxy(emulator.url, config=replace_config(fitted, FAST))
    async with http.post(f"{proxy.url}/v1/chat/completions", data=body(
            "/v1/chat/completions", model=BIG, stream=False)) as resp:
        assert resp.status == 200                    # 7 GB left: FIT gets 20480 of its 32768
    records = records_of(proxy)
    loaded = gate(emulator, FIT)
    long_prompt = [{"role": "user", "content": "hello world " * 17000}]   # ≥ 25500 tokens
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         data=body("/v1/chat/completions", FIT, messages=long_prompt)) as resp:
        await note(resp)
        loaded.set()
        events = data_events(await resp.read())
    assert [e["error"]["code"] for e in events] == ["context_length_exceeded"]
    assert "20480 tokens of context" in events[0]["error"]["message"]
    refused = ("proxy_requests_total", (("endpoint", "/v1/chat/completions"), ("model", FIT),
                                        ("outcome", "refused")))

    async def counted() -> dict:
        async with http.get(f"{proxy.url}/metrics") as r:
            return samples(await r.text())
    async with asyncio.timeout(10):          # the request's exit runs after its last byte
        while refused not in (m := await counted()) and not records.seen:
            await asyncio.sleep(0.01)
    assert records.seen == [] and m[refused] == 1
    usage = proxy.engine.usage(FIT)
    assert (usage.requests, usage.failures) == (0, 0)
