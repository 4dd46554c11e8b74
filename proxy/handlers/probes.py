"""Liveness and readiness for orchestrators: /healthz (alive), /readyz (upstream usable; with a
fleet, at least one host usable, each host's state in the body)."""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ..upstream import no_loading
from ..urls import redact_url
from ..engine.face import Engine
from ..engine.hostlog import run_for
from ..fleet import Fleet
from ..observe.hosts import fleet_of, host_state
from ..server import scope
from ..server.keys import ENGINE, HEALTH, METRICS, REPLICA, UPSTREAM
from .admin import json_response

log = logging.getLogger("proxy.readiness")


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


class Readiness:
    """When /readyz looks at the upstream again: when the last look (this one's or the
    reconcile loop's) is older than `upstream.readiness_max_age_s`, so a dead upstream turns
    it at once; and while not ready (through the breaker, which fails fast while cooling down
    and lets this be the trial after). Probes that arrive meanwhile share the one look. A
    look is bounded by `upstream.probe_timeout_s` (the reconcile's own deadline).

    In a fleet each host is looked at on its own. Only the looks at hosts last known up are
    awaited (a dead one turns at once, a frozen one within its probe deadline); a host known
    down is looked at in the background and this answer gives its last known state, so one
    frozen host never holds up the answer for the others. With no host up, every look is
    awaited: the answer waits for the first host back."""

    def __init__(self) -> None:
        self._looks: dict[str | None, asyncio.Future[None]] = {}   # host (None: the one) →

    def _look(self, host: str | None, step: Callable[[], Awaitable[None]]
              ) -> asyncio.Future[None]:
        look = self._looks.get(host)
        if look is None or look.done():
            look = self._looks[host] = asyncio.ensure_future(step())
            look.add_done_callback(_report_failure)
        return look

    async def refresh(self, engine: Engine, tripped: bool) -> None:
        age_s = engine.clock.now() - engine.last_reconcile_s
        if engine.upstream_ok and not tripped and \
                age_s < engine.config.upstream.readiness_max_age_s:
            return
        # shield: a probe that hangs up ends no one else's look
        await asyncio.shield(self._look(None, engine.reconcile))

    async def refresh_fleet(self, fleet: Fleet) -> None:
        now = fleet.clock.now()
        awaited: list[asyncio.Future[None]] = []
        deadline_s = 0.0
        none_up = not any(h.up for h in fleet.hosts)
        for h in fleet.hosts:
            upstream = h.core.config.upstream
            if h.up and now - h.core.last_reconcile_s < upstream.readiness_max_age_s:
                continue
            look = self._look(h.name, lambda h=h: run_for(h.name, h.core.reconcile))
            if h.up or none_up:
                awaited.append(look)
                deadline_s = max(deadline_s, upstream.probe_timeout_s)
        if awaited:   # asyncio.wait cancels none of them when this probe hangs up
            await asyncio.wait(awaited, timeout=deadline_s)


def _report_failure(look: asyncio.Future[None]) -> None:
    if not look.cancelled() and look.exception() is not None:
        log.error("a readiness look failed", exc_info=look.exception())


READINESS = web.AppKey("readiness", Readiness)


async def readyz(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    fleet = fleet_of(engine)
    if fleet is not None:
        return await fleet_readyz(request, fleet)
    breaker = getattr(request.app[UPSTREAM], "breaker", None)
    await request.app[READINESS].refresh(engine, breaker is not None and breaker.open)
    tripped = breaker is not None and breaker.open
    level = engine.api_level
    ready = engine.upstream_ok and not tripped
    body = {"ready": ready,
            "upstream": redact_url(engine.config.upstream.url),
            "api_level": None if level is None else level.value,
            "manages_loading": engine.manages_loading,
            "error": engine.upstream_error,
            "circuit": None if breaker is None else breaker.state}
    # A server of another kind than configured: what to set says more than what it lacks.
    hint = getattr(request.app[UPSTREAM], "kind_hint", None)
    if hint:
        body["note"] = hint
    elif engine.upstream_ok and not engine.manages_loading:
        body["note"] = no_loading_note(engine.config.upstream.kind)
    return json_response(_with_state(request, body), 200 if ready else 503)


def no_loading_note(kind: str) -> str:
    lacks, instead = no_loading(kind)
    return f"{lacks}: {instead} and memory is not managed"


def _with_state(request: web.Request, body: dict) -> dict:
    """Among replicas: the shared state's reachability. Without it the proxy still serves what
    is resident, but loads and evictions wait: ready, and degraded."""
    replica = request.app[REPLICA]
    if replica is not None:
        body["state"] = {"ok": replica.ok, "replica": replica.id, "leader": replica.leader,
                         "error": replica.error}
        body["degraded"] = not replica.ok
    return body


async def fleet_readyz(request: web.Request, fleet: Fleet) -> web.Response:
    """Ready while any host takes requests: the placer sends each request to one that does."""
    await request.app[READINESS].refresh_fleet(fleet)
    hosts = {}
    for h in fleet.hosts:
        level = h.core.api_level
        hosts[h.name] = {**host_state(h), "api_level": None if level is None else level.value,
                         "manages_loading": h.core.manages_loading}
        hint = getattr(h.backend, "kind_hint", None)
        if hint:
            hosts[h.name]["note"] = hint
    ready = any(state["up"] for state in hosts.values())
    body = {"ready": ready, "hosts_up": sum(state["up"] for state in hosts.values()),
            "hosts": hosts, "error": None if ready else fleet.upstream_error}
    return json_response(_with_state(request, body), 200 if ready else 503)


async def health_report(request: web.Request) -> web.Response:
    """The ModelHealthMonitor's report, evaluated now (alerts open and clear as it runs)."""
    report = await request.app[HEALTH].check()
    return json_response(scope.view(request, report))


async def metrics(request: web.Request) -> web.Response:
    body = scope.metrics(request, request.app[METRICS].exposition())
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app[READINESS] = Readiness()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/proxy/health", health_report)
    app.router.add_get("/metrics", metrics)
