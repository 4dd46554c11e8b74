"""Conformance of both forwarding clients (upstream.client: fast | aiohttp) at the Upstream seam.

Each case runs a small raw-asyncio HTTP/1.1 server on a real loopback socket that does exactly
what the case needs (stall, reset, close, pace events, answer 100 Continue, ...), and drives it
through `LMStudioUpstream.request()`, the path every forwarded request takes.
"""
from __future__ import annotations

import asyncio
import gc
import hashlib
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import psutil
import pytest

from proxy.config import UpstreamConfig
from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from proxy.upstream.lmstudio import LMStudioUpstream

TLS_DIR = Path(__file__).parent / "tls"
MiB = 1024 * 1024

Handler = Callable[["Exchange"], Awaitable[None]]


class Exchange:
    """One connection on the test server, with helpers to read requests off it."""

    def __init__(self, server: "RawServer", reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, index: int) -> None:
        self.server, self.reader, self.writer, self.index = server, reader, writer, index

    async def request(self) -> tuple[str, str, list[tuple[str, str]], bytes] | None:
        """(method, target, raw headers, body), or None when the client closed."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:] if line]
        low = {k.lower(): v for k, v in headers}
        self.server.requests.append((method, target, headers))
        if low.get("expect", "").lower() == "100-continue":
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if low.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                body += await self.reader.readexactly(size + 2)
                del body[-2:]
                if size == 0:
                    break
            return method, target, headers, bytes(body)
        length = int(low.get("content-length", 0))
        return method, target, headers, await self.reader.readexactly(length)

    def answer(self, body: bytes = b"ok", *, status: str = "200 OK",
               headers: tuple[str, ...] = ()) -> None:
        extra = "".join(f"{h}\r\n" for h in headers)
        self.writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
                          .encode() + body)

    async def wait_closed_by_client(self) -> float:
        """Until the client's side closes; returns when (perf_counter)."""
        while await self.reader.read(65536):
            pass
        return time.perf_counter()

    def reset(self) -> None:
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


class RawServer:
    def __init__(self, handler: Handler, tls: bool = False) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[str, str, list[tuple[str, str]]]] = []
        self.tls = tls
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> "RawServer":
        ctx = None
        if self.tls:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(TLS_DIR / "cert.pem", TLS_DIR / "key.pem")
        self._server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0, ssl=ctx)
        return self

    @property
    def url(self) -> str:
        port = self._server.sockets[0].getsockname()[1]   # type: ignore[union-attr]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._tasks.add(asyncio.current_task())   # type: ignore[arg-type]
        try:
            await self.handler(Exchange(self, reader, writer, self.connections))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def serve_forever(handler: Callable[[Exchange, tuple], Awaitable[bool | None]]) -> Handler:
    """A keep-alive connection handler: `handler(ex, request)` per request; False closes."""
    async def on_conn(ex: Exchange) -> None:
        while (req := await ex.request()) is not None:
            if await handler(ex, req) is False:
                return
    return on_conn


@pytest.fixture(params=["fast", "aiohttp"])
def client(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., Awaitable[RawServer]]]:
    started: list[RawServer] = []

    async def start(handler: Handler, **kwargs: Any) -> RawServer:
        s = await RawServer(handler, **kwargs).start()
        started.append(s)
        return s
    yield start
    for s in started:
        await s.close()


@pytest.fixture
async def upstream(client: str) -> AsyncIterator[Callable[..., Awaitable[LMStudioUpstream]]]:
    made: list[LMStudioUpstream] = []

    async def make(url: str, **config: Any) -> LMStudioUpstream:
        config.setdefault("read_timeout_s", 10.0)
        up = LMStudioUpstream(UpstreamConfig(url=url, client=client, **config))
        await up.start()
        made.append(up)
        return up
    yield make
    for up in made:
        await up.close()


def aiohttp_cannot(request: pytest.FixtureRequest, client: str, reason: str) -> None:
    """A case aiohttp's client fails: expected to fail (strictly, so a fix shows)."""
    if client == "aiohttp":
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


