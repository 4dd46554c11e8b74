"""A pooled HTTP/1.1 client for the forwarding hot path: asyncio protocols and httptools (llhttp).

Why not aiohttp's ClientSession here: per request it builds a ClientRequest, a ClientResponse,
a StreamReader, timers, a cookie jar pass and a trace context; the proxy needs none of that to
move bytes, and the upstream client is where a Python relay spends its time (bench/overhead.py).

What it does: keep-alive connections per upstream, LIFO reuse, a bound on open connections;
each read of the socket becomes one chunk for the caller at once (SSE is never held back);
reading pauses while the caller has more than `HIGH_WATER_BYTES` unread (a slow client slows the
upstream, memory stays flat); request bodies are bytes or an async iterable (sent chunked, with
the socket's backpressure); 1xx answers are skipped, HEAD and `Connection: close` honoured; a
pooled connection found dead is replaced before anything is sent, and one that dies before any
answer byte is retried only for idempotent methods. `read_timeout_s` bounds silence between
bytes, `connect_timeout_s` the connect (and the TLS handshake).

Its failures are the classes below; the adapter maps them to the project's UpstreamErrors.
"""
from __future__ import annotations

import asyncio
import collections
import select
import ssl
import time
from typing import AsyncIterable, Iterator
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

HIGH_WATER_BYTES = 256 * 1024   # unread bytes at which the socket stops being read
LOW_WATER_BYTES = 64 * 1024     # ... and starts again
_JOIN_BELOW_BYTES = 64 * 1024   # a body this small goes out in one write with the head
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class FastClientError(Exception):
    """Base of the transport failures of this client."""


class ConnectFailed(FastClientError):
    """Nothing answered at the address (refused, unreachable, name unknown, TLS refused)."""


class ConnectTimeout(FastClientError, TimeoutError):
    pass


class ReadTimeout(FastClientError, TimeoutError):
    pass


class Disconnected(FastClientError):
    """The upstream closed or reset the connection before the answer was whole."""


class ProtocolError(FastClientError):
    """The upstream's bytes are not HTTP/1.1."""


class _HeadDone(Exception):
    """Raised inside the parser to stop it after the headers of an answer to HEAD."""


