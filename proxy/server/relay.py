"""One proxied inference request, from its refusal or its lease to its record.

A `Relay` owns, for one request: the lease on the model (taken from the engine, released once),
the upstream call under the header policy of `headers.py`, the bytes back — a stream relayed as
it comes, a whole body with `compat.py`'s repairs — and the one exit that records the request
with the engine and writes its access-log line, however the request ends: refused before the
upstream, answered, broken off by the upstream, or left by the client. Three outcomes are not the
model's: a request refused for the client's own fault (CLIENT_REFUSALS) is only counted as
refused, a stream relayed through its end is a success even if the client leaves at once, and a
client that leaves before the end is a 499, counted as a request but no failure (with the tokens
streamed until then).

What changes on the way: a configured alias in `model` becomes the real key, and a stream that
did not ask for usage gets `include_usage` added upstream and the usage removed again before it
reaches the client (the usage-only chunk dropped, a `usage` member cut from a chunk with choices).
Everything else is the original bytes.
"""
from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web

from ..engine.lifecycle import Lease
from ..engine.usage import CLIENT_CLOSED, RequestRecord
from ..errors import (InvalidApiKey, InvalidRequest, ModelNotFound, PermissionDenied, ProxyError,
                      UpstreamError, UpstreamTimeout, UpstreamUnreachable)
from .auth import CLIENT_KEY
from .inflight import INFLIGHT, write_or_stall
from .promptsize import load_context, refuse_oversized
from .keys import (ACCESS_LOG, COMPAT, ENGINE, METRICS, RESPONSE_STARTED, ROUTED_TO, TASK,
                   UPSTREAM)
from .progress import EarlyStream, upstream_refusal
from .streaming import StreamMeter, error_code, usage_of_body
from ..upstream.base import UpstreamResponse
from . import headers, scope

USAGE_INJECTABLE = frozenset({"/v1/chat/completions", "/v1/completions"})
INTERNAL_ERROR = 500
# What the proxy refuses for the client's own request before any model answers it: its body
# (400, 408, 413, 415, a prompt past the context), its key (401, 403) or a name no model has
# (404). No model did anything, so none is charged with it.
CLIENT_REFUSALS = (InvalidRequest, InvalidApiKey, PermissionDenied, ModelNotFound)


def error_event(exc: ProxyError) -> bytes:
    """An OpenAI-style error as an SSE event: SDKs raise it instead of returning a cut
    answer as if it were whole."""
    return b"data: " + orjson.dumps(exc.body()) + b"\n\n"


def upstream_body(path: str, payload: dict[str, Any], body: bytes, key: str
                  ) -> tuple[bytes, bool]:
    """The bytes to send upstream, and whether to strip an include_usage chunk we asked for.
    The client's bytes go through untouched unless the alias or include_usage changes them."""
    changed = key != payload["model"]
    if changed:
        payload["model"] = key
    strip = False
    if payload.get("stream") is True and path in USAGE_INJECTABLE:
        opts = payload.get("stream_options")
        if not (isinstance(opts, dict) and opts.get("include_usage")):
            payload["stream_options"] = {**(opts if isinstance(opts, dict) else {}),
                                         "include_usage": True}
            strip = changed = True
    return (orjson.dumps(payload) if changed else body), strip


def status_of(exc: BaseException) -> int:
    """The status a request that ended in `exc` is recorded with."""
    if isinstance(exc, ProxyError):
        return exc.status
    if isinstance(exc, (asyncio.CancelledError, ConnectionResetError)):
        return CLIENT_CLOSED   # the client went away (or stalled); upstream is closed with it
    return INTERNAL_ERROR


