"""LM Studio's own protocol through the proxy: the greeting and one websocket per namespace.

Each client websocket gets its own upstream websocket on the same path, once its first frame
(the SDKs' auth frame) has passed `guard.handshake`: LM Studio gets that frame as it came, or,
when a proxy key was in it, one without the key. Then frames go both ways as they came (text
as text, binary as binary), none larger than `native.max_frame_bytes` (a bigger one closes
both sides with 1009), and a close on either side closes the other. `mediate.Mediator` looks
at the frames the engine and the guard must know about.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import AsyncIterator

import aiohttp
from aiohttp import WSCloseCode, WSMessage, WSMsgType, web
from yarl import URL

from ..urls import redact_url
from ..engine.face import Engine
from ..fleet.hosts import host_upstream
from ..observe.hosts import fleet_of
from ..server.auth import CLIENT_KEY
from ..errors import InvalidRequest, RouteNotFound, UpstreamUnreachable
from ..server.keys import AUTH, CONFIG, ENGINE
from . import GREETING, NAMESPACES
from .guard import Admitted, Guard, LoadBook, Refusal, handshake
from ..server.relay import read_upstream
from .mediate import Mediator, Send

log = logging.getLogger("proxy.native")
WS_SESSION = web.AppKey("native_ws_session", aiohttp.ClientSession)
CLIENTS = web.AppKey("native_clients", set)
LOAD_BOOK = web.AppKey("native_load_book", LoadBook)
# The Python SDK's websockets (httpx-ws) announce themselves so; it wants errors as fields.
PYTHON_SDK_AGENT = "python-httpx/"
CLOSE_TIMEOUT_S = 5.0


def add_routes(app: web.Application) -> None:
    app.router.add_get(GREETING, greeting)
    for ns in NAMESPACES:
        app.router.add_get(f"/{ns}", websocket)
    app.cleanup_ctx.append(_session_ctx)
    app[CLIENTS] = set()
    app[LOAD_BOOK] = LoadBook()
    app.on_shutdown.append(_going_away)


async def _going_away(app: web.Application) -> None:
    """Shutdown does not wait for SDK connections: they are closed, their relays end."""
    for ws in list(app[CLIENTS]):
        await ws.close(code=WSCloseCode.GOING_AWAY)


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    c = app[CONFIG].current.upstream
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


@dataclass(frozen=True)
class Target:
    """The server a native connection is relayed to, and the engine that mediates its loads."""
    url: str
    api_token: str | None
    engine: Engine
    path_qs: str       # as LM Studio gets it (a fleet's `host` parameter removed)


def target_of(request: web.Request) -> Target:
    """One server: it. A fleet: the host `?host=` names, else `placement.native_host`, else
    the first; each connection stays on its host."""
    app, config = request.app, request.app[CONFIG].current
    fleet = fleet_of(app[ENGINE])
    if fleet is None:
        if "host" in request.query:
            raise InvalidRequest("This proxy serves one upstream: `host` applies to a fleet "
                                 "(upstreams: in the config)", param="host")
        return Target(config.upstream.url, config.upstream.api_token, app[ENGINE],
                      request.path_qs)
    name = request.query.get("host")
    h = fleet.host(name) if name is not None else fleet.native
    query = {k: v for k, v in request.query.items() if k != "host"}
    return Target(h.config.url, host_upstream(h.config).api_token, h.core,
                  str(request.rel_url.with_query(query)))


async def websocket(request: web.Request) -> web.StreamResponse:
    app, config = request.app, request.app[CONFIG].current
    target = target_of(request)
    caps = target.engine.capabilities
    if caps is not None and not caps.native_clients:
        raise RouteNotFound(f"the upstream ({config.upstream.kind}) has no native client "
                            f"protocol; use its OpenAI-compatible API under /v1")
    ns = request.path.strip("/")
    header_key = request.get(CLIENT_KEY)
    upstream = None
    if not app[AUTH].ring.enabled or header_key is not None:
        # Nothing left to check: LM Studio unreachable is an HTTP error before the upgrade.
        upstream = await _connect(app, target)
    client = web.WebSocketResponse(max_msg_size=config.native.max_frame_bytes, autoclose=False)
    try:
        await client.prepare(request)
        app[CLIENTS].add(client)
        first = await _first_frame(client, config.server.header_timeout_s)
        if first is None:
            return client
        verdict = handshake(app[AUTH], ns, first.data if first.type is WSMsgType.TEXT else None,
                            header_key, target.api_token)
        structured = request.headers.get("User-Agent", "").startswith(PYTHON_SDK_AGENT)
        if isinstance(verdict, Refusal):
            log.info("refused a /%s connection: %s", ns, verdict.error.message)
            await _refuse(client, verdict, structured, WSCloseCode.POLICY_VIOLATION)
            return client
        if upstream is None:
            try:
                upstream = await _connect(app, target)
            except UpstreamUnreachable as exc:
                await _refuse(client, Refusal(exc, "The proxy cannot reach LM Studio.",
                                              "Is LM Studio running?"), structured,
                              WSCloseCode.TRY_AGAIN_LATER)
                return client
        if first.type is WSMsgType.BINARY:
            await upstream.send_bytes(first.data)
        else:
            await upstream.send_str(verdict.upstream_frame)
        await _serve(app, target.engine, ns, client, upstream, verdict)
    finally:
        app[CLIENTS].discard(client)
        if upstream is not None:
            await upstream.close()
    return client


async def _connect(app: web.Application, target: Target) -> aiohttp.ClientWebSocketResponse:
    config = app[CONFIG].current
    url = upstream_ws_url(target.url, target.path_qs)
    try:
        return await app[WS_SESSION].ws_connect(url, max_msg_size=config.native.max_frame_bytes,
                                                autoclose=False)
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamUnreachable(f"LM Studio at {redact_url(target.url)} is not "
                                  f"reachable ({exc})") from exc


async def _first_frame(client: web.WebSocketResponse, timeout_s: float) -> WSMessage | None:
    """The handshake's frame (None: the client closed, or sent nothing in time)."""
    try:
        msg = await client.receive(timeout=timeout_s)
    except TimeoutError:
        await client.close(code=WSCloseCode.POLICY_VIOLATION, message=b"no auth frame")
        return None
    return msg if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY) else None