async def echo(ex: Exchange, req: tuple) -> None:
    ex.answer(req[3], headers=(f"X-Method: {req[0]}",))


async def test_16mib_request_and_response_bodies_arrive_whole(servers, upstream):
    srv = await servers(serve_forever(echo))
    up = await upstream(srv.url)
    body = bytes(range(256)) * (16 * MiB // 256)
    async with up.request("POST", "/v1/echo", {}, body) as resp:
        got = await resp.read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()


async def test_chunked_upload_is_sent_as_it_comes(servers, upstream):
    srv = await servers(serve_forever(echo))
    up = await upstream(srv.url)

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(3):
            yield b"piece-%d;" % i
    async with up.request("POST", "/v1/up", {}, pieces()) as resp:
        assert await resp.read() == b"piece-0;piece-1;piece-2;"
    assert ("Transfer-Encoding", "chunked") in srv.requests[0][2]


async def test_sse_events_arrive_as_separate_reads_before_the_next_is_sent(servers, upstream):
    acks = [asyncio.Event() for _ in range(3)]

    async def paced(ex: Exchange) -> None:
        await ex.request()
        ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n")
        for i, ack in enumerate(acks):
            event = b"data: %d\n\n" % i
            ex.writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await ack.wait()            # the client has this event before the next is written
        ex.writer.write(b"0\r\n\r\n")
        await ex.wait_closed_by_client()
    srv = await servers(paced)
    up = await upstream(srv.url)
    got = []
    async with up.request("POST", "/v1/chat/completions", {}, b"{}") as resp:
        async for chunk in resp.chunks():
            got.append(chunk)
            acks[len(got) - 1].set()
    assert got == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]


async def test_one_connection_serves_many_requests(servers, upstream):
    srv = await servers(serve_forever(echo))
    up = await upstream(srv.url)
    for i in range(20):
        async with up.request("POST", "/v1/x", {}, b"%d" % i) as resp:
            assert await resp.read() == b"%d" % i
    assert srv.connections == 1


async def test_requests_queued_on_one_connection_each_get_their_own_answer(servers, upstream):
    srv = await servers(serve_forever(echo))
    up = await upstream(srv.url, max_connections=1)

    async def one(i: int) -> bytes:
        async with up.request("POST", "/v1/x", {}, b"request-%d" % i) as resp:
            return await resp.read()
    got = await asyncio.gather(*(one(i) for i in range(16)))
    assert got == [b"request-%d" % i for i in range(16)]
    assert srv.connections == 1


async def test_disconnect_mid_stream_closes_the_upstream_within_100ms(servers, upstream):
    seen_close = asyncio.get_running_loop().create_future()

    async def streaming(ex: Exchange) -> None:
        await ex.request()
        ex.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"9\r\ndata: 0\n\n\r\n")
        seen_close.set_result(await ex.wait_closed_by_client())
    srv = await servers(streaming)
    up = await upstream(srv.url)
    with pytest.raises(ConnectionResetError):   # as the handler sees a client that left
        async with up.request("POST", "/v1/chat/completions", {}, b"{}") as resp:
            await anext(resp.chunks())
            left_at = time.perf_counter()
            raise ConnectionResetError
    assert await seen_close - left_at < 0.1


async def test_disconnect_before_headers_closes_the_upstream_within_100ms(servers, upstream):
    got_request = asyncio.Event()
    seen_close = asyncio.get_running_loop().create_future()

    async def silent(ex: Exchange) -> None:
        await ex.request()
        got_request.set()                         # and never answer
        seen_close.set_result(await ex.wait_closed_by_client())
    srv = await servers(silent)
    up = await upstream(srv.url)

    async def forward() -> None:
        async with up.request("POST", "/v1/chat/completions", {}, b"{}") as resp:
            await resp.read()
    task = asyncio.create_task(forward())
    await got_request.wait()
    task.cancel()                                 # what handler_cancellation does on a hang-up
    left_at = time.perf_counter()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await seen_close - left_at < 0.1


