"""Liveness and readiness for orchestrators: /healthz (alive), /readyz (upstream usable)."""
from __future__ import annotations

from aiohttp import web

from ..keys import ENGINE
from .admin import json_response


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    if not engine.upstream_ok:
        await engine.reconcile()   # not ready yet: look again instead of trusting a stale no
    level = engine.api_level
    body = {"ready": engine.upstream_ok,
            "upstream": engine.config.upstream.url,
            "api_level": None if level is None else level.value,
            "manages_loading": engine.manages_loading,
            "error": engine.upstream_error}
    if engine.upstream_ok and not engine.manages_loading:
        body["note"] = ("the upstream has no load/unload API (LM Studio older than 0.4.0): "
                        "loading is left to its own JIT and memory is not managed")
    return json_response(body, 200 if engine.upstream_ok else 503)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
