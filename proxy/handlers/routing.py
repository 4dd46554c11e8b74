"""`auto` and `auto:<task>` as a model name, and the task a request is tagged with.

A request names its task with the header `X-Task-Type` or `metadata.task_type` (and, for
routing, `X-Task-Complexity` / `X-Task-Urgency` or `metadata.complexity` / `.urgency`, 0–1).
Tagged requests teach the engine which models serve which task; `auto:<task>` asks it to pick
(urgency favours a loaded model, complexity a larger one, free memory decides what is possible)
among the models the client's key may use, and the response says which in `X-Proxy-Model`.
`auto` picks only models the endpoint can use: embedding models on `/v1/embeddings`, LLMs
elsewhere; a task only the other kind does (`auto:embedding` on chat) is a 400.
"""
from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from ..server.auth import CLIENT_KEY, allowed_models, check_model, not_allowed
from ..engine.face import Engine
from ..engine.recommend import task_model_type
from ..errors import InvalidRequest, ModelNotFound, ModelTooLarge
from ..server.keys import ENGINE, ROUTED_TO, TASK

AUTO = "auto"
_TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,47}$")
_UNSAFE = re.compile(r"[^a-z0-9_.-]+")
EMBEDDING_PATHS = frozenset({"/v1/embeddings"})


def is_auto(name: str) -> bool:
    return name == AUTO or name.startswith(AUTO + ":")


async def route(request: web.Request, payload: dict[str, Any], name: str) -> str:
    """The model key that serves `name`: `auto:<task>`'s pick or the name resolved, each one
    the client's key may use. The request is tagged with its task, and with the pick."""
    engine = request.app[ENGINE]
    task = task_of(request, payload, name)
    if is_auto(name):
        key = choose(engine, request, payload, task)
        check_model(request, key)          # chosen among the key's models: a safeguard only
        request[ROUTED_TO] = key
    else:
        check_model(request, name)
        key = await engine.resolve(name)
    request[TASK] = task
    return key


def task_of(request: web.Request, payload: dict[str, Any], name: str) -> str | None:
    """The request's task, from `auto:<task>`, the header or metadata; None if untagged."""
    raw = name[len(AUTO) + 1:] if name.startswith(AUTO + ":") else None
    if raw is None:
        raw = request.headers.get("X-Task-Type")
    if raw is None:
        meta = payload.get("metadata")
        if isinstance(meta, dict) and isinstance(meta.get("task_type"), str):
            raw = meta["task_type"]
    if raw is None:
        return None
    task = raw.strip().lower()
    if is_auto(name):
        if not _TASK_NAME.match(task):
            raise InvalidRequest("A task name is 1-48 characters of a-z, 0-9, '_', '.', '-'.",
                                 param="model")
        return task
    # A tag is any string the client likes (OpenAI's metadata is free text): keep a bounded,
    # printable form of it, or nothing.
    task = _UNSAFE.sub("-", task)[:48].strip("-")
    return task or None


def _unit(request: web.Request, payload: dict[str, Any], name: str) -> float | None:
    value: Any = request.headers.get(f"X-Task-{name.capitalize()}")
    if value is None:
        meta = payload.get("metadata")
        value = meta.get(name) if isinstance(meta, dict) else None
    if value is None:
        return None
    try:
        return min(1.0, max(0.0, float(value)))
    except (TypeError, ValueError):
        raise InvalidRequest(f"The task's {name} must be a number 0..1.", param=name) from None


def model_type_of(path: str) -> str:
    """The kind of model an endpoint serves."""
    return "embedding" if path in EMBEDDING_PATHS else "llm"


def choose(engine: Engine, request: web.Request, payload: dict[str, Any],
           task: str | None) -> str:
    kind = model_type_of(request.path)
    context: dict[str, Any] = {"task_type": task or ("embedding" if kind == "embedding"
                                                     else "chat"), "model_type": kind}
    types = {k: e.type for k in engine.known_models() if (e := engine.entry(k)) is not None}
    needs = task_model_type(context["task_type"], engine.config.task_models, types)
    if needs is not None and needs != kind:
        raise InvalidRequest(
            f"The task '{context['task_type']}' is served by {_kind_words(needs)}, which "
            f"{request.path} cannot use; ask {_endpoint_of(needs)} instead, or name another "
            f"task.", param="model")
    for name in ("complexity", "urgency"):
        value = _unit(request, payload, name)
        if value is not None:
            context[name] = value
    allowed = allowed_models(request)
    if allowed is not None:     # a limited key gets the best of its own models, not a 403
        context["models"] = allowed
    result = engine.recommend(context)
    if result["recommended_models"]:
        return result["recommended_models"][0]
    if result["not_loadable"]:
        why = "; ".join(f"'{k}' {reason}" for k, reason in result["not_loadable"].items())
        raise ModelTooLarge(f"No {_kind_words(kind, plural=False)} for the task "
                            f"'{context['task_type']}' can be loaded here: {why}.")
    if allowed is not None:
        raise not_allowed(request, f"This API key ('{request[CLIENT_KEY].name}') may use no "
                                   f"{_kind_words(kind, plural=False)} for the task "
                                   f"'{context['task_type']}'.")
    raise ModelNotFound(f"No {_kind_words(kind, plural=False)} is known for the task "
                        f"'{context['task_type']}'.", param="model")


def _kind_words(kind: str, plural: bool = True) -> str:
    return ("embedding model" if kind == "embedding" else "LLM") + ("s" if plural else "")


def _endpoint_of(kind: str) -> str:
    return "/v1/embeddings" if kind == "embedding" else "/v1/chat/completions"
