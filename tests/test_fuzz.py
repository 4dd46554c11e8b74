"""Fuzz: thousands of seeded, generated requests across every endpoint — JSON-level and byte-level
mutations, odd headers, request encodings, broken HTTP — and the proxy never answers with a
5xx of its own making, and serves normally afterwards."""
from __future__ import annotations

import asyncio
import gzip
import random
import re
import zlib
from typing import Any

import aiohttp
import orjson

MODELS = ["qwen/qwen3-4b", "google/gemma-3-12b", "text-embedding-nomic-embed-text-v1.5",
          "fast"]
INFERENCE = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
             "/v1/messages"]
OTHER = [("GET", "/v1/models"), ("GET", "/proxy/models"), ("GET", "/proxy/stats"),
         ("GET", "/proxy/health"), ("GET", "/proxy/recommendations?task_type=chat"),
         ("POST", "/proxy/models/load"), ("POST", "/proxy/models/unload"),
         ("POST", "/proxy/optimize"), ("POST", "/proxy/reload"), ("GET", "/healthz"),
         ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/v1/chat/completions"),
         ("PUT", "/v1/embeddings"), ("POST", "/v1/nonsense"), ("DELETE", "/proxy/models"),
         ("GET", "/%2e%2e/etc/passwd"), ("POST", "/proxy/clear")]
# 5xx the proxy may give for a reason (memory, LM Studio); never internal_error.
ALLOWED_5XX = {"insufficient_memory", "model_load_failed", "upstream_error",
               "upstream_unreachable", "upstream_timeout"}
ODD_VALUES: list[Any] = [None, True, 0, -1, 1.5, "", "x" * 300, [], {}, [1, [2, [3]]],
                         {"a": {"b": None}}, "\u0000\n\r\t", "\ud7ff\ue000 ünï", 2**70]
TOKENS: list[Any] = [None, -5, 0, 1, 3, 16, "7", 2.5, True, [], {}]


def valid_body(rng: random.Random, path: str) -> dict[str, Any]:
    model = rng.choice(MODELS)
    n = rng.choice([1, 2, 4, 8])
    if path == "/v1/embeddings":
        return {"model": model, "input": rng.choice(["hi", ["a", "b"]])}
    if path == "/v1/completions":
        return {"model": model, "prompt": "once", "max_tokens": n, "stream": rng.random() < .4}
    if path == "/v1/responses":
        return {"model": model, "input": "hi", "max_output_tokens": n,
                "stream": rng.random() < .4}
    return {"model": model, "max_tokens": n, "stream": rng.random() < .4,
            "messages": [{"role": "user", "content": "hi"}]}


def mutate_json(rng: random.Random, body: dict[str, Any]) -> Any:
    body = dict(body)
    op = rng.randrange(9)
    if op == 0:
        body.pop(rng.choice(list(body)), None)
    elif op == 1:
        body["model"] = rng.choice(ODD_VALUES + ["m" * rng.choice([257, 5000]), "qwen-4b",
                                                 "x\nPOST / 200", "../../etc"])
    elif op == 2:
        key = rng.choice(["max_tokens", "max_output_tokens", "max_completion_tokens"])
        body[key] = rng.choice(TOKENS)
    elif op == 3:
        body["stream"] = rng.choice(ODD_VALUES)
        body["stream_options"] = rng.choice(ODD_VALUES + [{"include_usage": True}])
    elif op == 4:
        body["messages"] = rng.choice(ODD_VALUES + [[{"role": "user"}], [{"content": 5}]])
    elif op == 5:
        body[rng.choice(["extra", "seed", "n", "tools", "temperature"])] = rng.choice(ODD_VALUES)
    elif op == 6:
        body["nested"] = f"__deep_{rng.choice([10, 200, 2000])}__"   # see encode_json
    elif op == 7:
        return rng.choice(ODD_VALUES)          # not an object at all
    else:
        body["pad"] = " " * rng.choice([100, 40000])    # over server.max_body_bytes
    return body


