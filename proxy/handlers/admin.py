"""The operator's surface under /proxy/: models, load/unload, optimize, clear, stats."""
from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ..engine.lifecycle import ModelStatus
from ..errors import ConfigRejected, InvalidRequest
from ..intake import check_model_name
from ..keys import AUTH, CONFIG, ENGINE
from ..reload import RELOADER
from .openai import read_body


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def _json_object(request: web.Request) -> dict[str, Any]:
    body = await read_body(request)
    if not body:
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return data


def _model_field(request: web.Request, data: dict[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string.", param="model")
    check_model_name(model, request.app[CONFIG].server)
    return model


async def models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    stats = engine.get_memory_stats()["models"]
    rows = []
    for key in engine.known_models():
        e = engine.entry(key)
        assert e is not None
        cfg = engine.config.model(key)
        s = stats[key]
        rows.append({
            "model": key, "state": e.status.value, "type": e.type,
            "owner": ("proxy" if e.owned else "external") if e.status is ModelStatus.LOADED
            else None,
            "instances": list(e.instance_ids), "footprint_mb": s["estimated_memory_mb"],
            "footprint_learned": s["footprint_learned"], "priority": engine.priority(key),
            "pinned": cfg.pinned, "ttl_s": cfg.ttl_s, "aliases": list(cfg.aliases),
            "leases": e.leases, "waiting": e.waiting, "requests": s["requests"],
            "last_used_s_ago":
            s["last_used_s_ago"], "loads": e.load_count, "last_error": e.last_error})
    return json_response({"object": "list", "data": rows, "queue_length": engine.queue_length,
                          "memory_pressure": engine.memory_pressure.value})


async def load(request: web.Request) -> web.Response:
    data = await _json_object(request)
    model = _model_field(request, data)
    priority = data.get("priority")
    if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)
                                 or not 1 <= priority <= 10):
        raise InvalidRequest("'priority' must be an integer 1..10.", param="priority")
    engine = request.app[ENGINE]
    key = await engine.resolve(model)
    await engine.load_model(key, priority)
    return json_response({"model": key, "state": engine.model_status[key].value})


async def unload(request: web.Request) -> web.Response:
    data = await _json_object(request)
    engine = request.app[ENGINE]
    key = await engine.resolve(_model_field(request, data))
    unloaded = await engine.unload_model(key)
    return json_response({"model": key, "unloaded": unloaded,
                          "state": engine.model_status[key].value})


async def optimize(request: web.Request) -> web.Response:
    return json_response(await request.app[ENGINE].optimize_memory_usage())


async def clear(request: web.Request) -> web.Response:
    return json_response({"unloaded": await request.app[ENGINE].clear_all_models()})


async def stats(request: web.Request) -> web.Response:
    return json_response({**request.app[ENGINE].get_memory_stats(),
                          "auth": request.app[AUTH].counters.snapshot()})


async def recommendations(request: web.Request) -> web.Response:
    task = request.query.get("task_type", "chat")
    return json_response({"task_type": task,
                          "recommendations": request.app[ENGINE].get_model_recommendations(
                              {"task_type": task})})


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
    r.add_post("/proxy/optimize", optimize)
    r.add_post("/proxy/clear", clear)
    r.add_post("/proxy/reload", reload)
    r.add_get("/proxy/stats", stats)
    r.add_get("/proxy/recommendations", recommendations)