async def test_a_reader_that_stops_reading_512mib_keeps_memory_flat(servers, upstream):
    blocked = asyncio.Event()
    piece = b"x" * MiB

    async def firehose(ex: Exchange) -> None:
        await ex.request()
        ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (512 * MiB))
        for _ in range(512):
            ex.writer.write(piece)
            try:   # the socket stays full for a while only if the client stopped reading
                await asyncio.wait_for(ex.writer.drain(), 0.5)
            except asyncio.TimeoutError:
                blocked.set()
                await ex.wait_closed_by_client()
                return
        blocked.set()
    srv = await servers(firehose)
    up = await upstream(srv.url)
    gc.collect()
    me = psutil.Process()
    before = me.memory_info().rss
    async with up.request("GET", "/big", {}, None) as resp:
        await anext(resp.chunks())               # then read no more
        await asyncio.wait_for(blocked.wait(), 20)
        grown = me.memory_info().rss - before
    assert resp.status == 200 and grown < 10 * MiB


async def test_upstream_closing_a_pooled_connection_between_requests(servers, upstream, client,
                                                                     request):
    aiohttp_cannot(request, client, "aiohttp writes a POST to a pooled connection the upstream "
                   "has closed (its FIN not yet read) and fails it: ClientOSError")
    closed = asyncio.Event()

    async def once(ex: Exchange, req: tuple) -> bool:
        ex.answer(b"first" if ex.index == 1 else b"again")
        await ex.writer.drain()
        ex.writer.close()
        await ex.writer.wait_closed()
        closed.set()
        return False
    srv = await servers(serve_forever(once))
    up = await upstream(srv.url)
    async with up.request("POST", "/v1/x", {}, b"{}") as resp:
        assert await resp.read() == b"first"
    await closed.wait()
    async with up.request("POST", "/v1/x", {}, b"{}") as resp:   # not idempotent: not retried
        assert await resp.read() == b"again"
    assert srv.connections == 2


async def test_a_get_on_a_connection_closed_under_it_is_retried(servers, upstream):
    async def drop_second(ex: Exchange, req: tuple) -> bool:
        if ex.index == 1 and len(srv.requests) == 2:
            return False                          # read it, close without an answer
        ex.answer(b"answer")
        return True
    srv = await servers(serve_forever(drop_second))
    up = await upstream(srv.url)
    for _ in range(2):
        async with up.request("GET", "/v1/models", {}, None) as resp:
            assert await resp.read() == b"answer"
    assert srv.connections == 2 and len(srv.requests) == 3


async def test_a_post_on_a_connection_closed_under_it_is_not_sent_twice(servers, upstream):
    async def drop_second(ex: Exchange, req: tuple) -> bool:
        if ex.index == 1 and len(srv.requests) == 2:
            return False
        ex.answer(b"answer")
        return True
    srv = await servers(serve_forever(drop_second))
    up = await upstream(srv.url)
    async with up.request("POST", "/v1/chat/completions", {}, b"{}") as resp:
        await resp.read()
    with pytest.raises(UpstreamError) as err:
        async with up.request("POST", "/v1/chat/completions", {}, b"{}") as resp:
            await resp.read()
    assert err.value.status == 502 and not isinstance(err.value, UpstreamTimeout)
    assert len(srv.requests) == 2


async def test_upstream_reset_mid_body_is_an_upstream_error(servers, upstream):
    async def cut(ex: Exchange) -> None:
        await ex.request()
        ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        await ex.writer.drain()
        ex.reset()
    srv = await servers(cut)
    up = await upstream(srv.url)
    with pytest.raises(UpstreamError) as err:
        async with up.request("POST", "/v1/x", {}, b"{}") as resp:
            async for _ in resp.chunks():
                pass
    assert err.value.status == 502 and not isinstance(err.value, UpstreamTimeout)


