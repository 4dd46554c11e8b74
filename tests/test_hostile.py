"""Hostile input at the HTTP edge: long names, forged log lines, request encodings, sizes."""
from __future__ import annotations

import asyncio
import gzip
import logging
import zlib
from unittest import mock

import orjson
import pytest
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParserPy

from proxy.errors import clip
from proxy.server.keys import ACCESS_LOG
from proxy.server.serving import _parse_error_summary
from proxy.upstream.lmstudio import LMStudioUpstream

from .conftest import proxy_config
from .test_auth import RecordingUpstream

MODEL = "qwen/qwen3-4b"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def error_of(resp):
    body = await resp.json()
    return resp.status, body["error"]


async def test_an_overlong_model_name_is_refused_before_any_lookup(proxy, emulator, http):
    calls_before = emulator.state.inference_calls.copy()
    for path in ("/v1/chat/completions", "/proxy/models/load"):
        async with http.post(proxy.url + path, json={**CHAT, "model": "m" * 1_000_000}) as r:
            status, error = await error_of(r)
        assert status == 400 and error["param"] == "model"
        assert "256" in error["message"] and len(error["message"]) < 200
    assert emulator.state.inference_calls == calls_before


async def test_a_newline_in_a_model_name_cannot_forge_a_log_line(proxy, http, caplog):
    caplog.set_level(logging.INFO, logger="proxy.request")
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         json={**CHAT, "model": "x\nPOST /v1/chat/completions forged 200"}) as r:
        assert r.status == 404
    proxy.app[ACCESS_LOG].flush()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "proxy.request"]
    assert "\n" not in line and "x\\nPOST" in line


def test_clip_escapes_and_truncates():
    assert clip("a\x1b[31mb\r\n") == "a\\x1b[31mb\\r\\n"
    assert clip("é" * 500) == "é" * 200 + "…"
    assert len(clip("\n" * 500)) == 201


async def test_an_unknown_route_echoes_a_clipped_path(proxy, http):
    async with http.get(f"{proxy.url}/v1/{'a' * 5000}") as r:
        status, error = await error_of(r)
    assert status == 404 and len(error["message"]) < 260


@pytest.mark.parametrize("encoding,compress", [
    ("gzip", gzip.compress), ("deflate", zlib.compress),
    ("deflate", lambda b: zlib.compress(b, wbits=-15))])   # raw deflate, as some clients send
async def test_an_encoded_body_is_decoded_and_forwarded_plain(make_proxy, emulator, http,
                                                              encoding, compress):
    config = proxy_config(emulator.url)
    upstream = RecordingUpstream(LMStudioUpstream(config.upstream))
    proxy = await make_proxy(emulator.url, config=config, app_kwargs={"upstream": upstream})
    async with http.post(f"{proxy.url}/v1/chat/completions", data=compress(orjson.dumps(CHAT)),
                         headers={"Content-Encoding": encoding,
                                  "Content-Type": "application/json"}) as r:
        assert r.status == 200 and (await r.json())["model"] == MODEL
    assert "content-encoding" not in upstream.sent_headers[-1]


async def test_a_plain_body_labelled_gzip_is_a_400_and_the_connection_lives_on(proxy, http):
    url = f"{proxy.url}/v1/chat/completions"
    for encoding in ("gzip", "deflate"):
        async with http.post(url, data=orjson.dumps(CHAT),
                             headers={"Content-Encoding": encoding}) as r:
            status, error = await error_of(r)
            assert status == 400 and error["code"] == "invalid_request"
    async with http.post(url, data=gzip.compress(orjson.dumps(CHAT))[:-6],
                         headers={"Content-Encoding": "gzip"}) as r:
        assert r.status == 400 and "truncated" in (await r.json())["error"]["message"]
    async with http.post(url, json=CHAT) as r:    # same keep-alive connection
        assert r.status == 200


async def test_an_unsupported_encoding_is_415(proxy, http):
    for encoding in ("br", "zstd", "gzip, gzip"):
        async with http.post(f"{proxy.url}/v1/chat/completions", data=b"\x00\x01",
                             headers={"Content-Encoding": encoding}) as r:
            status, error = await error_of(r)
        assert status == 415 and error["code"] == "unsupported_content_encoding"


async def test_a_gzip_bomb_is_413_on_its_decoded_size(make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url, **{"server.max_body_bytes": 1 << 20})
    bomb = gzip.compress(b"{" + b" " * (8 << 20) + b"}")        # 8 MiB in ~8 KB
    assert len(bomb) < 64 * 1024
    async with http.post(f"{proxy.url}/v1/chat/completions", data=bomb,
                         headers={"Content-Encoding": "gzip"}) as r:
        status, error = await error_of(r)
    assert status == 413 and "decompressed" in error["message"]