class _Conn(asyncio.Protocol):
    """One upstream connection: the parser's callbacks fill the current exchange's state."""

    def __init__(self, pool: "FastPool") -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.fd = -1
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.active = False          # an exchange is under way
        self.reusable = True
        self._write_paused = False
        self._drain: asyncio.Future | None = None
        self._reset_exchange(False)

    def _reset_exchange(self, head: bool) -> None:
        self.head = head
        self.status = 0
        self.raw_headers: list[tuple[str, str]] = []
        self.headers_done = False
        self.length_known = False    # Content-Length or chunked: EOF before the end is a cut
        self.informational = False
        self.done = False
        self.stray = False
        self.got_bytes = False
        self.exc: BaseException | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.read_paused = False
        self.parts: list[bytes] = []
        self.waiter: asyncio.Future | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None and not self.pool.tls else -1

    def data_received(self, data: bytes) -> None:
        if not self.active or self.done:
            self.reusable = False    # bytes nobody asked for: this connection is out of step
            self.transport.abort()   # type: ignore[union-attr]
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadDone):   # stopped on purpose: no body follows
                self.parser = httptools.HttpResponseParser(self)
                self._wake()
                return
            self.reusable = False
            self._fail(ProtocolError(f"invalid HTTP from the upstream: {exc}"))
            self.transport.abort()   # type: ignore[union-attr]
            return
        if self.parts:
            chunk = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
            self.parts.clear()
            self.chunks.append(chunk)
            self.buffered += len(chunk)
            if self.buffered > HIGH_WATER_BYTES and not self.read_paused:
                self.read_paused = True
                self.transport.pause_reading()   # type: ignore[union-attr]
        self._wake()

    def eof_received(self) -> bool:
        return False   # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if self.active and not self.done:
            if self.headers_done and not self.length_known and not self.informational \
                    and exc is None:
                self.done = True   # a body delimited by the end of the connection
            else:
                self._fail(Disconnected("the upstream closed the connection"
                                        + (f" ({exc})" if exc else "")))
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(Disconnected("the upstream closed the connection"))
        self._wake()
        self.pool._forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- httptools callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.done:   # a second answer to one request: out of step, never read it as ours
            self.reusable = False
            self.stray = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.stray:
            return
        n = name.decode("utf-8", "surrogateescape")
        self.raw_headers.append((n, value.decode("utf-8", "surrogateescape")))
        if len(n) in (14, 17) and n.lower() in ("content-length", "transfer-encoding"):
            self.length_known = True

    def on_headers_complete(self) -> None:
        if self.stray:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.informational = True   # 100 Continue, 103 Early Hints: the answer follows
            self.raw_headers = []
            self.length_known = False
            return
        self.status = status
        self.headers_done = True
        if not self.parser.should_keep_alive():
            self.reusable = False
        if self.head or status in (204, 304):
            self.done = True
            if self.head:
                raise _HeadDone()

    def on_body(self, body: bytes) -> None:
        if not self.stray:
            self.parts.append(body)

    def on_message_complete(self) -> None:
        if self.informational and not self.stray:
            self.informational = False
            return
        self.done = True

    # -- the exchange ------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if self.exc is None:
            self.exc = exc

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _timed_out(self) -> None:
        self._fail(ReadTimeout(f"no byte from the upstream for {self.pool.read_timeout_s:g}s"))
        self.reusable = False
        self._wake()
        if self.transport is not None:
            self.transport.abort()

    async def _wait(self) -> None:
        """Until the parser has something new; silence longer than read_timeout_s fails."""
        self.waiter = w = self.loop.create_future()
        timer = self.loop.call_later(self.pool.read_timeout_s, self._timed_out)
        try:
            await w
        finally:
            timer.cancel()
            self.waiter = None

    async def drain(self) -> None:
        if self.closed:
            raise Disconnected("the upstream closed the connection")
        if self._write_paused:
            self._drain = d = self.loop.create_future()
            timer = self.loop.call_later(self.pool.read_timeout_s, self._timed_out_drain, d)
            try:
                await d
            finally:
                timer.cancel()
                self._drain = None

    def _timed_out_drain(self, d: asyncio.Future) -> None:
        if not d.done():
            d.set_exception(ReadTimeout(f"the upstream took no byte for "
                                        f"{self.pool.read_timeout_s:g}s"))
        self.abort()

    async def wait_headers(self) -> None:
        while not self.headers_done:
            if self.exc is not None:
                raise self.exc
            if self.closed:
                raise Disconnected("the upstream closed the connection")
            await self._wait()

    async def next_chunk(self) -> bytes:
        while True:
            if self.chunks:
                data = self.chunks.popleft()
                self.buffered -= len(data)
                if self.read_paused and self.buffered <= LOW_WATER_BYTES and not self.closed:
                    self.read_paused = False
                    self.transport.resume_reading()   # type: ignore[union-attr]
                return data
            if self.exc is not None:
                raise self.exc
            if self.done:
                return b""
            await self._wait()

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def dead_while_idle(self) -> bool:
        """A pooled connection must be silent: readable means closed by the upstream (or out
        of step). A poll costs far less than a request that meets a closed socket."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return True
        if self.fd < 0:
            return False   # TLS: records (session tickets) may arrive on an idle connection
        try:
            readable, _, _ = select.select([self.fd], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)


class FastResponse:
    """The answer's status and headers; its body read whole or one socket read at a time."""
    __slots__ = ("status", "headers", "next_chunk", "_conn")

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self.next_chunk = conn.next_chunk   # the next read of the body; b"" at its end
        self.status = conn.status
        self.headers = CIMultiDict(conn.raw_headers)

    @property
    def complete(self) -> bool:
        c = self._conn
        return c.done and not c.chunks and c.exc is None

    async def read(self) -> bytes:
        conn = self._conn
        if conn.done and conn.exc is None and len(conn.chunks) <= 1:   # answered in one read
            conn.buffered = 0
            return conn.chunks.popleft() if conn.chunks else b""
        parts = []
        while True:
            data = await conn.next_chunk()
            if not data:
                return b"".join(parts)
            parts.append(data)

    def __aiter__(self) -> "FastResponse":
        return self

    async def __anext__(self) -> bytes:
        data = await self._conn.next_chunk()
        if not data:
            raise StopAsyncIteration
        return data


class Exchange:
    """`async with pool.request(...) as resp`: leaving cleanly with the body read returns the
    connection to the pool; anything else (an error, a cancel, a body left unread) drops it."""
    __slots__ = ("pool", "method", "target", "headers", "body", "conn")

    def __init__(self, pool: "FastPool", method: str, target: str, headers: dict[str, str],
                 body: bytes | AsyncIterable[bytes] | None) -> None:
        self.pool, self.method, self.target = pool, method, target
        self.headers, self.body = headers, body
        self.conn: _Conn | None = None

    async def __aenter__(self) -> FastResponse:
        pool = self.pool
        head = pool.request_head(self.method, self.target, self.headers, self.body)
        retry_ok = self.method in IDEMPOTENT and (self.body is None
                                                  or isinstance(self.body, bytes))
        while True:
            conn, reused = await pool.acquire()
            self.conn = conn
            try:
                await self._send(conn, head)
                await conn.wait_headers()
                return FastResponse(conn)
            except Disconnected:
                pool.release(conn)
                if reused and retry_ok and not conn.got_bytes:
                    continue   # a keep-alive connection closed under us: safe to send again
                raise
            except BaseException:
                pool.release(conn)   # cancelled (the client left) or failed: dropped, so the
                raise                # upstream stops too

    async def _send(self, conn: _Conn, head: bytes) -> None:
        conn._reset_exchange(self.method == "HEAD")
        conn.active = True
        transport = conn.transport
        body = self.body
        if body is None or isinstance(body, (bytes, bytearray, memoryview)):
            if body and len(body) >= _JOIN_BELOW_BYTES:
                transport.write(head)   # type: ignore[union-attr]
                transport.write(body)   # type: ignore[union-attr]
            else:
                transport.write(head + body if body else head)   # type: ignore[union-attr]
            return
        transport.write(head)   # type: ignore[union-attr]
        async for piece in body:
            if piece:
                transport.write(b"%x\r\n%s\r\n" % (len(piece), piece))   # type: ignore
                await conn.drain()
            if conn.exc is not None or conn.headers_done:
                conn.reusable = False   # answered (or failed) early: stop sending, and the
                return                  # body left unfinished leaves the connection unusable
        transport.write(b"0\r\n\r\n")   # type: ignore[union-attr]

    async def __aexit__(self, exc_type: type | None, exc: BaseException | None,
                        tb: object) -> None:
        assert self.conn is not None
        self.pool.release(self.conn)