async def test_head_has_no_body_and_keeps_the_connection(servers, upstream):
    async def head_then_get(ex: Exchange, req: tuple) -> None:
        if req[0] == "HEAD":
            ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        else:
            ex.answer(b"body")
    srv = await servers(serve_forever(head_then_get))
    up = await upstream(srv.url)
    async with up.request("HEAD", "/v1/models", {}, None) as resp:
        assert resp.headers["Content-Length"] == "1234"
        assert await resp.read() == b""
    async with up.request("GET", "/v1/models", {}, None) as resp:
        assert await resp.read() == b"body"
    assert srv.connections == 1


async def test_connection_close_body_until_eof_then_a_new_connection(servers, upstream):
    async def close_delimited(ex: Exchange) -> None:
        await ex.request()
        ex.writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await ex.writer.drain()
        ex.writer.close()
    srv = await servers(close_delimited)
    up = await upstream(srv.url)
    for _ in range(2):
        async with up.request("GET", "/v1/models", {}, None) as resp:
            assert await resp.read() == b"all of it"
    assert srv.connections == 2


async def test_expect_100_continue_and_informational_answers_are_passed_over(servers, upstream):
    async def continued(ex: Exchange, req: tuple) -> None:
        ex.writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n")
        await ex.writer.drain()
        await asyncio.sleep(0.05)                 # the final answer comes in a later read
        ex.answer(req[3])
    srv = await servers(serve_forever(continued))
    up = await upstream(srv.url)
    async with up.request("POST", "/v1/x", {"Expect": "100-continue"}, b"payload") as resp:
        assert resp.status == 200
        assert await resp.read() == b"payload"
    assert "Link" not in resp.headers


async def test_bytes_after_an_answer_are_never_read_as_the_next_answer(servers, upstream):
    async def garbled(ex: Exchange, req: tuple) -> None:
        if ex.index == 1:   # an answer, then a second one nobody asked for
            ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none"
                            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")
        else:
            ex.answer(b"fresh")
    srv = await servers(serve_forever(garbled))
    up = await upstream(srv.url)
    async with up.request("GET", "/v1/models", {}, None) as resp:
        assert await resp.read() == b"one"
    async with up.request("GET", "/v1/models", {}, None) as resp:
        assert await resp.read() == b"fresh"


async def test_header_case_and_repeated_headers_are_preserved(servers, upstream):
    async def cookies(ex: Exchange, req: tuple) -> None:
        ex.answer(headers=("X-Mixed-Case: A", "Set-Cookie: a=1", "Set-Cookie: b=2"))
    srv = await servers(serve_forever(cookies))
    up = await upstream(srv.url)
    async with up.request("GET", "/v1/models", {"X-Request-Case": "v"}, None) as resp:
        items = list(resp.headers.items())
        await resp.read()
    assert ("X-Mixed-Case", "A") in items and resp.headers["x-mixed-case"] == "A"
    assert [v for k, v in items if k.lower() == "set-cookie"] == ["a=1", "b=2"]
    assert ("X-Request-Case", "v") in srv.requests[0][2]


async def test_silence_before_the_answer_is_a_timeout(servers, upstream):
    async def silent(ex: Exchange) -> None:
        await ex.request()
        await ex.wait_closed_by_client()
    srv = await servers(silent)
    up = await upstream(srv.url, read_timeout_s=0.2)
    with pytest.raises(UpstreamTimeout):
        async with up.request("POST", "/v1/x", {}, b"{}") as resp:
            await resp.read()


async def test_silence_between_bytes_is_a_timeout_not_the_length_of_the_answer(servers,
                                                                               upstream):
    async def slow_then_silent(ex: Exchange) -> None:
        await ex.request()
        ex.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(4):                        # 0.4 s of answer in 0.1 s steps...
            ex.writer.write(b"1\r\nx\r\n")
            await asyncio.sleep(0.1)
        await ex.wait_closed_by_client()          # ...then silence
    srv = await servers(slow_then_silent)
    up = await upstream(srv.url, read_timeout_s=0.3)
    got = b""
    with pytest.raises(UpstreamTimeout):
        async with up.request("POST", "/v1/x", {}, b"{}") as resp:
            async for chunk in resp.chunks():
                got += chunk
    assert got == b"xxxx"


