"""An ASGI application served at a path of the proxy's own aiohttp server: no second server and
no second port. Used for the MCP SDK's streamable HTTP transport (a Starlette app)."""
from __future__ import annotations

import asyncio
from typing import Any, AsyncContextManager, Awaitable, Callable

from aiohttp import web

# The scope key of the aiohttp request an ASGI call serves (its app, its connection).
AIOHTTP_REQUEST = "aiohttp.request"
ReadBody = Callable[[web.Request], Awaitable[bytes]]
Asgi = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]],
                 Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]


def mount(app: web.Application, path: str, asgi: Asgi,
          lifespan: Callable[[], AsyncContextManager[Any]] | None = None, *,
          read_body: ReadBody | None = None) -> None:
    """Route every method at `path` to `asgi`; `lifespan` is held open while the app serves,
    in a task of its own (an anyio task group must be left by the task that entered it).
    `read_body` takes the request's body in (deadline, limits, decoding); by default it is read
    as sent. A decoded body reaches the app without Content-Encoding, with its own length."""
    streams: set[asyncio.Event] = set()

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await (read_body or _as_sent)(request)
        return await _serve(asgi, request, body, streams)

    async def end_streams(_app: web.Application) -> None:
        # An event stream (GET /mcp) never ends by itself: told that its client left, it ends
        # before the shutdown waits for requests to finish, as /proxy/events does.
        for disconnect in list(streams):
            disconnect.set()

    app.router.add_route("*", path, handler)
    app.on_shutdown.append(end_streams)
    if lifespan is not None:
        app.cleanup_ctx.append(_held(lifespan))


def _held(lifespan: Callable[[], AsyncContextManager[Any]]) -> Any:
    async def ctx(_app: web.Application) -> Any:
        started, stop = asyncio.Event(), asyncio.Event()

        async def hold() -> None:
            async with lifespan():
                started.set()
                await stop.wait()

        task = asyncio.create_task(hold())
        done, _ = await asyncio.wait([task, asyncio.create_task(started.wait())],
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()   # it failed to start: raise why
        yield
        stop.set()
        await task
    return ctx


async def _as_sent(request: web.Request) -> bytes:
    return await request.read()


def _headers(request: web.Request, body: bytes) -> list[tuple[bytes, bytes]]:
    """The request's headers as ASGI has them, describing `body` as it is passed on."""
    encoded = "Content-Encoding" in request.headers
    out = [(k.lower(), v) for k, v in request.raw_headers
           if not encoded or k.lower() not in (b"content-encoding", b"content-length")]
    if encoded:
        out.append((b"content-length", str(len(body)).encode()))
    return out


async def _serve(asgi: Asgi, request: web.Request, body: bytes,
                 streams: set[asyncio.Event]) -> web.StreamResponse:
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": request.method, "scheme": request.scheme, "path": request.path,
             "raw_path": request.raw_path.encode(), "root_path": "",
             "query_string": request.query_string.encode(),
             "headers": _headers(request, body),
             "client": (request.remote or "", 0),
             "server": (sock[0], sock[1]) if sock else None, AIOHTTP_REQUEST: request}
    finished = asyncio.Event()
    sent_body = False
    response: web.StreamResponse | None = None

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal response
        if message["type"] == "http.response.start":
            response = web.StreamResponse(status=message["status"])
            for k, v in message.get("headers", []):
                response.headers.add(k.decode("latin-1"), v.decode("latin-1"))
            if "Content-Length" not in response.headers:
                # A stream (GET /mcp's events): its headers go now, not with its first event.
                # A sized answer waits for its body, to go out in one write.
                await response.prepare(request)
                streams.add(finished)
        elif message["type"] == "http.response.body":
            assert response is not None, "body before start"
            if not response.prepared:
                await response.prepare(request)
            if message.get("body"):
                await response.write(message["body"])
            if not message.get("more_body"):
                await response.write_eof()
                finished.set()

    try:
        await asgi(scope, receive, send)
    finally:
        finished.set()
        streams.discard(finished)
    if response is None:
        raise web.HTTPInternalServerError(text="the mounted application sent no response")
    if not response.prepared:
        await response.prepare(request)
        await response.write_eof()
    return response
