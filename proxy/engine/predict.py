"""Model recommendations for a task: a pure ranking over what the engine knows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

# Words in a model key that suggest what it is good at.
TASK_HINTS: dict[str, tuple[str, ...]] = {
    "embedding": ("embed", "bge", "e5", "gte", "minilm", "nomic"),
    "code": ("coder", "code", "devstral", "starcoder", "qwen3", "deepseek"),
    "reasoning": ("r1", "reason", "think", "qwq", "gpt-oss", "magistral", "phi-4"),
    "vision": ("vl", "vision", "llava", "gemma-3", "pixtral"),
    "chat": ("instruct", "chat", "gemma", "llama", "qwen", "mistral", "gpt-oss"),
}


@dataclass(frozen=True)
class ModelFacts:
    key: str
    type: str
    loaded: bool
    footprint_bytes: float
    requests: int
    success_rate: float
    avg_latency_s: float | None
    rate_per_h: float
    priority: int


def task_of(context: Mapping[str, Any] | str | None) -> str:
    if isinstance(context, str):
        return context
    if isinstance(context, Mapping):
        return str(context.get("task_type") or context.get("task") or "chat")
    return "chat"


def recommend(facts: list[ModelFacts], context: Mapping[str, Any] | str | None,
              headroom_bytes: float, limit: int = 5) -> list[dict[str, Any]]:
    """Rank models for a task: fit for the task first, then readiness, reliability, speed."""
    task = task_of(context)
    want_embedding = task == "embedding"
    hints = TASK_HINTS.get(task, ())
    ranked = []
    for f in facts:
        if (f.type == "embedding") != want_embedding:
            continue
        reasons = []
        score = 0.0
        if any(h in f.key.lower() for h in hints):
            score += 3.0
            reasons.append(f"suited to {task}")
        if f.loaded:
            score += 2.0
            reasons.append("already loaded")
        elif f.footprint_bytes <= headroom_bytes:
            score += 1.0
            reasons.append("fits in free memory")
        if f.requests:
            score += 2.0 * f.success_rate
            reasons.append(f"{f.success_rate:.0%} success over {f.requests} requests")
            if f.avg_latency_s is not None:
                score += 1.0 / (1.0 + f.avg_latency_s)
        score += f.priority / 10.0
        ranked.append({"model": f.key, "score": round(score, 3), "loaded": f.loaded,
                       "estimated_memory_mb": round(f.footprint_bytes / 1e6),
                       "reasons": reasons})
    ranked.sort(key=lambda r: (-r["score"], r["model"]))
    return ranked[:limit]