class FastPool:
    def __init__(self, url: str, *, connect_timeout_s: float, read_timeout_s: float,
                 max_connections: int, keepalive_s: float = 15.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme in {url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        default_port = self.port == (443 if self.tls else 80)
        self._host_line = (f"\r\nHost: {self.host if ':' not in self.host else f'[{self.host}]'}"
                           + ("" if default_port else f":{self.port}"))
        self.ssl_context = (ssl_context or ssl.create_default_context()) if self.tls else None
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self.keepalive_s = keepalive_s
        self.loop = asyncio.get_running_loop()
        self._idle: list[_Conn] = []
        self._open = 0                  # connecting, busy and idle, against max_connections
        self._all: set[_Conn] = set()
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self.connections_made = 0

    def request(self, method: str, target: str, headers: dict[str, str],
                body: bytes | AsyncIterable[bytes] | None) -> Exchange:
        return Exchange(self, method, target, headers, body)

    def request_head(self, method: str, target: str, headers: dict[str, str],
                     body: bytes | AsyncIterable[bytes] | None) -> bytes:
        if body is None:
            framing = "\r\nContent-Length: 0" if method in ("POST", "PUT", "PATCH") else ""
        elif isinstance(body, (bytes, bytearray, memoryview)):
            framing = f"\r\nContent-Length: {len(body)}"
        else:
            framing = "\r\nTransfer-Encoding: chunked"
        lines = "".join([f"\r\n{k}: {v}" for k, v in headers.items()])
        text = f"{method} {self.prefix}{target} HTTP/1.1{self._host_line}{lines}{framing}\r\n\r\n"
        if text.count("\n") != len(headers) + (4 if framing else 3) or \
                text.count("\r") != text.count("\n"):
            raise ValueError("a header name or value contains a line break")
        return text.encode("utf-8", "surrogateescape")

    async def acquire(self) -> tuple[_Conn, bool]:
        idle = self._idle
        while True:
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if now - conn.idle_since < self.keepalive_s and not conn.dead_while_idle():
                    return conn, True
                conn.abort()
                self._forget(conn)
            if self._open < self.max_connections:
                break
            w = self.loop.create_future()
            self._waiters.append(w)
            try:
                await w
            except BaseException:
                if w.done() and not w.cancelled():
                    self._wake_one()   # woken, then cancelled: pass the turn on
                raise
        self._open += 1
        try:
            conn = await self._connect()
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise
        return conn, False

    async def _connect(self) -> _Conn:
        conn = _Conn(self)
        try:
            await asyncio.wait_for(self.loop.create_connection(
                lambda: conn, self.host, self.port, ssl=self.ssl_context,
                server_hostname=self.host if self.tls else None), self.connect_timeout_s)
        except asyncio.TimeoutError:
            raise ConnectTimeout(f"no connection within {self.connect_timeout_s:g}s") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(getattr(exc, "strerror", None) or str(exc) or repr(exc)) \
                from exc
        self._all.add(conn)
        self.connections_made += 1
        return conn

    def release(self, conn: _Conn) -> None:
        """The exchange on `conn` is over: pool it if it can serve another (its answer read to
        the end and nothing after it), else drop it."""
        conn.active = False
        if conn.reusable and not conn.closed and conn.done and conn.exc is None \
                and not conn.chunks:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
            self._wake_one()
        else:
            conn.abort()
            self._forget(conn)

    def _forget(self, conn: _Conn) -> None:
        if conn in self._all:
            self._all.discard(conn)
            self._open -= 1
            if conn in self._idle:
                self._idle.remove(conn)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    def connections(self) -> Iterator[_Conn]:
        return iter(self._all)

    async def close(self) -> None:
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()
        await asyncio.sleep(0)   # let the transports run connection_lost
