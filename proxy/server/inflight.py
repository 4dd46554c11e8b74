"""Requests in flight: what a bounded shutdown must end, and writes that cannot hang on a client.

`InFlight` knows every request being handled and, for streams, the response already started.
At the shutdown deadline `end_all()` sends each open stream an OpenAI error event and ends it,
and cancels every other request, which the errors middleware then answers with 503
`shutting_down`. `write_or_stall()` is the relay's write: a client that takes no bytes for
`server.stall_timeout_s` has its connection dropped, so its lease is released.
"""
from __future__ import annotations

import asyncio
import logging

import orjson
from aiohttp import web

from ..liveconfig import LiveConfig

log = logging.getLogger("proxy.inflight")

# The transport can take this many more bytes without pausing the writer (aiohttp's high-water
# mark is 64 KiB): below it a write never waits, so no timer is armed.
_NO_WAIT_BYTES = 16 * 1024
_END_WRITE_TIMEOUT_S = 1.0


class ClientStalled(ConnectionResetError):
    """The client stopped reading: counted like a client that went away."""


STREAM = web.RequestKey("stream_response", web.StreamResponse)
ENDED = web.ResponseKey("ended_by_proxy", bool)


class InFlight:
    def __init__(self, live: LiveConfig) -> None:
        self.live = live
        self.requests: dict[int, web.Request] = {}   # by id(): requests are not hashable
        self.ending = False     # the shutdown deadline passed: cancellations become 503s

    @property
    def stall_timeout_s(self) -> float:
        return self.live.current.server.stall_timeout_s

    def stream_started(self, request: web.Request, resp: web.StreamResponse) -> None:
        request[STREAM] = resp

    async def end_all(self, message: str) -> int:
        """End every request still running; returns how many there were."""
        self.ending = True
        pending = list(self.requests.values())
        event = b"data: " + orjson.dumps({"error": {
            "message": message, "type": "server_error", "param": None,
            "code": "shutting_down"}}) + b"\n\n"
        for request in pending:
            resp = request.get(STREAM)
            if resp is not None and ENDED not in resp:
                resp[ENDED] = True
                try:
                    async with asyncio.timeout(_END_WRITE_TIMEOUT_S):
                        await resp.write(event)
                        await resp.write_eof()
                except (TimeoutError, ConnectionError, RuntimeError):
                    if request.transport is not None:
                        request.transport.abort()   # a client that reads nothing gets nothing
            if request.task is not None and not request.task.done():
                request.task.cancel()
        return len(pending)


async def write_or_stall(request: web.Request, resp: web.StreamResponse, data: bytes) -> None:
    if ENDED in resp:
        raise ClientStalled("the stream was ended by the proxy")
    transport = request.transport
    if transport is not None and transport.get_write_buffer_size() + len(data) <= _NO_WAIT_BYTES:
        await resp.write(data)
        return
    stall_s = request.app[INFLIGHT].stall_timeout_s
    try:
        async with asyncio.timeout(stall_s):
            await resp.write(data)
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        raise ClientStalled(f"the client took no bytes for {stall_s:g} s") from None


INFLIGHT = web.AppKey("inflight", InFlight)
