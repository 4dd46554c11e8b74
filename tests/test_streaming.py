"""Streams arrive through the proxy exactly as LM Studio sends them, and as they are produced."""
from __future__ import annotations

import asyncio

import orjson
import pytest

from proxy.server.streaming import StreamMeter

MODEL = "qwen/qwen3-4b"


def chat_body(**extra):
    return orjson.dumps({"model": MODEL, "stream": True, "max_tokens": 8, "seed": 7,
                         "messages": [{"role": "user", "content": "tell me"}], **extra})


async def read_all(http, url, body):
    async with http.post(url, data=body) as resp:
        assert resp.status == 200
        return await resp.read()


@pytest.mark.parametrize("extra", [{}, {"stream_options": {"include_usage": True}}],
                         ids=["without-include_usage", "with-include_usage"])
async def test_stream_is_byte_identical_to_direct(proxy, emulator, http, extra):
    body = chat_body(**extra)
    direct = await read_all(http, f"{emulator.url}/v1/chat/completions", body)
    via_proxy = await read_all(http, f"{proxy.url}/v1/chat/completions", body)
    assert via_proxy == direct
    assert (b'"usage"' in direct) == bool(extra)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "once upon", "max_tokens": 5}),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 5}),
    ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}),
])
async def test_other_streams_are_byte_identical_and_measured(proxy, emulator, http, path, body):
    raw = orjson.dumps({"model": MODEL, "stream": True, **body})
    direct = await read_all(http, f"{emulator.url}{path}", raw)
    via_proxy = await read_all(http, f"{proxy.url}{path}", raw)
    assert via_proxy == direct
    usage = proxy.engine.usage(MODEL)
    assert usage.completion_tokens == 5 and usage.estimated_tokens == 0
    assert usage.ttft.count == 1


async def test_first_chunk_reaches_client_before_upstream_sends_the_last(proxy, emulator, http):
    await (await http.post(f"{proxy.url}/proxy/models/load", json={"model": MODEL})).read()
    gate = emulator.state.faults.stream_gate = asyncio.Event()
    async with http.post(f"{proxy.url}/v1/chat/completions", data=chat_body()) as resp:
        first = await resp.content.readuntil(b"\n\n")
        assert b'"role":"assistant"' in first
        assert emulator.state.completed_streams == 0   # upstream is still holding the rest
        gate.set()
        rest = await resp.read()
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_client_disconnect_cancels_upstream_and_releases_lease(proxy, emulator, http):
    await (await http.post(f"{proxy.url}/proxy/models/load", json={"model": MODEL})).read()
    emulator.state.faults.stream_gate = asyncio.Event()   # never set: upstream stalls
    recorded = asyncio.Event()
    records = []

    class Listener:
        def on_request(self, r):
            records.append(r)
            recorded.set()
    proxy.engine.add_listener(Listener())
    resp = await http.post(f"{proxy.url}/v1/chat/completions", data=chat_body())
    await resp.content.readuntil(b"\n\n")
    resp.close()                                           # the client goes away mid-stream
    await emulator.state.wait_for(lambda: emulator.state.cancelled_streams == 1)
    await recorded.wait()
    assert proxy.engine.entry(MODEL).leases == 0
    assert records[0].ok is False and records[0].status == 499


async def test_stream_without_upstream_usage_is_counted_and_marked_estimated(
        make_emulator, make_proxy, http):
    from proxy.emulator import EmulatorOptions
    old = await make_emulator(options=EmulatorOptions(version="0.3"))
    proxy = await make_proxy(old.url)
    # LM Studio before 0.3.18 ignores stream_options; emulate by asking the 0.3 server for none.
    raw = orjson.dumps({"model": MODEL, "stream": True, "max_tokens": 6,
                        "messages": [{"role": "user", "content": "x"}]})
    async with http.post(f"{old.url}/v1/chat/completions", data=raw) as resp:
        assert b'"usage"' not in await resp.read()
    from proxy.server.streaming import StreamMeter
    meter = StreamMeter(0.0, strip_usage_chunk=True)
    async with http.post(f"{old.url}/v1/chat/completions", data=raw) as resp:
        meter.feed(await resp.read())
    assert meter.tokens_estimated and meter.completion_tokens_or_estimate() == 6
    assert proxy.engine.api_level.value == "state-only"


@pytest.mark.parametrize("body,expected", [
    (b'{"data": [{"embedding": [0.1, 0.2]}], "usage": {"prompt_tokens": 3, "total_tokens": 3}}',
     (3, 0)),
    (b'{"output": [], "usage": {"input_tokens": 4, "output_tokens": 9, '
     b'"input_tokens_details": {"cached_tokens": 0}}}', (4, 9)),
    (b'{"choices": [{"message": {"content": "a \\"usage\\": {}"}}], '
     b'"usage": {"prompt_tokens": 1, "completion_tokens": 2}}', (1, 2)),
    (b'{"choices": []}', None),
])
def test_usage_is_read_without_decoding_the_whole_body(body, expected):
    from proxy.server.streaming import SMALL_BODY_BYTES, usage_of_body
    assert usage_of_body(body) == expected
    padded = body[:1] + b'"pad": "' + b"x" * SMALL_BODY_BYTES + b'", ' + body[1:]
    assert usage_of_body(padded) == expected          # large bodies take the regex path


@pytest.mark.parametrize("tail", [b"", b"data: {\"choices\":[],\"usage\":{}}\n\n"],
                         ids=["fast-path", "usage-path"])
