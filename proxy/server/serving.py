"""Start an aiohttp application on a real socket; shared by the proxy, the emulator and tests.

An app may carry `ServingOptions` (the proxy's come from `server.*`): connection limits that
aiohttp lacks are added here. A connection must send its first request's headers within
`header_timeout_s`; an idle keep-alive connection (or one stuck in a later request's headers)
is closed after `keepalive_timeout_s`; past `max_connections` a new connection is answered 503
at once and closed, before file descriptors run out, except that a few more are kept for
liveness and readiness probes (GET /healthz, /readyz), so an orchestrator does not restart a
proxy that is only busy; when those are full, one whose head has not come gives way to the
newcomer (_Slots.make_way), so slow clients cannot hold them. Malformed HTTP gets a fixed JSON
400 and one clipped log line: aiohttp's own answer echoes the raw bytes (a credential
included) and logs a traceback. Request bodies reach the app as sent (no server-side
decompression: the proxy decodes them itself, with limits, in intake.py).

aiohttp has no public hook for its parser's 400 (aio-libs/aiohttp#3287), so `_Protocol`
subclasses its `RequestHandler`, overriding `handle_error` and `data_received` only; the aiohttp
versions this is known to hold for are pinned in pyproject.toml, and
tests/test_connections.py fails if those methods change shape.

`Served.close()` is the staged shutdown: stop accepting → let requests finish until
`shutdown_timeout_s` → end what still runs (streams get an error event, see inflight.py) →
close. It returns within the timeout plus about a second.
"""
from __future__ import annotations

import asyncio
import logging
import resource
import socket
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, InvalidURLError
from aiohttp.log import access_logger
from aiohttp.web_protocol import RequestHandler

from ..config import ServerConfig
from .inflight import INFLIGHT, InFlight
from ..errors import clip

log = logging.getLogger("proxy.serving")

_FDS_PER_CONNECTION = 2      # the client's socket and, while it streams, one to the upstream
PROBE_ROOM = 16              # connections past max_connections kept for probes
PROBE_PATHS = (b"/healthz", b"/readyz")
# The listening socket, database, logs, DNS, the event loop itself, and the probes' room.
_FDS_RESERVED = 48 + PROBE_ROOM
_PROBE_HEAD_S = 1.0             # the longest a probe's room waits for the head
_REFUSE_LINGER_S = 1.0
_LINGER_S = 1.0
_HEAD_END = b"\r\n\r\n"          # the parser takes nothing else (a bare LF is a 400)
_REQUEST_LINE_MAX_BYTES = 1024


@dataclass(frozen=True)
class ServingOptions:
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 15.0
    max_connections: int = 1000

    @classmethod
    def from_config(cls, server: ServerConfig) -> "ServingOptions":
        return cls(server.header_timeout_s, server.keepalive_timeout_s, server.max_connections)


SERVING = web.AppKey("serving", ServingOptions)


class CannotListen(OSError):
    """The address could not be bound (in use, not this machine's, not permitted): the one
    failure of `serve` that is about the address."""


@dataclass
class Served:
    runner: web.AppRunner
    host: str
    port: int
    shutdown_timeout_s: float = 5.0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        """Staged shutdown, bounded by shutdown_timeout_s (plus ~1 s to end what remains)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout_s
        for site in list(self.runner.sites):
            await site.stop()                      # stop accepting
        inflight = self.runner.app.get(INFLIGHT)
        ender = None
        if inflight is not None:
            ender = asyncio.create_task(_end_at(inflight, deadline, self.shutdown_timeout_s))
        try:
            await self.runner.cleanup()            # drains; aiohttp's own deadline is later
        finally:
            if ender is not None:
                ender.cancel()
                await asyncio.gather(ender, return_exceptions=True)


async def _end_at(inflight: InFlight, deadline: float, timeout_s: float) -> None:
    await asyncio.sleep(max(0.0, deadline - asyncio.get_running_loop().time()))
    ended = await inflight.end_all(f"The proxy is shutting down (its {timeout_s:g} s drain "
                                   "time is over); retry the request.")
    if ended:
        log.warning("shutdown: ended %d request(s) still running after %g s", ended, timeout_s)


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard or hard == resource.RLIM_INFINITY:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        if target != soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                log.info("open-file limit raised from %d to %d", soft, target)
                soft = target
            except (ValueError, OSError) as exc:
                log.warning("could not raise the open-file limit from %d to %d: %s", soft,
                            target, exc)
    return soft


def connection_cap(configured: int) -> int:
    """max_connections, lowered if the open-file limit could not carry that many."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    fit = max(1, (soft - _FDS_RESERVED) // _FDS_PER_CONNECTION)
    if fit < configured:
        log.warning("server.max_connections lowered from %d to %d to fit the open-file limit "
                    "(%d)", configured, fit, soft)
        return fit
    return configured


