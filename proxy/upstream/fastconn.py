"""One upstream HTTP/1.1 connection of the fast transport (fastclient.py): an asyncio protocol
that feeds the socket's bytes to httptools (llhttp) and keeps the current exchange's state.

Each read of the socket becomes one chunk for the caller at once (SSE is never held back);
reading pauses while the caller has more than `HIGH_WATER_BYTES` unread (a slow client slows
the upstream, memory stays flat); 1xx answers are skipped, HEAD and `Connection: close`
honoured. Silence longer than the pool's `read_timeout_s` fails the exchange, or past the
exchange's own deadline when it has one.

Its failures are the classes below; fastclient.py maps them to the project's UpstreamErrors.
"""
from __future__ import annotations

import asyncio
import collections
import select
from typing import TYPE_CHECKING

import httptools

if TYPE_CHECKING:
    from .fastclient import FastTransport

HIGH_WATER_BYTES = 256 * 1024   # unread bytes at which the socket stops being read
LOW_WATER_BYTES = 64 * 1024     # ... and starts again


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

    def __init__(self, pool: "FastTransport") -> None:
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
        self.reset_exchange(False, None)

    def reset_exchange(self, head: bool, deadline: float | None) -> None:
        self.head = head
        self.deadline = deadline     # loop time by which the answer must be whole, or None
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
        self._fail(ReadTimeout(
            f"no byte from the upstream for {self.pool.read_timeout_s:g}s"
            if self.deadline is None else "no complete answer within the call's time limit"))
        self.reusable = False
        self._wake()
        if self.transport is not None:
            self.transport.abort()

    async def _wait(self) -> None:
        """Until the parser has something new; silence longer than read_timeout_s fails (or
        the exchange's deadline passing, when it has one)."""
        loop = self.loop
        self.waiter = w = loop.create_future()
        deadline = self.deadline
        timer = loop.call_later(self.pool.read_timeout_s if deadline is None
                                else deadline - loop.time(), self._timed_out)
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
