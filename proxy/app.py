"""create_app(): the aiohttp application with its engine, upstream session and background loops."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Awaitable, Callable

import orjson
from aiohttp import web

from .config import Config
from .urls import redact_url
from .engine.clock import Clock
from .observe.health import ModelHealthMonitor
from .engine.core import EngineCore
from .engine.replica import create_replica
from .engine.shared import SINGLE_HOST
from .fleet import create_fleet
from .engine.face import Engine
from .engine.memory import MemorySampler
from .errors import MethodNotAllowed, ProxyError, RouteNotFound, ShuttingDown
from .observe.events import EventHub
from .observe.gauges import SharedStateCollector
from .handlers import admin, dashboard, openai, probes
from .observe.accesslog import AccessLog
from .observe.relayed import EventRelay
from .server.auth import AuthCollector, AuthState, authenticate
from .server import scope
from .server.compat import Compat
from .server.inflight import INFLIGHT, STREAM, InFlight
from .errors import clip
from .liveconfig import LiveConfig
from .server.browser import BrowserGuard
from .server.keys import (ACCESS_LOG, AUTH, BROWSER, COMPAT, CONFIG, ENGINE, EVENTS, HEALTH,
                          HOSTS, METRICS, REPLICA, RESPONSE_STARTED, UPSTREAM)
from .observe.metrics import CompatCollector, ProxyMetrics
from .native import relay as native
from .server.relay import log_refused_at_edge
from .server.reload import RELOADER, Reloader
from .server.serving import SERVING, ServingOptions
from .storage import configured_store
from .upstream import create_upstream
from .upstream.base import Upstream
from .observe.webhook import WebhookSink

log = logging.getLogger("proxy.app")


def error_response(exc: ProxyError) -> web.Response:
    return web.Response(body=orjson.dumps(exc.body()), status=exc.status,
                        content_type="application/json", headers=exc.headers())


@web.middleware
async def errors_middleware(request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
    """Everything the proxy itself answers with is an OpenAI error envelope, never HTML.
    Requests are checked here (their Host and Origin, then their credentials) and tracked while
    in flight (for a bounded shutdown)."""
    app = request.app
    inflight = app[INFLIGHT]
    inflight.requests[id(request)] = request
    started_s = time.perf_counter()
    try:
        try:
            app[BROWSER].check(request, app[AUTH].counters)
            authenticate(app[AUTH], request)
        except ProxyError as exc:
            if openai.is_inference(request):   # its one access-log line: no Relay saw it
                log_refused_at_edge(request, exc.status, started_s)
            raise
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
        return error_response(scope.error(request, exc))
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
        if isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = sorted(exc.allowed_methods)
            return error_response(MethodNotAllowed(
                f"{clip(request.method, 20)} is not allowed on {clip(request.path)}; use "
                f"{' or '.join(allowed)}", allowed))
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
    # The one running configuration: everything below reads it through `live`, and a reload
    # swaps it (reload.py). Only start-only keys are read here, once.
    live = LiveConfig(config)
    live.on_swap(_set_log_level)
    engine: Engine
    replica = create_replica(config.state) if config.state.backend == "redis" else None
    if config.upstreams:
        fleet = create_fleet(live, clock=clock, replica=replica)
        engine, upstream = fleet, fleet.native.backend
        app_hosts = {h.name: h.backend for h in fleet.hosts}
    else:
        if upstream is None:
            upstream = create_upstream(config.upstream)
        engine = EngineCore(live, upstream, clock=clock, sampler=sampler,
                            store=configured_store(config.storage),
                            shared=replica.host(SINGLE_HOST) if replica is not None else None)
        app_hosts = {}
    auth = AuthState(live)
    app = web.Application(middlewares=[errors_middleware],
                          client_max_size=config.server.max_body_bytes)
    app[HOSTS] = app_hosts
    app[REPLICA] = replica
    app[CONFIG] = live
    app[UPSTREAM] = upstream
    app[ENGINE] = engine
    app[METRICS] = ProxyMetrics(engine)
    app[COMPAT] = Compat(live)
    app[METRICS].registry.register(CompatCollector(app[COMPAT]))
    app[AUTH] = auth
    app[BROWSER] = BrowserGuard(live)
    app[INFLIGHT] = InFlight(live)
    app[SERVING] = ServingOptions.from_config(config.server)
    app[RELOADER] = Reloader(config_source)
    app[METRICS].registry.register(AuthCollector(auth))
    app[ACCESS_LOG] = AccessLog()
    app[HEALTH] = ModelHealthMonitor(engine, sink=WebhookSink(lambda: live.current.health),
                                     prober=_prober(engine), shared_state=replica)
    if replica is not None:
        app[METRICS].registry.register(SharedStateCollector(replica))
    app[EVENTS] = EventHub(engine, app[HEALTH])
    app.cleanup_ctx.extend(RESOURCES)
    app.on_shutdown.append(_close_event_streams)
    openai.add_routes(app)
    admin.add_routes(app)
    probes.add_routes(app)
    dashboard.add_routes(app)
    native.add_routes(app)
    return app


def _set_log_level(old: Config, new: Config) -> None:
    logging.getLogger().setLevel(new.logging.level)


async def _close_event_streams(app: web.Application) -> None:
    """Event streams never end by themselves: end them before the server waits for handlers."""
    app[EVENTS].close_clients()


def _prober(engine: Engine) -> Callable[[str], Awaitable[None]]:
    """A one-token completion to a loaded model under a HOLD lease: it cannot be evicted
    meanwhile, and the probe is no use of it (recency, heat, idle timer and statistics stay)."""
    async def probe(key: str) -> None:
        lease = engine.hold(key)
        if lease is None:
            return   # not loaded (any more): nothing to probe, and never load it to probe
        try:
            body = orjson.dumps({"model": key, "max_tokens": 1, "messages": [
                {"role": "user", "content": "ping"}]})
            async with engine.upstream_for(lease).request("POST", "/v1/chat/completions",
                                        {"Content-Type": "application/json"}, body) as resp:
                await resp.read()
                if resp.status != 200:
                    raise ProxyError(f"probe answered HTTP {resp.status}")
        finally:
            lease.release()
    return probe


# One cleanup context per resource, set up in this order and closed in reverse: a failure
# while starting one still closes those started before it.
async def _access_log_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[ACCESS_LOG].start()
    yield
    await app[ACCESS_LOG].close()


async def _events_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[EVENTS].start()
    yield
    await app[EVENTS].close()


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    backends = list(app[HOSTS].values()) or [app[UPSTREAM]]
    started = []
    try:
        for backend in backends:
            await backend.start()
            started.append(backend)
        yield
    finally:
        for backend in reversed(started):
            await backend.close()


async def _replica_ctx(app: web.Application) -> AsyncIterator[None]:
    replica = app[REPLICA]
    if replica is None:
        yield
        return
    await replica.start()
    try:
        yield
    finally:
        await replica.close()


async def _event_relay_ctx(app: web.Application) -> AsyncIterator[None]:
    replica = app[REPLICA]
    if replica is None:
        yield
        return
    relay = EventRelay(app[EVENTS], replica.store)
    relay.on_remote.append(replica.heard)      # others' loads and unloads reach the engine
    await relay.start()
    try:
        yield
    finally:
        await relay.close()


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    engine = app[ENGINE]
    try:
        await engine.start()
        config = app[CONFIG].current
        if not engine.upstream_ok:
            # A fleet's upstream.url is no server of it (each host has its own url).
            log.warning("%s reachable yet (%s); will keep trying",
                        "no host" if config.upstreams else
                        f"upstream {redact_url(config.upstream.url)} not", engine.upstream_error)
        elif engine.upstream_error:
            log.warning("some hosts are not reachable yet (%s); will keep trying",
                        engine.upstream_error)
        await engine.start_monitoring()
        yield
    finally:
        await engine.cleanup()


async def _webhook_ctx(app: web.Application) -> AsyncIterator[None]:
    sink = app[HEALTH].sink
    if sink is not None:
        await sink.start()
    yield
    if sink is not None:
        await sink.close()


async def _health_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[HEALTH].start_monitoring()
    yield
    await app[HEALTH].stop_monitoring()


RESOURCES = (_access_log_ctx, _events_ctx, _upstream_ctx, _replica_ctx, _event_relay_ctx,
             _engine_ctx, _webhook_ctx, _health_ctx)
