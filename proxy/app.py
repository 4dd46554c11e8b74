"""create_app(): the aiohttp application with its engine, upstream session and background loops."""
from __future__ import annotations

import logging
from typing import AsyncIterator, Awaitable, Callable

import orjson
from aiohttp import web

from .config import Config
from .engine.clock import Clock
from .engine.manager import ModelMemoryManager
from .engine.memory import MemorySampler
from .errors import ProxyError, RouteNotFound
from .handlers import admin, health, openai
from .keys import CONFIG, ENGINE, RESPONSE_STARTED, UPSTREAM
from .upstream.base import Upstream

log = logging.getLogger("proxy.app")


def error_response(exc: ProxyError) -> web.Response:
    return web.Response(body=orjson.dumps(exc.body()), status=exc.status,
                        content_type="application/json", headers=exc.headers())


@web.middleware
async def errors_middleware(request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
    """Everything the proxy itself answers with is an OpenAI error envelope, never HTML."""
    try:
        return await handler(request)
    except ProxyError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            return error_response(RouteNotFound(
                f"Unknown route: {request.method} {request.path}"))
        err = ProxyError(exc.reason or "request failed")
        err.status, err.type, err.code = exc.status, "invalid_request_error", None
        return error_response(err)
    except Exception:
        if request.get(RESPONSE_STARTED):
            raise   # mid-stream: the connection is dropped, as the upstream dropped it
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ProxyError("Internal error in the proxy; see its log."))


def create_app(config: Config, *, upstream: Upstream | None = None, clock: Clock | None = None,
               sampler: MemorySampler | None = None) -> web.Application:
    if upstream is None:
        from .upstream.lmstudio import LMStudioUpstream
        upstream = LMStudioUpstream(config.upstream)
    app = web.Application(middlewares=[errors_middleware],
                          client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config
    app[UPSTREAM] = upstream
    app[ENGINE] = ModelMemoryManager(config=config, upstream=upstream, clock=clock,
                                     sampler=sampler)
    app.cleanup_ctx.append(_engine_ctx)
    openai.add_routes(app)
    admin.add_routes(app)
    health.add_routes(app)
    return app


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    upstream, engine = app[UPSTREAM], app[ENGINE]
    await upstream.start()
    await engine.start()
    if not engine.upstream_ok:
        log.warning("upstream %s not reachable yet (%s); will keep trying",
                    app[CONFIG].upstream.url, engine.upstream_error)
    await engine.start_monitoring()
    yield
    await engine.cleanup()
    await upstream.close()