def test_only_the_done_event_ends_a_stream_not_the_word_in_a_models_text(tail):
    meter = StreamMeter(0.0, strip_usage_chunk=False)
    meter.feed(b'data: {"choices":[{"delta":{"content":"[DONE]"}}]}\n\n' + tail)
    assert not meter.done and meter.content_events == 1
    meter.feed(b"data: [DONE]\n\n")
    assert meter.done


@pytest.mark.parametrize("done", [b"data:[DONE]\n\n", b"data: [DONE]\r\n\r\n"],
                         ids=["no-space", "crlf"])
@pytest.mark.parametrize("tail", [b"", b"data: {\"choices\":[],\"usage\":{}}\n\n"],
                         ids=["fast-path", "usage-path"])
def test_the_done_event_in_each_spelling_sse_allows_ends_a_stream(done, tail):
    """SSE allows no space after 'data:' and CRLF line ends; servers other than LM Studio
    send them."""
    meter = StreamMeter(0.0, strip_usage_chunk=False)
    meter.feed(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n' + tail)
    assert not meter.done
    meter.feed(done)
    assert meter.done


@pytest.mark.parametrize("event", [
    b'data: {"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"a'
    b'\\":"}}]}}]}\n\n',
    b'data: {"choices":[{"delta":{"reasoning_content":"Let me"}}]}\n\n',
    b'data: {"choices":[{"delta":{"reasoning":"Let me"}}]}\n\n',
    b'data: {"type":"content_block_delta","delta":{"type":"thinking_delta","thinking":"Hm"}}\n\n',
    b'data: {"type":"content_block_delta","delta":{"type":"input_json_delta",'
    b'"partial_json":"{\\"c"}}\n\n',
    b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n',     # as Python's json writes it
], ids=["tool-arguments", "reasoning_content", "reasoning", "thinking", "partial_json",
        "spaced"])
@pytest.mark.parametrize("tail", [b"", b"data: {\"choices\":[],\"usage\":{}}\n\n"],
                         ids=["fast-path", "usage-path"])
def test_every_kind_of_generated_delta_is_a_first_token(event, tail):
    meter = StreamMeter(0.0, strip_usage_chunk=False)
    meter.feed(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
               b'data: {"choices":[{"delta":{"tool_calls":[{"function":{"name":"f",'
               b'"arguments":""}}]}}]}\n\n'
               b'data: {"reasoning":{"effort":"low"},"choices":[]}\n\n')
    assert meter.ttft_s is None and meter.content_events == 0   # nothing generated yet
    meter.feed(event + tail)
    assert meter.ttft_s is not None and meter.content_events == 1


@pytest.mark.parametrize("data,expected", [
    (b'{"id":"c", "choices":[{"index":0}], "usage":{"a":{"b":1}}}',
     b'{"id":"c", "choices":[{"index":0}]}'),
    (b'{ "usage" : null, "id":"c","choices":[{"delta":{"content":"usage"}}]}',
     b'{ "id":"c","choices":[{"delta":{"content":"usage"}}]}'),
    (b'{"usage":{"p":1},"choices":[{"usage":2}]}', b'{"choices":[{"usage":2}]}'),
    (b'{"choices":[{"usage":2}],"usage":null}', b'{"choices":[{"usage":2}]}'),
    (b'{"choices":[{"delta":{"content":"\xc3\xa9 \\u00e9"}}],"usage":null}',
     b'{"choices":[{"delta":{"content":"\xc3\xa9 \\u00e9"}}]}'),
    (b'{"usage": null , "choices":[{"index":0}]}', b'{"choices":[{"index":0}]}'),
    (b'{"choices":[{"usage":null}],"usage":null}', b'{"choices":[{"usage":null}]}'),
], ids=["last", "first", "nested-after", "nested-before", "escapes-kept", "null-first",
        "null-nested-before"])
def test_usage_is_cut_from_a_chunk_with_choices_and_every_other_byte_kept(data, expected):
    meter = StreamMeter(0.0, strip_usage_chunk=True)
    assert meter.feed(b"id: 7\ndata: " + data + b"\r\n\r\n") == \
        b"id: 7\ndata: " + expected + b"\r\n\r\n"
    assert meter.feed(b"data: " + data + b"\n\n") == b"data: " + expected + b"\n\n"


def test_usage_in_a_data_field_split_over_lines_is_cut_by_rewriting_the_event():
    meter = StreamMeter(0.0, strip_usage_chunk=True)
    out = meter.feed(b'id: 7\ndata: {"choices":[{"index":0}],\n'
                     b'data: "usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n')
    assert out == b'id: 7\ndata: {"choices":[{"index":0}]}\n\n'
    assert (meter.prompt_tokens, meter.completion_tokens) == (3, 4)


def test_a_last_event_without_its_blank_line_is_measured_and_cut_too():
    """The stream ends without the blank line after its last event: flush() hands that event
    on as feed() would have, the usage read from it and cut when the proxy asked for it."""
    meter = StreamMeter(0.0, strip_usage_chunk=True)
    assert meter.feed(b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
                      b'data: {"choices":[],"usage":{"prompt_tokens":3,'
                      b'"completion_tokens":4}}') == \
        b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    assert meter.flush() == b""
    assert (meter.prompt_tokens, meter.completion_tokens) == (3, 4)


def test_usage_the_client_asked_for_is_left_in_place():
    meter = StreamMeter(0.0, strip_usage_chunk=False)
    event = b'data: {"choices":[{"index":0}],"usage":{"prompt_tokens":3}}\n\n'
    assert meter.feed(event) == event and meter.prompt_tokens == 3
