"""The operator's surface under /proxy/: models, load/unload, optimize, clear, stats."""
from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ..engine.face import Engine
from .. import inputs
from ..engine.report import pressure_shown
from ..errors import ConfigRejected, InvalidRequest, UnsupportedMediaType, clip
from ..server import scope
from ..server.auth import CLIENT_KEY, allowed_models
from ..server.intake import check_model_name
from ..server.keys import AUTH, COMPAT, CONFIG, ENGINE, EVENTS, REPLICA
from ..server.reload import RELOADER
from .openai import read_body


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def _json_object(request: web.Request) -> dict[str, Any]:
    body = await read_body(request)
    if not body:
        return {}
    # A JSON type cannot come from another site without a CORS preflight, which the proxy
    # never grants; text/plain, form bodies and untyped ones (a Blob; aiohttp reads that as
    # application/octet-stream) can (security.md).
    kind = request.content_type
    if kind != "application/json" and not (kind.startswith("application/") and
                                           kind.endswith("+json")):
        sent = request.headers.get("Content-Type")
        raise UnsupportedMediaType(
            "Admin requests carry a JSON object: send 'Content-Type: application/json' "
            f"(got {repr(clip(sent, 60)) if sent else 'none'}).")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return data


def _state(engine: Engine, key: str) -> str | None:
    e = engine.entry(key)
    # The row's state: in a fleet, a model on a host that is down is not resident.
    return None if e is None else engine.row(e.key)["state"]


def _model_field(request: web.Request, data: dict[str, Any]) -> str:
    model = inputs.model_name(data.get("model"))
    check_model_name(model, request.app[CONFIG].current.server)
    return model


def _host_field(request: web.Request, data: dict[str, Any]) -> str | None:
    """One host of a fleet, from the body's `host` or the query's (None: the fleet decides,
    or every host); both, naming different hosts, is a 400 rather than a silent choice."""
    host = data.get("host", request.query.get("host"))
    if host is not None and (not isinstance(host, str) or not host):
        raise InvalidRequest("'host' must be a host's name.", param="host")
    queried = request.query.get("host")
    if "host" in data and queried is not None and queried != host:
        raise InvalidRequest(f"The query names host '{queried[:64]}' and the body host "
                             f"'{str(host)[:64]}': name one.", param="host")
    return host


def _where(engine: Engine, key: str, host: str | None) -> dict[str, Any]:
    """Where the model lives: the host acted on (else the row's) and its state on each."""
    row = engine.row(key)
    if "hosts" not in row:
        return {}
    return {"host": host or row["host"], "hosts": row["hosts"]}


def _state_on(engine: Engine, key: str, host: str | None) -> str | None:
    if host is not None:
        return engine.row(key).get("hosts", {}).get(host)
    return _state(engine, key)


async def models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    return json_response(scope.view(request, {
        "object": "list", "data": [engine.row(key) for key in engine.known_models()],
        "queue_length": engine.queue_length, "memory_pressure": pressure_shown(engine)}))


async def load(request: web.Request) -> web.Response:
    data = await _json_object(request)
    model = _model_field(request, data)
    priority = inputs.priority(data.get("priority"))
    engine = request.app[ENGINE]
    host = _host_field(request, data)
    key = await engine.resolve(model)
    await engine.load(key, priority, host=host)
    return json_response({"model": key, "state": _state_on(engine, key, host),
                          **_where(engine, key, host)})


async def unload(request: web.Request) -> web.Response:
    data = await _json_object(request)
    engine = request.app[ENGINE]
    host = _host_field(request, data)
    key = await engine.resolve(_model_field(request, data))
    report = await engine.unload_report(key, host=host)
    return json_response({"model": key, "unloaded": report.pop("unloaded"),
                          "state": _state_on(engine, key, host), **_where(engine, key, host),
                          **report})


async def pin(request: web.Request) -> web.Response:
    """A runtime pin (or unpin) that overrides the config until the proxy restarts."""
    data = await _json_object(request)
    pinned = inputs.flag("pinned", data.get("pinned", True))
    engine = request.app[ENGINE]
    host = _host_field(request, data)
    key = await engine.resolve(_model_field(request, data))
    engine.pin(key, pinned, host=host)
    request.app[EVENTS].publish("pin", {"model": key, "pinned": pinned})
    where = _where(engine, key, host)
    if where:                            # a fleet: which hosts it is pinned on, too
        where = {**where, "state": _state_on(engine, key, host),
                 "pinned_on": engine.pinned_on(key)}
    return json_response({"model": key, "pinned": engine.pinned(key, host=host), **where})


async def optimize(request: web.Request) -> web.Response:
    host = _host_field(request, await _json_object(request))
    return json_response(await request.app[ENGINE].optimize(host=host))


async def clear(request: web.Request) -> web.Response:
    host = _host_field(request, await _json_object(request))
    return json_response(await request.app[ENGINE].clear(host=host))


async def stats(request: web.Request) -> web.Response:
    out = {**request.app[ENGINE].report(), "compat": request.app[COMPAT].counts(),
           "auth": request.app[AUTH].counters.snapshot()}
    replica = request.app[REPLICA]
    if replica is not None:     # among replicas: who is there, who leads, what hosts hold
        out["replicas"] = await replica.view()
    return json_response(scope.stats(request, out))


async def recommendations(request: web.Request) -> web.Response:
    q = request.query
    # The numbers as sent: the engine reads and checks them (engine/recommend.py).
    context: dict[str, Any] = {name: q[name] for name in (
        "task_type", "complexity", "urgency", "available_memory_gb", "model_type") if name in q}
    allowed = allowed_models(request)
    if allowed is not None:     # a limited key: chosen among its own models, as auto: is
        context["models"] = allowed
    result = scope.view(request, request.app[ENGINE].recommend(context))
    if allowed is not None and not result["recommended_models"] and \
            not result["not_loadable"]:
        kind = "embedding model" if result["model_type"] == "embedding" else "LLM"
        result["note"] = (f"This API key ('{request[CLIENT_KEY].name}') may use no {kind} "
                          f"for the task '{result['task_type']}'.")
    return json_response(result)


async def reload(request: web.Request) -> web.Response:
    result = request.app[RELOADER].reload(request.app)
    if not result["reloaded"]:
        raise ConfigRejected("The new configuration was rejected; the running one stays: " +
                             "; ".join(result["problems"]))
    return json_response(result)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/proxy/models", models)
    r.add_post("/proxy/models/load", load)
    r.add_post("/proxy/models/unload", unload)
    r.add_post("/proxy/models/pin", pin)
    r.add_post("/proxy/optimize", optimize)
    r.add_post("/proxy/clear", clear)
    r.add_post("/proxy/reload", reload)
    r.add_get("/proxy/stats", stats)
    r.add_get("/proxy/recommendations", recommendations)