async def raw_request(url: str, head: bytes, body: bytes = b"") -> tuple[bytes, bytes]:
    """Send bytes on a fresh socket; return (status line, everything until the server closes
    or ends one response)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head + body)
    await writer.drain()
    try:
        status = await reader.readline()
        rest = await reader.read(65536)
    finally:
        writer.close()
    return status, rest


async def test_a_body_declared_bigger_than_allowed_is_refused_at_once(proxy):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
            b"\r\nContent-Length: 1000000000\r\n\r\n")
    status, rest = await raw_request(proxy.url, head, b'{"model":')
    assert status.startswith(b"HTTP/1.1 413") and b"request_too_large" in rest


async def test_a_trickling_body_gets_408(make_proxy, emulator):
    proxy = await make_proxy(emulator.url, **{"server.body_timeout_s": 0.3})
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n")
    status, rest = await raw_request(proxy.url, head, b'{"model":')
    assert status.startswith(b"HTTP/1.1 408") and b"request_timeout" in rest


async def test_a_bomb_is_refused_without_ever_holding_its_decoded_size(make_proxy, emulator,
                                                                     http):
    import tracemalloc
    proxy = await make_proxy(emulator.url, **{"server.max_body_bytes": 1 << 20})
    bomb = gzip.compress(b" " * (16 << 20), compresslevel=9)     # 16 MiB in ~16 KB
    tracemalloc.start()
    try:
        async with http.post(f"{proxy.url}/v1/chat/completions", data=bomb,
                             headers={"Content-Encoding": "gzip"}) as r:
            assert r.status == 413
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_bytes < 4 << 20      # a 256 KB step at a time, never the 16 MiB


@pytest.mark.parametrize("head", [
    b"POST /proxy/clear HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer adm-0123456789\x00\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nX-Api-Key: sk-0123456789\x01\r\n\r\n",
    b"JRMI\x00\x01 sk-0123456789\r\n\r\n",
    b"GET /healthz HTTP/1.1\nAuthorization: Bearer sk-0123456789\n\n",
    b"GET http://[sk-0123456789 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /v1/models?api_key=sk-0123456789\x00 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"])
async def test_malformed_http_gets_a_fixed_answer_and_one_log_line(make_proxy, emulator, caplog,
                                                                   head):
    proxy = await make_proxy(emulator.url, **{"auth.admin_token": "adm-0123456789"})
    caplog.set_level(logging.DEBUG)
    status, rest = await raw_request(proxy.url, head)
    assert status.split()[1] == b"400"
    body = rest.partition(b"\r\n\r\n")[2]
    assert orjson.loads(body)["error"]["code"] == "malformed_request"
    assert b"0123456789" not in rest
    (record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert record.exc_info is None and "\n" not in record.getMessage()
    assert "0123456789" not in caplog.text and len(record.getMessage()) < 200


async def test_malformed_http_ends_the_connection(proxy):
    """The parser lost its place in the stream: nothing after the bad request is read."""
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /healthz HTTP/1.1\r\nX-Bad\x00: v\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)     # until the server closes
    writer.close()
    assert answer.split(b" ", 2)[1] == b"400" and b"malformed_request" in answer


@pytest.mark.parametrize("head", [b"GET /x HTTP/9.9 sk-0123456789\r\nHost: 127.0.0.1\r\n\r\n",
                                  b"GET /x HTTP/1.1\r\nBad Header sk-0123456789: v\r\n\r\n"])
async def test_the_pure_python_parsers_quoted_bytes_are_not_logged(head):
    """aiohttp without its C extension quotes the offending bytes in the message's first
    line (AIOHTTP_NO_EXTENSIONS, or a platform without a wheel)."""
    parser = HttpRequestParserPy(mock.Mock(), asyncio.get_running_loop(), 2 ** 16)
    with pytest.raises(HttpProcessingError) as refused:
        parser.feed_data(head)
    assert "0123456789" in str(refused.value)
    assert "0123456789" not in _parse_error_summary(refused.value)


def nested_chat(model: str, depth: int, stream: bool) -> bytes:
    """A chat body whose extra field nests `depth` arrays (the whole body: depth + 1 levels)."""
    head = orjson.dumps({**CHAT, "model": model, "stream": stream})[:-1]
    return head + b',"x":' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("model,depth,stream", [
    ("fast", 254, False),       # the alias is rewritten: the body is written back
    (MODEL, 254, True),         # include_usage is added: likewise
    (MODEL, 1000, False),       # forwarded untouched, refused all the same
], ids=["alias", "stream", "exact-key"])
async def test_a_body_nested_past_what_the_proxy_can_rewrite_is_a_400_charged_to_no_model(
        make_proxy, emulator, http, model, depth, stream):
    proxy = await make_proxy(emulator.url, **{"models": {MODEL: {"aliases": ["fast"]}},
                                              "health.min_requests": 1})
    url = f"{proxy.url}/v1/chat/completions"
    for _ in range(3):
        async with http.post(url, data=nested_chat(model, depth, stream)) as r:
            status, error = await error_of(r)
        assert (status, error["code"]) == (400, "invalid_request")
        assert "254 levels" in error["message"]
    usage = proxy.engine.usage(MODEL)
    assert (usage.requests, usage.failures) == (0, 0)
    async with http.get(f"{proxy.url}/proxy/health") as r:
        assert (await r.json())["alerts"] == []
    async with http.post(url, data=nested_chat(model, 253, stream)) as r:
        assert r.status == 200       # 254 levels in all: forwarded, rewritten as needed
        await r.read()