async def test_nothing_listening_is_unreachable(upstream):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                 # bound, not listening: refused
        up = await upstream(f"http://127.0.0.1:{port}")
        with pytest.raises(UpstreamUnreachable):
            async with up.request("GET", "/v1/models", {}, None) as resp:
                await resp.read()


async def test_tls_upstream(servers, upstream):
    srv = await servers(serve_forever(echo), tls=True)
    up = await upstream(srv.url, ca_file=str(TLS_DIR / "cert.pem"))
    for _ in range(3):
        async with up.request("POST", "/v1/x", {}, b"over tls") as resp:
            assert await resp.read() == b"over tls"
    assert srv.connections == 1


async def test_a_tls_handshake_that_never_ends_is_a_connect_timeout(servers, upstream):
    async def mute(ex: Exchange) -> None:
        await ex.wait_closed_by_client()          # accepts TCP, never speaks TLS
    srv = await servers(mute)
    up = await upstream(srv.url.replace("http:", "https:"), connect_timeout_s=0.2,
                        ca_file=str(TLS_DIR / "cert.pem"))
    with pytest.raises(UpstreamTimeout):
        async with up.request("GET", "/v1/models", {}, None) as resp:
            await resp.read()


async def test_a_client_that_hangs_up_before_the_headers_aborts_the_upstream_request(
        client, make_proxy, emulator):
    """Through the proxy: handler_cancellation cancels the handler, the client drops the
    upstream connection, and the emulator's own handler is cancelled in turn."""
    proxy = await make_proxy(emulator.url, **{"upstream.client": client})
    emulator.state.faults.hang_inference = True
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b'{"model": "qwen/qwen3-4b", "messages": []}'
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await emulator.state.wait_for(lambda: emulator.state.hung_requests == 1)
    writer.transport.abort()                      # the client hangs up, no answer yet
    left_at = time.perf_counter()
    await asyncio.wait_for(emulator.state.wait_for(
        lambda: emulator.state.abandoned_hung_requests == 1), 5)
    assert time.perf_counter() - left_at < 0.1


async def test_a_chunked_upload_is_paced_by_the_upstream_reading_it(servers, upstream):
    piece = b"u" * MiB
    pulled = [0]
    lags: list[int] = []

    async def slow_reader(ex: Exchange) -> None:
        head = await ex.reader.readuntil(b"\r\n\r\n")
        assert b"chunked" in head.lower()
        got = 0
        while True:
            lags.append(pulled[0] - got)          # what the client took from its source but
            data = await ex.reader.read(MiB)      # the upstream has not read yet
            got += len(data)
            if not data or data.endswith(b"0\r\n\r\n"):
                break
        ex.answer(b"%d" % got)
        await ex.wait_closed_by_client()

    async def source() -> AsyncIterator[bytes]:
        for _ in range(64):
            pulled[0] += len(piece)
            yield piece
    srv = await servers(slow_reader)
    up = await upstream(srv.url)
    async with up.request("POST", "/v1/upload", {}, source()) as resp:
        await resp.read()
    assert pulled[0] == 64 * MiB and max(lags) < 16 * MiB


async def test_a_post_without_a_body_says_so(servers, upstream):
    srv = await servers(serve_forever(echo))
    up = await upstream(srv.url)
    async with up.request("POST", "/proxy/x", {}, None) as resp:
        assert await resp.read() == b""
    assert ("Content-Length", "0") in srv.requests[0][2]


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(servers, upstream):
    srv = await servers(serve_forever(echo))
    up = await upstream(srv.url)
    with pytest.raises(ValueError):
        async with up.request("GET", "/v1/models", {"X-Evil": "a\r\nX-Injected: 1"},
                              None) as resp:
            await resp.read()
    assert srv.requests == []


