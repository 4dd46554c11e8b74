"""`auto` and `auto:<task>` as a model name, and the task a request is tagged with.

A request names its task with the header `X-Task-Type` or `metadata.task_type` (and, for
routing, `X-Task-Complexity` / `X-Task-Urgency` or `metadata.complexity` / `.urgency`, 0–1).
Tagged requests teach the engine which models serve which task; `auto:<task>` asks it to pick
(urgency favours a loaded model, complexity a larger one, free memory decides what is possible)
and the response says which in `X-Proxy-Model`.
"""
from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from ..engine.manager import ModelMemoryManager
from ..errors import InvalidRequest, ModelNotFound

AUTO = "auto"
ROUTED_HEADER = "X-Proxy-Model"
_TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,47}$")
_UNSAFE = re.compile(r"[^a-z0-9_.-]+")


def is_auto(name: str) -> bool:
    return name == AUTO or name.startswith(AUTO + ":")


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


def choose(engine: ModelMemoryManager, request: web.Request, payload: dict[str, Any],
           task: str | None) -> str:
    context: dict[str, Any] = {"task_type": task or "chat"}
    for name in ("complexity", "urgency"):
        value = _unit(request, payload, name)
        if value is not None:
            context[name] = value
    picked = engine.get_model_recommendations(context)["recommended_models"]
    if not picked:
        raise ModelNotFound(f"No model is known for the task '{context['task_type']}'.",
                            param="model")
    return picked[0]