async def serve(app: web.Application, host: str = "127.0.0.1", port: int = 0, *,
                shutdown_timeout_s: float = 5.0, access_log: bool = False) -> Served:
    """Bind (port 0 picks a free one) and start serving; returns the bound address.

    The socket is bound before the app starts, so a port in use (CannotListen) leaves nothing
    to clean up; an OSError of another kind comes from the app's own start.
    handler_cancellation makes a client disconnect cancel its handler at once, which is what
    lets a dropped stream cancel the upstream request instead of generating into the void.
    """
    options = app.get(SERVING)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CannotListen(exc.errno, exc.strerror) from exc
    # What aiohttp passes on to each connection's protocol (ours is built with the same).
    protocol_kwargs: dict[str, Any] = {
        "access_log": access_logger if access_log else None,
        "access_log_class": web.AccessLogger,
        "auto_decompress": False}
    if options is not None:
        protocol_kwargs["keepalive_timeout"] = options.keepalive_timeout_s
        # After an answer to a request whose body was not read (408, 413), aiohttp reads
        # and discards the rest for this long, so the client sees the answer, not a reset.
        protocol_kwargs["lingering_time"] = _LINGER_S
    # The drain deadline is ours (Served.close); aiohttp's own comes after it.
    runner = web.AppRunner(app, handler_cancellation=True,
                           shutdown_timeout=shutdown_timeout_s + 2, **protocol_kwargs)
    try:
        await runner.setup()
        site: web.BaseSite
        if options is None:
            site = web.SockSite(runner, sock)
        else:
            site = _LimitedSite(runner, sock, options, protocol_kwargs)
        await site.start()
    except BaseException:
        # The app's start failed: what it had started is closed (the cleanup contexts it
        # entered), and so is the socket.
        try:
            await runner.cleanup()
        finally:
            sock.close()
        raise
    return Served(runner, host, sock.getsockname()[1], shutdown_timeout_s)


class _LimitedSite(web.SockSite):
    """A SockSite whose protocol factory enforces the connection cap and the header deadline."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket,
                 options: ServingOptions, protocol_kwargs: dict[str, Any]) -> None:
        super().__init__(runner, sock)
        self.options = options
        self.protocol_kwargs = protocol_kwargs
        self.max_connections = connection_cap(options.max_connections)

    async def start(self) -> None:
        self._runner._reg_site(self)   # what SockSite.start does, with our factory
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        kwargs, cap = self.protocol_kwargs, self.max_connections
        header_timeout_s = self.options.header_timeout_s
        slots = _Slots()

        def factory() -> asyncio.Protocol:
            # Counted here, not by aiohttp's list (filled a loop turn later): a burst of
            # accepts cannot pass the cap.
            if len(slots.open) - len(slots.room) < cap:
                proto = _Protocol(server, loop=loop, slots=slots, **kwargs)
                timeout_s = header_timeout_s
            else:
                if len(slots.room) >= PROBE_ROOM and not slots.make_way():
                    return _Refuse()
                proto = _Protocol(server, loop=loop, slots=slots, probes_only=True, **kwargs)
                slots.room[proto] = None
                # A probe's room is held for a second at most while its head comes.
                timeout_s = min(header_timeout_s, _PROBE_HEAD_S)
            slots.open.add(proto)
            proto.head_timer = loop.call_later(timeout_s, proto.head_overdue)
            return proto

        self._server = await loop.create_server(factory, sock=self._sock,
                                                backlog=self._backlog)


class _Slots:
    """The site's connections, and the probes' room past the cap (oldest first)."""

    def __init__(self) -> None:
        self.open: set[_Protocol] = set()
        self.room: dict[_Protocol, None] = {}

    def make_way(self) -> bool:
        """The room is full: a connection in it still waiting for its head is answered 503
        and closed, so the newcomer gets its place (False: every one there is being
        answered). Slow connections held open, however many, cannot keep a probe out: a probe
        sends its whole head at once and is answered on the next turns. Only a flood of new
        connections, PROBE_ROOM of them accepted before a probe's bytes are read, still can."""
        waiting = [p for p in self.room   # (one accepted in this same burst is not made yet)
                   if p.head_timer is not None and p.transport is not None]
        # One that sent part of a head and stopped goes before one not heard from yet: that
        # may be a probe whose bytes this loop has not read.
        victim = next((p for p in waiting if p.heard), waiting[0] if waiting else None)
        if victim is None:
            return False
        victim._refuse()
        return True

    def leave(self, proto: "_Protocol") -> None:
        self.open.discard(proto)
        self.room.pop(proto, None)


