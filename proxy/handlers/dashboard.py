"""The event stream (`GET /proxy/events`, Server-Sent Events), the timeline and the dashboard.

The stream starts with `retry:` and either a `snapshot` event (a fresh client, or one whose
`Last-Event-ID` the ring cannot resume) or the events it missed; then events as they come and a
comment line every `heartbeat_s` (observe/events.py) so proxies and browsers keep the connection open.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from ..errors import InvalidRequest
from ..observe.timeline import TIMELINE_S, merge_history
from ..server import scope
from ..server.keys import ENGINE, EVENTS, RESPONSE_STARTED
from .admin import json_response

RETRY_MS = 2000
UI_DIR = Path(__file__).resolve().parent.parent / "ui"
# No page of another site may show the dashboard in a frame: its buttons act (load, unload,
# pin) with the viewer's access, and a frame under a decoy would have them clicked.
UI_HEADERS = {"Cache-Control": "no-cache", "X-Frame-Options": "DENY",
              "Content-Security-Policy": "frame-ancestors 'none'",
              "X-Content-Type-Options": "nosniff"}


async def events(request: web.Request) -> web.StreamResponse:
    hub = request.app[EVENTS]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    request[RESPONSE_STARTED] = True
    transport = request.transport
    last_id = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    client, first = hub.subscribe(last_id, abort=transport.abort if transport else lambda: None)
    try:
        await resp.write(b"retry: %d\n\n" % RETRY_MS +
                         scope.events(scope.scope_of(request), first))
        while not client.dropped:
            try:
                async with asyncio.timeout(hub.heartbeat_s):   # (wait_for may lose a cancel)
                    await client.wake.wait()
            except TimeoutError:
                await resp.write(b": keep-alive\n\n")
                continue
            client.wake.clear()
            if client.dropped:
                break
            # (the scope anew each time: a model listed since is someone else's too)
            data = scope.events(scope.scope_of(request), client.take())
            if data:
                await resp.write(data)
    except ConnectionError:
        pass   # the viewer went away (a dropped one is cancelled by its aborted connection)
    finally:
        hub.unsubscribe(client)
    return resp


async def event_stats(request: web.Request) -> web.Response:
    return json_response(request.app[EVENTS].stats())


async def timeline(request: web.Request) -> web.Response:
    try:
        hours = float(request.query.get("hours", "1"))
    except ValueError:
        raise InvalidRequest("'hours' must be a number.", param="hours") from None
    if not 0 < hours <= TIMELINE_S / 3600:
        raise InvalidRequest(f"'hours' must be in (0, {TIMELINE_S / 3600:g}].", param="hours")
    hub, engine = request.app[EVENTS], request.app[ENGINE]
    data = hub.timeline(hours * 3600)
    store = engine.store
    if store is not None and store.ok and data["since"] < data["started"]:
        since_minute = int(data["since"] // 60)
        keys = list(data["models"])
        rows = await asyncio.to_thread(
            lambda: {k: store.history(k, since_minute) for k in keys})
        merge_history(data, rows)
    return json_response(scope.view(request, data))


async def ui_index(request: web.Request) -> web.StreamResponse:
    if request.path == "/ui":
        raise web.HTTPFound("/ui/")
    return web.FileResponse(UI_DIR / "index.html", headers=UI_HEADERS)


async def ui_file(request: web.Request) -> web.StreamResponse:
    """One of the dashboard's files (a flat directory: the route takes no '/')."""
    name = request.match_info["name"]
    path = UI_DIR / name
    if name.startswith(".") or not path.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(path, headers=UI_HEADERS)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/proxy/events", events)
    r.add_get("/proxy/events/stats", event_stats)
    r.add_get("/proxy/timeline", timeline)
    r.add_get("/ui", ui_index)
    r.add_get("/ui/", ui_index)
    r.add_get("/ui/{name:[A-Za-z0-9_.-]+}", ui_file)