class Relay:
    """`async with Relay(request) as relay:` around everything the handler does, then
    `relay.run(key, payload, body)`; leaving the block records the request, once."""
    __slots__ = ("request", "engine", "started_s", "model", "lease", "status", "ok", "meter",
                 "tokens_estimated", "prompt_tokens", "completion_tokens", "answered",
                 "relayed", "refused", "error")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.engine = request.app[ENGINE]
        self.started_s = time.perf_counter()
        self.model = ""            # as the client named it; the key once the model is held
        self.lease: Lease | None = None
        self.status = CLIENT_CLOSED
        self.ok = False
        self.meter: StreamMeter | None = None
        self.tokens_estimated = False
        self.prompt_tokens = self.completion_tokens = 0
        self.answered = False      # the upstream's response head came (nothing to retry)
        self.relayed = False       # the whole stream, through its end, went out to the client
        self.refused = False       # refused for the client's request itself (CLIENT_REFUSALS)
        self.error: str | None = None   # the failure's code (the proxy's or the server's)

    async def __aenter__(self) -> "Relay":
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        # A client that leaves once it has read the end of its stream (the SDKs close at
        # [DONE]) cancels this task or fails write_eof: the answer was whole all the same.
        if exc is not None and not self.relayed:
            self.ok, self.status = False, status_of(exc)
            self.refused = isinstance(exc, CLIENT_REFUSALS)
            if isinstance(exc, ProxyError):
                self.error = exc.code
        self._finish()

    async def run(self, key: str, payload: dict[str, Any], body: bytes) -> web.StreamResponse:
        """Hold the model `key` and forward the request to it; the client's response. In a
        fleet, a request whose host fails before answering anything goes once to another."""
        early = EarlyStream.of(self.request, payload)   # notes while the model loads
        try:
            return await self._run(key, payload, body, early)
        except ProxyError as exc:
            if not (early and early.resp):
                raise
            self.status, self.error = exc.status, exc.code   # the headers are out: the error
            self.refused = isinstance(exc, CLIENT_REFUSALS)   # can only be an event
            return await early.fail(error_event(scope.error(self.request, exc)))

    async def _run(self, key: str, payload: dict[str, Any], body: bytes,
                   early: EarlyStream | None) -> web.StreamResponse:
        request = self.request
        body, strip = upstream_body(request.path, payload, body, key)
        engine = self.engine      # a cold model: refused before a load is made for nothing
        refuse_oversized(request.path, payload,
                         load_context(engine.entry(key), engine.config, engine.manages_loading))
        lease = self.lease = await (early.acquire(engine, key) if early
                                    else engine.acquire(key))
        self.model = key
        refuse_oversized(request.path, payload, lease.entry.context_length)
        try:
            return await self._forward(lease, payload, body, strip, early)
        except UpstreamError as exc:
            host = lease.host
            if host is None or self.answered or isinstance(exc, UpstreamTimeout):
                raise
            self.engine.host_failed(host)
            lease.release()
            self.lease = None
            lease = self.lease = await self.engine.acquire(key, avoid=host)
            try:
                return await self._forward(lease, payload, body, strip, early)
            except UpstreamError as again:
                if lease.host is None or self.answered or isinstance(again, UpstreamTimeout):
                    raise
                self.engine.host_failed(lease.host)   # the error names both hosts tried
                again.message = (f"No host that serves '{key}' is reachable: '{host}' did not "
                                 f"answer this request, then '{lease.host}': {again.message}")
                raise

    async def _forward(self, lease: Lease, payload: dict[str, Any], body: bytes, strip: bool,
                       early: EarlyStream | None) -> web.StreamResponse:
        request = self.request
        self.answered = False
        call = self.engine.upstream_for(lease).request(
            "POST", request.path_qs, headers.to_upstream(request.headers), body)
        lost = self.engine.host_lost(lease.host) if lease.host is not None else None
        async with (call if lost is None else UntilHostLost(call, lost, lease.host)) as up:
            self.answered = True
            self.status = up.status
            back = headers.to_client(up.headers)
            if ROUTED_TO in request:
                back.append((headers.ROUTED_HEADER, lease.model))
            if lease.host is not None:
                back.append((headers.HOST_HEADER, lease.host))
            if lease.entry.context_length:
                back.append((headers.CONTEXT_HEADER, str(lease.entry.context_length)))
            if payload.get("stream") is True and up.status == 200 and \
                    up.headers.get("Content-Type", "").startswith("text/event-stream"):
                return await self._stream(up, back, strip, lease, early)
            if early and early.resp:
                return await early.fail(b"data: " + await upstream_refusal(up) + b"\n\n")
            return await self._whole(up, back, payload)

    async def _stream(self, up: UpstreamResponse, back: list[tuple[str, str]], strip: bool,
                      lease: Lease, early: EarlyStream | None) -> web.StreamResponse:
        request, clock = self.request, self.engine.clock
        meter = self.meter = StreamMeter(self.started_s, strip_usage_chunk=strip)
        chunks = up.chunks()
        # The first byte comes before the headers go out: an upstream silent past
        # read_timeout_s is still a 504, not a 200 that ends in nothing.
        first = await anext(chunks, b"")
        resp = early.resp if early else None     # started while the model loaded
        if resp is None:
            resp = web.StreamResponse(status=up.status, headers=back)
            await resp.prepare(request)
            request[RESPONSE_STARTED] = True
            request.app[INFLIGHT].stream_started(request, resp)
        try:
            out = meter.feed(first)
            if out:
                await write_or_stall(request, resp, out)
            if meter.done:
                self._relayed(meter)
            async for data in chunks:
                lease.last_activity_s = clock.now()   # not hung: bytes flow
                out = meter.feed(data)
                if out:
                    await write_or_stall(request, resp, out)
                if meter.done and not self.relayed:
                    self._relayed(meter)   # [DONE] is out: the client may leave now
        except ProxyError as exc:   # the upstream broke off: say so in the stream
            if self.relayed:            # ... after its end: nothing the client lacks
                await resp.write_eof()
                return resp
            self.status, self.error = exc.status, exc.code
            await write_or_stall(request, resp, meter.flush() + error_event(exc))
            await resp.write_eof()
            return resp
        tail = meter.flush()
        if tail:
            await write_or_stall(request, resp, tail)
        self._relayed(meter)     # before write_eof, which a client gone after the end fails
        await resp.write_eof()
        return resp

    def _relayed(self, meter: StreamMeter) -> None:
        """The stream went out whole: its outcome and tokens are settled, whatever follows."""
        self.relayed = True
        self.ok = meter.done or meter.usage_seen or meter.content_events > 0
        self.prompt_tokens = meter.prompt_tokens
        self.completion_tokens = meter.completion_tokens_or_estimate()

    async def _whole(self, up: UpstreamResponse, back: list[tuple[str, str]],
                     payload: dict[str, Any]) -> web.Response:
        raw = await up.read()
        self.ok = up.status < 400
        if not self.ok:
            self.error = error_code(raw)
        if self.ok:
            repaired = self.request.app[COMPAT].repair(self.request.path, payload, up.status,
                                                       raw)
            raw, self.tokens_estimated = repaired.body, repaired.tokens_estimated
            counted = usage_of_body(raw)
            if counted:
                self.prompt_tokens, self.completion_tokens = counted
        return web.Response(status=up.status, body=raw, headers=back)

    def _finish(self) -> None:
        """Release the model, record the request, write its access-log line."""
        lease = self.lease
        if lease is not None:
            lease.release()
        request, engine, meter = self.request, self.engine, self.meter
        latency_s = time.perf_counter() - self.started_s
        ttft_s = meter.ttft_s if meter is not None else None
        estimated = self.tokens_estimated or (meter is not None and meter.tokens_estimated)
        prompt, completion = self.prompt_tokens, self.completion_tokens
        if meter is not None and not self.relayed:   # left or cut off mid-stream: what came
            prompt, completion = meter.prompt_tokens, meter.completion_tokens_or_estimate()
        if self.refused:   # counted as refused, never as a model's or a host's failure
            request.app[METRICS].on_refused(self.model, request.path)
        else:
            engine.record(RequestRecord(
                model=self.model, ok=self.ok, latency_s=latency_s, at_s=engine.clock.now(),
                endpoint=request.path, status=self.status, ttft_s=ttft_s,
                prompt_tokens=prompt, completion_tokens=completion, tokens_estimated=estimated,
                # A refusal before the model was held is no answer of the model's, for no task.
                task=request.get(TASK) if lease is not None else None,
                host=lease.host if lease is not None else None, error=self.error))
        access = request.app[ACCESS_LOG]
        if access.enabled:
            access.add(request.method, request.path, self.model or "-", self.status, latency_s,
                       ttft_s, prompt, completion, estimated and prompt + completion > 0,
                       *who(request))


