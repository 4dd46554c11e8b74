"""Recommendations for a task and the choice behind `auto:<task>`: a pure ranking.

Context keys (the original design's): `task_type`, `complexity` 0–1 (favours larger models),
`urgency` 0–1 (favours what is loaded now), `available_memory_gb` (what may be loaded without
evicting; default: the engine's headroom), `model_type` (`llm` or `embedding`: what the
endpoint can use; default: embedding models for the task `embedding`, else LLMs), `models` (the
model keys that may be chosen at all, e.g. a client key's; default: every one). A value of the
wrong kind is an InvalidRequest naming its key (numbers may come as a query's strings).
Candidates for a task come from the `tasks:` config (in its order) and from what was learned:
requests tagged with a task teach which models served it, how reliably and how fast. A model
that cannot be loaded (larger than the one-model ceiling, or failing to load and still in its
back-off) is never recommended; `not_loadable` says why each was left out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import InvalidRequest
from ..inputs import number

GB = 1_000_000_000
# Words in a model key that hint at what it is good at; weak evidence, used last.
TASK_HINTS: dict[str, tuple[str, ...]] = {
    "embedding": ("embed", "bge", "e5", "gte", "minilm", "nomic"),
    "coding": ("coder", "code", "devstral", "starcoder", "qwen3", "deepseek"),
    "reasoning": ("r1", "reason", "think", "qwq", "gpt-oss", "magistral", "phi-4"),
    "vision": ("vl", "vision", "llava", "gemma-3", "pixtral"),
    "chat": ("instruct", "chat", "gemma", "llama", "qwen", "mistral", "gpt-oss"),
}
TASK_ALIASES = {"code": "coding", "embed": "embedding", "embeddings": "embedding"}
MODEL_TYPES = ("llm", "embedding")
# Tasks only one kind of model can do: asked of the other kind's endpoint, they are a mistake.
TASK_MODEL_TYPE = {"embedding": "embedding", "chat": "llm", "coding": "llm", "reasoning": "llm",
                   "vision": "llm"}
LEARNED_FULL_AT = 10        # tagged requests after which learned success counts fully


@dataclass(frozen=True)
class ModelFacts:
    key: str
    type: str
    loaded: bool
    idle: bool                      # loaded and serving nothing
    footprint_bytes: float
    reload_s: float
    priority: int
    success_rate: float             # over all its requests
    requests: int
    task_requests: int = 0          # requests tagged with the asked task
    task_success_rate: float = 1.0
    task_latency_s: float | None = None
    p_reuse: float = 0.0            # learned chance of use soon (for what to unload)
    load_error: str | None = None   # failed to load and still in its back-off


@dataclass(frozen=True)
class Context:
    task: str
    complexity: float
    urgency: float
    available_bytes: float | None
    model_type: str
    models: frozenset[str] | None = None    # the only keys that may be chosen; None: any

    @classmethod
    def of(cls, context: Mapping[str, Any] | str | None) -> "Context":
        """The context of the HTTP API (query strings), of `auto:` routing and of the library,
        checked alike: a wrong value is an InvalidRequest naming its key, never ignored."""
        if isinstance(context, str):
            context = {"task_type": context}
        elif context is None:
            context = {}
        elif not isinstance(context, Mapping):
            raise InvalidRequest(
                "The context is a task's name or a mapping of task_type, complexity, urgency, "
                f"available_memory_gb, model_type (got {type(context).__name__}).",
                param="context")
        task = context.get("task_type") or context.get("task") or "chat"
        if not isinstance(task, str):
            raise InvalidRequest("'task_type' must be a task's name.", param="task_type")
        task = TASK_ALIASES.get(task.lower(), task.lower())
        mem = context.get("available_memory_gb")
        kind = context.get("model_type")
        if kind is None:
            kind = "embedding" if task == "embedding" else "llm"
        elif kind not in MODEL_TYPES:
            raise InvalidRequest(f"'model_type' must be one of {', '.join(MODEL_TYPES)}.",
                                 param="model_type")
        only = context.get("models")
        available = None if mem is None else \
            number("available_memory_gb", mem, minimum=0, text=True) * GB
        return cls(task, _unit(context, "complexity"), _unit(context, "urgency"), available,
                   kind, None if only is None or isinstance(only, str) else frozenset(only))


def task_model_type(task: str, tasks: Mapping[str, tuple[str, ...]],
                    types: Mapping[str, str]) -> str | None:
    """The one kind of model a task is for, if it is known to be one: built in for the common
    tasks, else from the models the config names for it (when they are all of one kind)."""
    task = TASK_ALIASES.get(task, task)
    if task in TASK_MODEL_TYPE:
        return TASK_MODEL_TYPE[task]
    kinds = {"embedding" if types.get(k) == "embedding" else "llm"
             for k in tasks.get(task, ()) if k in types}
    return kinds.pop() if len(kinds) == 1 else None


def _unit(context: Mapping[str, Any], name: str, default: float = 0.5) -> float:
    """A 0–1 weight; a number outside is clamped to it."""
    value = context.get(name)
    return default if value is None else min(1.0, max(0.0, number(name, value, text=True)))


def not_loadable(f: ModelFacts, ceiling_bytes: float) -> str | None:
    """Why a model cannot be loaded now whatever is evicted, or None."""
    if f.loaded:
        return None
    if f.footprint_bytes > ceiling_bytes:
        return (f"needs {f.footprint_bytes / GB:.1f} GB, more than the "
                f"{ceiling_bytes / GB:.1f} GB any one model may take")
    if f.load_error is not None:
        return f"failed to load ({f.load_error}); retried later"
    return None


def recommend(facts: list[ModelFacts], context: Mapping[str, Any] | str | None, *,
              headroom_bytes: float, tasks: Mapping[str, tuple[str, ...]],
              ceiling_bytes: float = float("inf"), limit: int = 5) -> dict[str, Any]:
    ctx = Context.of(context)
    free = ctx.available_bytes if ctx.available_bytes is not None else headroom_bytes
    configured = list(tasks.get(ctx.task, ()))
    want_embedding = ctx.model_type == "embedding"
    pool, left_out = [], {}
    for f in facts:
        if (f.type == "embedding") != want_embedding or \
                ctx.models is not None and f.key not in ctx.models:
            continue
        why_not = not_loadable(f, ceiling_bytes)
        if why_not is None:
            pool.append(f)
        else:
            left_out[f.key] = why_not
    biggest = max((f.footprint_bytes for f in pool), default=1.0) or 1.0
    scored: list[tuple[float, ModelFacts, list[str]]] = []
    for f in pool:
        score, why = 0.0, []
        if f.key in configured:
            score += 5.0 - 0.5 * configured.index(f.key)
            why.append(f"configured for {ctx.task}")
        if f.task_requests:
            weight = min(1.0, f.task_requests / LEARNED_FULL_AT)
            score += 3.0 * weight * f.task_success_rate
            why.append(f"{f.task_success_rate:.0%} success on {f.task_requests} {ctx.task} "
                       "requests")
            if f.task_latency_s is not None:
                score += 0.5 * weight / (1.0 + f.task_latency_s)
        if not configured and not f.task_requests and \
                any(h in f.key.lower() for h in TASK_HINTS.get(ctx.task, ())):
            score += 1.0
            why.append(f"its name suggests {ctx.task}")
        size = f.footprint_bytes / biggest
        score += 1.5 * (ctx.complexity * size + (1.0 - ctx.complexity) * (1.0 - size))
        if f.loaded:
            score += 3.0 * ctx.urgency
            why.append("already loaded")
        elif f.footprint_bytes <= free:
            score -= ctx.urgency * min(2.0, f.reload_s / 10.0)
            why.append(f"fits in free memory (loads in ~{f.reload_s:.0f}s)")
        else:
            score -= 1.0 + ctx.urgency * min(2.0, f.reload_s / 10.0)
            why.append("needs other models evicted first")
        if f.requests:
            score += f.success_rate - 1.0
        score += (f.priority - 5) / 20.0
        scored.append((score, f, why))
    scored.sort(key=lambda t: (-t[0], t[1].key))
    top = scored[:limit]
    recommended = [f.key for _, f, _ in top]
    room = free
    to_preload = []
    for _, f, _ in top[:2]:
        if not f.loaded and f.footprint_bytes <= room:
            to_preload.append(f.key)
            room -= f.footprint_bytes
    to_unload = [f.key for f in sorted((f for f in facts if f.idle and f.key not in recommended),
                                       key=lambda f: (f.p_reuse * f.reload_s, f.key))
                 if f.p_reuse < 0.5][:3]
    return {"task_type": ctx.task, "model_type": ctx.model_type, "complexity": ctx.complexity, "urgency": ctx.urgency,
            "recommended_models": recommended, "models_to_preload": to_preload,
            "models_to_unload": to_unload, "not_loadable": left_out,
            "reasoning": {f.key: {"score": round(s, 3), "why": why} for s, f, why in top}}