async def _refuse(client: web.WebSocketResponse, refusal: Refusal, structured: bool,
                  code: int) -> None:
    await client.send_str(refusal.auth_result(structured))
    await client.close(code=code)


async def _serve(app: web.Application, engine: Engine, ns: str, client: web.WebSocketResponse,
                 upstream: aiohttp.ClientWebSocketResponse, admitted: Admitted) -> None:
    guard = Guard(admitted, ns, app[LOAD_BOOK], engine.owner_of, app[AUTH].counters)
    engine.client_connection(admitted.owner, +1)
    try:
        await _relay(client, upstream, Mediator(
            engine, ns, _sender(upstream), _sender(client), admitted.owner, guard))
    finally:
        engine.client_connection(admitted.owner, -1)


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
    # Only LM Studio's side ending first is LM Studio going away. Anything else is the client
    # leaving: its close ending its side first, or its connection dropped without a close (a
    # killed process, `Client.close()` of the sync SDK), which cancels this handler instead.
    upstream_left = False
    try:
        done, _ = await asyncio.wait({to_up, to_client}, return_when=asyncio.FIRST_COMPLETED)
        upstream_left = to_client in done
    finally:
        for task in (to_up, to_client):
            task.cancel()
        try:
            await asyncio.gather(to_up, to_client, return_exceptions=True)
        finally:
            # Reached even when a client's disconnect cancels this handler twice (the second
            # cancel lands on the await above): its first steps release every lease at once.
            await mediator.close(client_left=not upstream_left)
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
