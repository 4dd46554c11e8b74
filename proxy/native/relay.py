"""LM Studio's own protocol through the proxy: the greeting and one websocket per namespace.

Each client websocket gets its own upstream websocket on the same path; frames go both ways as
they came (text as text, binary as binary), the auth frame included, and a close on either side
closes the other. `mediate.Mediator` looks at the frames the engine must know about.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from yarl import URL

from ..config import redact_url
from ..errors import UpstreamUnreachable
from ..keys import CONFIG, ENGINE
from ..server.relay import read_upstream
from .mediate import Mediator, Send

log = logging.getLogger("proxy.native")
NAMESPACES = ("llm", "embedding", "system", "diagnostics", "files", "repository", "plugins",
              "runtime")
WS_SESSION = web.AppKey("native_ws_session", aiohttp.ClientSession)
CLIENTS = web.AppKey("native_clients", set)
CLOSE_TIMEOUT_S = 5.0


def add_routes(app: web.Application) -> None:
    app.router.add_get("/lmstudio-greeting", greeting)
    for ns in NAMESPACES:
        app.router.add_get(f"/{ns}", websocket)
    app.cleanup_ctx.append(_session_ctx)
    app[CLIENTS] = set()
    app.on_shutdown.append(_going_away)


async def _going_away(app: web.Application) -> None:
    """Shutdown does not wait for SDK connections: they are closed, their relays end."""
    for ws in list(app[CLIENTS]):
        await ws.close(code=WSCloseCode.GOING_AWAY)


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    c = app[CONFIG].upstream
    timeout = aiohttp.ClientTimeout(total=None, connect=c.connect_timeout_s)
    app[WS_SESSION] = session = aiohttp.ClientSession(timeout=timeout)
    yield
    await session.close()


async def greeting(request: web.Request) -> web.Response:
    """The SDKs' probe; LM Studio's answer, so a proxy in front of no LM Studio says so."""
    return await read_upstream(request, "GET", "/lmstudio-greeting")


def upstream_ws_url(base_url: str, path_qs: str) -> str:
    url = URL(base_url)
    return str(url.with_scheme("wss" if url.scheme == "https" else "ws")
               .join(URL(path_qs)))


async def websocket(request: web.Request) -> web.StreamResponse:
    app = request.app
    url = upstream_ws_url(app[CONFIG].upstream.url, request.path_qs)
    try:
        upstream = await app[WS_SESSION].ws_connect(url, max_msg_size=0, autoclose=False)
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamUnreachable(f"LM Studio at {redact_url(app[CONFIG].upstream.url)} is not "
                                  f"reachable ({exc})") from exc
    client = web.WebSocketResponse(max_msg_size=0, autoclose=False)
    try:
        await client.prepare(request)
        app[CLIENTS].add(client)
        await _relay(client, upstream, Mediator(
            app[ENGINE], request.path.strip("/"), _sender(upstream), _sender(client)))
    finally:
        app[CLIENTS].discard(client)
        await upstream.close()
    return client


def _sender(ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> Send:
    lock = asyncio.Lock()   # the pump and mediation tasks both send: frames stay whole

    async def send(data: str) -> None:
        async with lock:
            if not ws.closed:
                await ws.send_str(data)
    return send


async def _relay(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse,
                 mediator: Mediator) -> None:
    to_up = asyncio.ensure_future(_pump(client, upstream, mediator.from_client))
    to_client = asyncio.ensure_future(_pump(upstream, client, mediator.from_upstream))
    try:
        await asyncio.wait({to_up, to_client}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (to_up, to_client):
            task.cancel()
        await asyncio.gather(to_up, to_client, return_exceptions=True)
        await mediator.close()
        # The side still open learns the other's close code (e.g. LM Studio going away).
        code = client.close_code or upstream.close_code or WSCloseCode.OK
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                for ws in (client, upstream):
                    if not ws.closed:
                        await ws.close(code=code)


async def _pump(src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                on_text: Send) -> None:
    async for msg in src:
        if msg.type is WSMsgType.TEXT:
            await on_text(msg.data)
        elif msg.type is WSMsgType.BINARY and not dst.closed:
            await dst.send_bytes(msg.data)
        elif msg.type is WSMsgType.CLOSE:
            break