def encode_json(value: Any) -> bytes:
    try:
        raw = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):   # 2**70: as a client might write it
        return repr(value).encode()
    m = re.search(rb'"__deep_(\d+)__"', raw)
    if m:   # nesting deeper than any JSON library's default limit
        depth = int(m.group(1))
        raw = raw.replace(m.group(0), b"[" * depth + b"0" + b"]" * depth)
    return raw


def mutate_bytes(rng: random.Random, raw: bytes) -> bytes:
    op = rng.randrange(6)
    if op == 0 and raw:
        return raw[:rng.randrange(len(raw))]
    if op == 1 and raw:
        b = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if op == 2:
        return raw + b"\xff\xfe\x00garbage"
    if op == 3:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
    if op == 4:
        return b""
    return raw.replace(b'"', b"'", 1)


def headers_and_body(rng: random.Random, raw: bytes) -> tuple[dict[str, str], bytes]:
    headers: dict[str, str] = {}
    pick = rng.random()
    if pick < 0.08:
        headers["Content-Encoding"] = "gzip"
        raw = gzip.compress(raw) if rng.random() < 0.6 else raw
    elif pick < 0.14:
        headers["Content-Encoding"] = "deflate"
        raw = zlib.compress(raw) if rng.random() < 0.6 else raw
    elif pick < 0.18:
        headers["Content-Encoding"] = rng.choice(["br", "zstd", "gzip, br", "identity", "x"])
    if rng.random() < 0.3:
        headers["Content-Type"] = rng.choice(["application/json", "text/plain", "", "a/b; c=d",
                                              "multipart/form-data; boundary=x"])
    if rng.random() < 0.2:
        headers["Authorization"] = rng.choice(["Bearer", "Bearer x", "Basic Zm9vOmJhcg==",
                                               "bearer  sk-" + "a" * 4000, "\u00e9"])
    if rng.random() < 0.1:
        headers["x-api-key"] = rng.choice(["", "k" * 5000, "sk-1"])
    if rng.random() < 0.1:
        headers[rng.choice(["Accept", "X-Odd", "Connection", "Expect", "TE"])] = rng.choice(
            ["*/*", "close", "keep-alive", "100-continue", "trailers", "v" * 6000])
    return headers, raw


def generate(rng: random.Random) -> tuple[str, str, dict[str, str], bytes]:
    if rng.random() < 0.2:
        method, path = rng.choice(OTHER)
        body: Any = rng.choice([None, {"model": rng.choice(MODELS)},
                                {"model": rng.choice(ODD_VALUES), "priority": rng.choice(
                                    ODD_VALUES + [1, 10, 11])}, "[]"])
        raw = b"" if body is None else encode_json(body)
    else:
        method, path = "POST", rng.choice(INFERENCE)
        value: Any = valid_body(rng, path)
        if rng.random() < 0.6:
            value = mutate_json(rng, value)
        raw = encode_json(value)
        if rng.random() < 0.25:
            raw = mutate_bytes(rng, raw)
    if rng.random() < 0.05:
        path += rng.choice(["?a=1&a=2", "?%00", "?x=" + "q" * 3000, "/", "//"])
    headers, raw = headers_and_body(rng, raw)
    return method, path, headers, raw


async def send(http: aiohttp.ClientSession, url: str, req: tuple[str, str, dict[str, str],
               bytes], findings: list[str], seen: dict[int, int]) -> None:
    method, path, headers, raw = req
    try:
        async with http.request(method, url + path, data=raw or None, headers=headers,
                                skip_auto_headers=["Content-Type"]) as resp:
            body = await resp.read()
            seen[resp.status] = seen.get(resp.status, 0) + 1
            if resp.status >= 500:
                try:
                    code = orjson.loads(body)["error"]["code"]
                except Exception:
                    code = None
                if code not in ALLOWED_5XX:
                    findings.append(f"{resp.status} {code} for {method} {path[:80]} "
                                    f"{headers} {raw[:120]!r}: {body[:200]!r}")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        findings.append(f"{type(exc).__name__} for {method} {path[:80]} {headers} "
                        f"{raw[:120]!r}")


