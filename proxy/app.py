"""create_app(): the aiohttp application with its engine, upstream session and background loops."""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Awaitable, Callable

import orjson
from aiohttp import web

from .config import Config
from .engine.clock import Clock
from .engine.health import ModelHealthMonitor
from .engine.lifecycle import ModelStatus
from .engine.manager import ModelMemoryManager
from .engine.memory import MemorySampler
from .engine.webhook import WebhookSink
from .errors import ProxyError, RouteNotFound, ShuttingDown
from .handlers import admin, health, openai
from .accesslog import AccessLog
from .inflight import INFLIGHT, STREAM, InFlight
from .intake import clip
from .reload import RELOADER, Reloader
from .serving import SERVING, ServingOptions
from .auth import AuthCollector, AuthState, authenticate
from .keys import ACCESS_LOG, AUTH, CONFIG, ENGINE, HEALTH, METRICS, RESPONSE_STARTED, UPSTREAM
from .metrics import ProxyMetrics
from .store import UsageStore, default_path
from .upstream.base import Upstream

log = logging.getLogger("proxy.app")


def error_response(exc: ProxyError) -> web.Response:
    return web.Response(body=orjson.dumps(exc.body()), status=exc.status,
                        content_type="application/json", headers=exc.headers())


@web.middleware
async def errors_middleware(request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
    """Everything the proxy itself answers with is an OpenAI error envelope, never HTML.
    Requests are authenticated here and tracked while in flight (for a bounded shutdown)."""
    app = request.app
    inflight = app[INFLIGHT]
    inflight.requests[id(request)] = request
    try:
        authenticate(app[AUTH], request)
        return await handler(request)
    except asyncio.CancelledError:
        if not inflight.ending:
            raise
        # Past the shutdown deadline: answer instead of dropping the connection.
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        stream = request.get(STREAM)
        if stream is not None:
            return stream       # already ended with an error event
        return error_response(ShuttingDown(
            "The proxy is shutting down (its drain time is over); retry the request."))
    except ProxyError as exc:
        return error_response(exc)
    except ConnectionResetError:
        stream = request.get(STREAM)
        if stream is None:
            raise
        return stream   # the client stopped reading (or left): its stream was dropped, quietly
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            return error_response(RouteNotFound(
                f"Unknown route: {clip(request.method, 20)} {clip(request.path)}"))
        err = ProxyError(exc.reason or "request failed")
        err.status, err.type, err.code = exc.status, "invalid_request_error", None
        return error_response(err)
    except Exception:
        if request.get(RESPONSE_STARTED):
            raise   # mid-stream: the connection is dropped, as the upstream dropped it
        log.exception("unhandled error on %s %s", clip(request.method, 20), clip(request.path))
        return error_response(ProxyError("Internal error in the proxy; see its log."))
    finally:
        inflight.requests.pop(id(request), None)


def create_app(config: Config, *, upstream: Upstream | None = None, clock: Clock | None = None,
               sampler: MemorySampler | None = None,
               config_source: Callable[[], Config] | None = None) -> web.Application:
    """`config_source` reads the configuration anew for a reload (SIGHUP, POST /proxy/reload)."""
    if upstream is None:
        from .upstream.lmstudio import LMStudioUpstream
        upstream = LMStudioUpstream(config.upstream)
    auth = AuthState(config)
    app = web.Application(middlewares=[errors_middleware],
                          client_max_size=config.server.max_body_bytes)
    store = None
    if config.storage.enabled:
        store = UsageStore(config.storage.path or default_path(), config.storage.retention_days)
    engine = ModelMemoryManager(config=config, upstream=upstream, clock=clock, sampler=sampler,
                                store=store)
    sink = None
    if config.health.webhook_url:
        sink = WebhookSink(config.health.webhook_url, timeout_s=config.health.webhook_timeout_s,
                           max_attempts=config.health.webhook_max_attempts)
    app[CONFIG] = config
    app[UPSTREAM] = upstream
    app[ENGINE] = engine
    app[METRICS] = ProxyMetrics(engine)
    app[AUTH] = auth
    app[INFLIGHT] = InFlight(config.server.stall_timeout_s)
    app[SERVING] = ServingOptions.from_config(config.server)
    app[RELOADER] = Reloader(config, config_source)
    app[METRICS].registry.register(AuthCollector(auth.counters))
    app[ACCESS_LOG] = AccessLog()
    app[HEALTH] = ModelHealthMonitor(engine, config.health, sink=sink,
                                     prober=_prober(engine, upstream))
    app.cleanup_ctx.append(_engine_ctx)
    openai.add_routes(app)
    admin.add_routes(app)
    health.add_routes(app)
    return app


def _prober(engine: ModelMemoryManager, upstream: Upstream
            ) -> Callable[[str], Awaitable[None]]:
    """A one-token completion to a loaded model, holding a lease so it is not evicted
    meanwhile, and not recorded as user traffic."""
    async def probe(key: str) -> None:
        entry = engine.entry(key)
        if entry is None or entry.status is not ModelStatus.LOADED:
            return
        lease = await engine.acquire(key)
        try:
            body = orjson.dumps({"model": key, "max_tokens": 1, "messages": [
                {"role": "user", "content": "ping"}]})
            async with upstream.request("POST", "/v1/chat/completions",
                                        {"Content-Type": "application/json"}, body) as resp:
                await resp.read()
                if resp.status != 200:
                    raise ProxyError(f"probe answered HTTP {resp.status}")
        finally:
            lease.release()
    return probe


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    upstream, engine, health = app[UPSTREAM], app[ENGINE], app[HEALTH]
    await app[ACCESS_LOG].start()
    await upstream.start()
    await engine.start()
    if not engine.upstream_ok:
        log.warning("upstream %s not reachable yet (%s); will keep trying",
                    app[CONFIG].upstream.url, engine.upstream_error)
    await engine.start_monitoring()
    if health.sink is not None:
        await health.sink.start()
    await health.start_monitoring()
    yield
    await health.stop_monitoring()
    if health.sink is not None:
        await health.sink.close()
    await engine.cleanup()
    await upstream.close()
    await app[ACCESS_LOG].close()
