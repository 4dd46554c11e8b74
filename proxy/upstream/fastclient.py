"""The fast transport (`upstream.client: fast`): a pooled HTTP/1.1 client on asyncio protocols
and httptools (llhttp), for the forwarding hot path. Its connections are fastconn.py's.

Why not aiohttp's ClientSession here: per request it builds a ClientRequest, a ClientResponse,
a StreamReader, timers, a cookie jar pass and a trace context; the proxy needs none of that to
move bytes, and the upstream client is where a Python relay spends its time (bench/overhead.py).

What it does: keep-alive connections per upstream, LIFO reuse, a bound on open connections;
request bodies are bytes or an async iterable (sent chunked, with the socket's backpressure);
a pooled connection found dead is replaced before anything is sent, and one that dies before
any answer byte is retried only for idempotent methods. `read_timeout_s` bounds silence between
bytes, `connect_timeout_s` the connect (and the TLS handshake).
"""
from __future__ import annotations

import asyncio
import collections
import ssl
import time
from urllib.parse import urlsplit

from multidict import CIMultiDict

from ..errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from .breaker import CircuitBreaker
from .fastconn import (ConnectFailed, ConnectTimeout, Disconnected, ProtocolError, ReadTimeout,
                       _Conn)
from .transport import DEFAULT_SERVER, Body, ErrorScope, ErrorTable, Exchange

_JOIN_BELOW_BYTES = 64 * 1024   # a body this small goes out in one write with the head
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

# Every failure class of fastconn.py has its row (resolved by MRO, transport.py); TimeoutError
# and ConnectionError catch what asyncio and the socket raise on their own.
ERRORS = ErrorTable({
    ConnectTimeout: (UpstreamTimeout,
                     "{server} at {url} did not accept a connection for {what}: {exc}"),
    ReadTimeout: (UpstreamTimeout, "{server} at {url} went silent on {what}"),
    asyncio.TimeoutError: (UpstreamTimeout, "{server} at {url} went silent on {what}"),
    ConnectFailed: (UpstreamUnreachable, "cannot reach {server} at {url}: {exc}"),
    Disconnected: (UpstreamError, "{server} at {url} broke off {what}: {exc}"),
    ProtocolError: (UpstreamError, "{server} at {url} failed on {what}: {exc}"),
    ConnectionError: (UpstreamError, "{server} at {url} failed on {what}: {exc!r}"),
})


class FastResponse:
    """The project's UpstreamResponse: status, headers, and the body read whole or one socket
    read at a time, every read in the exchange's error scope."""
    __slots__ = ("status", "headers", "_next", "_conn", "_errors")

    def __init__(self, conn: _Conn, errors: ErrorScope) -> None:
        self._conn = conn
        self._next = conn.next_chunk   # one await per read, no iterator layer between
        self.status = conn.status
        self.headers = CIMultiDict(conn.raw_headers)
        self._errors = errors

    async def read(self) -> bytes:
        conn = self._conn
        if conn.done and conn.exc is None and len(conn.chunks) <= 1:   # answered in one read
            conn.buffered = 0
            return conn.chunks.popleft() if conn.chunks else b""
        parts = []
        with self._errors:
            while data := await self._next():
                parts.append(data)
        return b"".join(parts)

    def chunks(self) -> "FastResponse":
        return self

    def __aiter__(self) -> "FastResponse":
        return self

    async def __anext__(self) -> bytes:
        with self._errors:
            data = await self._next()
        if not data:
            raise StopAsyncIteration
        return data


class _Exchange(Exchange):
    """Leaving cleanly with the body read returns the connection to the pool; anything else
    (an error, a cancel, a body left unread) drops it."""
    __slots__ = ("pool", "method", "target", "headers", "body", "timeout_s", "conn")

    def __init__(self, pool: "FastTransport", method: str, target: str,
                 headers: dict[str, str], body: Body, timeout_s: float | None) -> None:
        self.errors = ErrorScope(ERRORS, pool.base_url, method, target, pool.breaker,
                                 pool.server)
        self.pool, self.method, self.target = pool, method, target
        self.headers, self.body, self.timeout_s = headers, body, timeout_s
        self.conn: _Conn | None = None

    async def _open(self) -> FastResponse:
        pool = self.pool
        deadline = None if self.timeout_s is None else pool.loop.time() + self.timeout_s
        head = pool.request_head(self.method, self.target, self.headers, self.body)
        retry_ok = self.method in IDEMPOTENT and (self.body is None
                                                  or isinstance(self.body, bytes))
        while True:
            conn, reused = await pool.acquire()
            self.conn = conn
            try:
                await self._send(conn, head, deadline)
                await conn.wait_headers()
                return FastResponse(conn, self.errors)
            except Disconnected:
                pool.release(conn)
                if reused and retry_ok and not conn.got_bytes:
                    continue   # a keep-alive connection closed under us: safe to send again
                raise
            except BaseException:
                pool.release(conn)   # cancelled (the client left) or failed: dropped, so the
                raise                # upstream stops too

    async def _send(self, conn: _Conn, head: bytes, deadline: float | None) -> None:
        conn.reset_exchange(self.method == "HEAD", deadline)
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

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: object) -> None:
        assert self.conn is not None
        self.pool.release(self.conn)


class FastTransport:
    def __init__(self, url: str, *, connect_timeout_s: float, read_timeout_s: float,
                 max_connections: int, keepalive_s: float = 15.0,
                 ssl_context: ssl.SSLContext | None = None,
                 breaker: CircuitBreaker | None = None, server: str = DEFAULT_SERVER) -> None:
        self.base_url = url.rstrip("/")
        self.server = server
        self.breaker = breaker or CircuitBreaker()
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

    def request(self, method: str, path: str, headers: dict[str, str], body: Body, *,
                timeout_s: float | None = None) -> _Exchange:
        return _Exchange(self, method, path, headers, body, timeout_s)

    def request_head(self, method: str, target: str, headers: dict[str, str],
                     body: Body) -> bytes:
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

    async def close(self) -> None:
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()
        await asyncio.sleep(0)   # let the transports run connection_lost