BROKEN_HTTP = [b"GET / HTTP/1.1\r\n\r\n", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Content-Length: -1\r\n\r\n", b"GARBAGE\r\n\r\n", b"GET /\x00 HTTP/1.1\r\n\r\n",
               b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
               b"\r\nzz\r\n", b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
               b"Content-Length: 6\r\n\r\nhello", b"GET /healthz HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
               b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
               b"Content-Encoding: gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n"]


def non_utf8_header(rng: random.Random) -> bytes:
    """A request with a header value that is not UTF-8 (credentials included)."""
    method, path = rng.choice([("POST", p) for p in INFERENCE] + OTHER)
    name = rng.choice([b"Authorization", b"X-Api-Key", b"Cookie", b"X-Odd", b"Content-Type"])
    junk = bytes(rng.randrange(0x80, 0x100) for _ in range(rng.randint(1, 12)))
    value = rng.choice([b"Bearer " + junk, junk, b"sk-" + junk + b"1", b"Bearer sk-1" + junk])
    body = b'{"model": "fast", "max_tokens": 1, "messages": []}' if method == "POST" else b""
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + name + b": " + value +
            b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


async def raw_status(url: str, data: bytes, *, eof: bool = True) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    if eof and writer.can_write_eof():
        writer.write_eof()
    try:
        return await reader.readline()
    finally:
        writer.close()


async def test_fuzzed_requests_never_get_a_5xx_of_the_proxys_making(make_proxy, emulator):
    settings = {"eviction.queue_timeout_s": 0.5, "upstream.read_timeout_s": 5,
                "server.max_body_bytes": 32768,
                "models": {"qwen/qwen3-4b": {"aliases": ["fast"]}}}
    open_proxy = await make_proxy(emulator.url, **settings)
    guarded = await make_proxy(emulator.url, **settings, **{
        "auth.keys": [{"name": "a", "key": "sk-1", "models": ["fast"]}],
        "auth.admin_token": "adm"})
    rng = random.Random(20261201)
    requests = [generate(rng) for _ in range(3200)]
    findings: list[str] = []
    seen: dict[int, int] = {}
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2),
                                      timeout=aiohttp.ClientTimeout(total=20)) for _ in range(4)]
    try:
        async def worker(i: int) -> None:
            # A quarter of the traffic goes to a proxy with keys (some sent, most not).
            for req in requests[i::8]:
                proxy = guarded if i % 4 == 3 else open_proxy
                await send(sessions[i % 4], proxy.url, req, findings, seen)
        await asyncio.gather(*(worker(i) for i in range(8)))
        statuses = [await raw_status(open_proxy.url, mutate_bytes(rng, data) if i % 2 else
                                     data) for i, data in enumerate(BROKEN_HTTP * 25)]
        for proxy in (open_proxy, guarded):     # HTTP clients refuse to send these bytes
            answers = [await raw_status(proxy.url, non_utf8_header(rng), eof=False)
                       for _ in range(60)]
            assert all(a.startswith(b"HTTP/1.1 ") for a in answers)    # each one answered
            statuses += answers
        for proxy, auth in ((open_proxy, {}), (guarded, {"Authorization": "Bearer sk-1"})):
            async with sessions[0].get(f"{proxy.url}/healthz") as resp:
                assert resp.status == 200
            async with sessions[0].post(f"{proxy.url}/v1/chat/completions", headers=auth,
                                        json={"model": "fast", "max_tokens": 2,
                                              "messages": []}) as resp:
                assert resp.status == 200
            assert proxy.engine.active_leases() == []
    finally:
        for s in sessions:
            await s.close()
    assert sum(seen.values()) + len(findings) >= 3000
    assert findings == []
    assert not [s for s in statuses if s.startswith(b"HTTP/1.1 5")]
    assert len(seen) > 5     # the mutations did reach many outcomes (200, 400, 404, 413, ...)