class _Protocol(RequestHandler):
    """aiohttp's protocol, plus: the first request's headers must end before `head_timer`
    fires; a connection past the cap serves one probe request and nothing else; a request the
    parser refuses is answered with a fixed body and logged on one line (see the module doc).

    The header deadline watches the bytes for the end of the first header block itself (the
    parser accepts nothing but CRLF CRLF there), so it needs none of aiohttp's private state.
    """

    def __init__(self, *args: Any, slots: _Slots | None = None, probes_only: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slots = slots
        self.probes_only = probes_only
        self.head_timer: asyncio.TimerHandle | None = None
        self._line_ok = not probes_only   # a probe's room: its request line is judged first
        self._head_seen = b""       # what the scan still needs of the first request's head
        self.heard = False          # any bytes came

    def data_received(self, data: bytes) -> None:
        self.heard = True
        if self.head_timer is not None:
            seen = self._head_seen + data
            if not self._line_ok and not self._judge_line(seen):
                return
            if _HEAD_END in seen:
                self.head_timer.cancel()
                self.head_timer = None
                self._head_seen = b""
            else:   # the request line until it is judged, then what a split CRLF CRLF needs
                self._head_seen = seen[-3:] if self._line_ok else seen
        super().data_received(data)
        if self.probes_only and self.head_timer is None:
            self.close()    # the probe is answered, then the connection ends

    def _judge_line(self, seen: bytes) -> bool:
        """In a probe's room: False once the request line is known not to be a probe (the
        connection is refused), else True (a probe, or not all here yet)."""
        line, sep, _ = seen.partition(b"\r\n")
        if not sep and len(seen) < _REQUEST_LINE_MAX_BYTES:
            return True
        method, _, rest = line.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method in (b"GET", b"HEAD") and path in PROBE_PATHS:
            self._line_ok = True
            return True
        self._refuse()
        return False

    def _leave(self) -> None:
        # Also on the way out of a connection that was never made (no connection_lost).
        if self.slots is not None:
            self.slots.leave(self)

    def _refuse(self) -> None:
        self._leave()
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        transport = self.transport
        if transport is not None:
            transport.write(_BUSY)
        self.force_close()   # closes once the answer is written

    def head_overdue(self) -> None:
        # No request head has arrived on this connection yet: it is slow or silent. Later
        # requests on a kept-alive connection are bounded by aiohttp's keep-alive timer.
        self.head_timer = None
        if self.probes_only:
            self._refuse()    # past the cap, and no probe: the same 503 as any other
        else:
            self._leave()
            if self.transport is not None:
                self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._leave()
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        super().connection_lost(exc)

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None
                     ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        log.warning("malformed HTTP request from %s: %s", request.remote,
                    _parse_error_summary(exc))
        resp = web.Response(status=400, body=_MALFORMED_BODY, content_type="application/json")
        resp.force_close()
        return resp


def _parse_error_summary(exc: HttpProcessingError) -> str:
    """The parser's reason without the bytes it quotes (they may hold a credential)."""
    if isinstance(exc, InvalidURLError):   # its message is the request target itself
        return f"{type(exc).__name__}: the request target is not a valid URL"
    first = (exc.message or "").strip().split("\n", 1)[0]
    for quote in ("'", '"'):
        first = first.split(quote, 1)[0]
    return f"{type(exc).__name__}: {clip(first.rstrip(' :'), 80)}"


_MALFORMED_BODY = orjson.dumps({"error": {
    "message": "The request is not valid HTTP/1.1 and could not be read.",
    "type": "invalid_request_error", "param": None, "code": "malformed_request"}})
_BUSY_BODY = orjson.dumps({"error": {
    "message": "The proxy has too many open connections (server.max_connections); retry.",
    "type": "server_error", "param": None, "code": "too_many_connections"}})
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Retry-After: 1\r\nConnection: close\r\nContent-Length: " +
         str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


class _Refuse(asyncio.Protocol):
    """Answer 503 and close: the reply goes out first, what the client sends is discarded,
    and the socket is closed once the client closes or after a second at most."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._timer = asyncio.get_running_loop().call_later(_REFUSE_LINGER_S, transport.close)
        transport.write(_BUSY)
        try:
            if transport.can_write_eof():
                transport.write_eof()
        except OSError:     # the client is already gone (reset before it could be answered)
            transport.close()

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        self.transport.close()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self._timer.cancel()