def who(request: web.Request) -> tuple[str | None, str | None]:
    """The client's address and its key's name (never the secret), for the access log."""
    key = request.get(CLIENT_KEY)
    return request.remote, None if key is None else key.name


def log_refused_at_edge(request: web.Request, status: int, started_s: float) -> None:
    """The access-log line of an inference request refused before its handler ran (its Host
    or Origin, its key): the handler's Relay never saw it."""
    access = request.app[ACCESS_LOG]
    if access.enabled:
        access.add(request.method, request.path, "-", status,
                   time.perf_counter() - started_s, None, 0, 0, False, *who(request))


class UntilHostLost:
    """An upstream call of a fleet's whose host is counted down before its answer's head
    comes fails as unreachable, so that the request goes once to another host, rather than
    wait read_timeout_s for a frozen server. The head is the line: once it has come, the
    answer is this host's (nothing could be retried)."""
    __slots__ = ("call", "lost", "host")

    def __init__(self, call: Any, lost: asyncio.Future[None], host: str) -> None:
        self.call, self.lost, self.host = call, lost, host

    async def __aenter__(self) -> UpstreamResponse:
        deadline = asyncio.timeout(None)
        waiting = True

        def now(_: asyncio.Future[None]) -> None:
            if waiting:   # (a callback already scheduled may run after the head came)
                deadline.reschedule(0.0)     # a time past: at once
        try:
            async with deadline:
                self.lost.add_done_callback(now)
                try:
                    return await self.call.__aenter__()
                finally:
                    waiting = False
                    self.lost.remove_done_callback(now)
        except TimeoutError:
            if not deadline.expired():
                raise
            # No head came, so nothing of this answer has reached the client.
            raise UpstreamUnreachable(
                f"host '{self.host}' was counted down before it answered") from None

    async def __aexit__(self, *exc: Any) -> Any:
        return await self.call.__aexit__(*exc)


async def read_upstream(request: web.Request, method: str, path: str) -> web.Response:
    """A small upstream answer (a model list, the greeting) read whole, under the same header
    policy both ways."""
    async with request.app[UPSTREAM].request(
            method, path, headers.to_upstream(request.headers), None) as up:
        return web.Response(status=up.status, body=await up.read(),
                            headers=headers.to_client(up.headers))