async def test_the_fast_client_adds_no_headers_of_its_own(servers, upstream, client):
    srv = await servers(serve_forever(echo))
    up = await upstream(srv.url)
    async with up.request("GET", "/v1/models", {"X-Caller": "1"}, None) as resp:
        await resp.read()
    names = {k.lower() for k, _ in srv.requests[0][2]}
    if client == "fast":
        assert names == {"host", "x-caller"}
    else:   # aiohttp adds its own User-Agent, Accept and Accept-Encoding
        assert "user-agent" in names


async def test_fast_pool_does_not_reuse_a_connection_idle_past_keepalive(servers):
    from proxy.upstream.fastclient import FastTransport
    srv = await servers(serve_forever(echo))
    pool = FastTransport(srv.url, connect_timeout_s=1, read_timeout_s=1, max_connections=4,
                    keepalive_s=0)
    for _ in range(2):
        async with pool.request("GET", "/", {}, None) as resp:
            assert await resp.read() == b""
    await pool.close()
    assert srv.connections == 2


async def test_repeated_upstream_headers_reach_the_client_through_the_proxy(
        client, servers, make_proxy, http):
    async def cookies(ex: Exchange, req: tuple) -> None:
        ex.answer(b'{"object": "list", "data": []}',
                  headers=("Content-Type: application/json", "X-Mixed-Case: A",
                           "Set-Cookie: a=1", "Set-Cookie: b=2"))
    srv = await servers(serve_forever(cookies))
    proxy = await make_proxy(srv.url, **{"upstream.client": client})
    async with http.get(f"{proxy.url}/v1/models") as resp:
        assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert resp.headers["X-Mixed-Case"] == "A"


async def test_an_upload_answered_early_stops_and_its_connection_is_not_reused(servers,
                                                                              upstream):
    async def early(ex: Exchange) -> None:
        if ex.index == 1:
            await ex.reader.readuntil(b"\r\n\r\n")
            ex.answer(b"too large", status="413 Payload Too Large")   # before the body
            try:
                while await ex.request() is not None:   # what follows is no request
                    ex.answer(b"misread")
            except ValueError:
                return
        else:
            while (req := await ex.request()) is not None:
                ex.answer(req[3])

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 1024
            await asyncio.sleep(0)                # a turn of the loop, for the answer to land
    srv = await servers(early)
    up = await upstream(srv.url)
    async with up.request("POST", "/v1/upload", {}, endless()) as resp:
        assert resp.status == 413 and await resp.read() == b"too large"
    async with up.request("POST", "/v1/x", {}, b"next") as resp:
        assert await resp.read() == b"next"


async def test_a_client_that_stops_reading_a_stream_slows_the_upstream_through_the_proxy(
        client, servers, make_proxy):
    """Backpressure end to end: the proxy's write to a full client socket waits, its client
    stops reading the upstream, the upstream's socket fills; nothing piles up in memory."""
    blocked = asyncio.Event()
    event = b'data: {"choices":[{"delta":{"content":"' + b"x" * 1000 + b'"}}]}\n\n'
    piece = b"%x\r\n%s\r\n" % (len(event) * 64, event * 64)

    async def lmstudio(ex: Exchange, req: tuple) -> bool | None:
        if req[1] == "/api/v1/models":
            ex.answer(b'{"models": [{"key": "m", "type": "llm", "size_bytes": 1000, '
                      b'"loaded_instances": [{"id": "m"}]}]}')
            return None
        ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(512 * MiB // len(piece)):
            ex.writer.write(piece)
            try:
                await asyncio.wait_for(ex.writer.drain(), 0.5)
            except asyncio.TimeoutError:
                break
        blocked.set()
        await ex.wait_closed_by_client()
        return False
    srv = await servers(serve_forever(lmstudio))
    proxy = await make_proxy(srv.url, **{"upstream.client": client})
    gc.collect()
    before = psutil.Process().memory_info().rss
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b'{"model": "m", "stream": true, "messages": []}'
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    assert b" 200 " in await reader.readuntil(b"\r\n\r\n")   # then read no more
    await asyncio.wait_for(blocked.wait(), 20)
    grown = psutil.Process().memory_info().rss - before
    writer.transport.abort()
    assert grown < 10 * MiB
