"""The engine's views: the one per-model view, read by `/proxy/stats`, `/proxy/models`, the
health report, `python -m proxy status` and the metrics, so names and rounding never drift
apart; and the facts behind recommendations and `auto:<task>`, gathered from the engine for
the pure ranking in engine.recommend."""
from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Mapping

from ..urls import redact_url
from .lifecycle import ModelStatus
from .memory import GB
from .policy import PREDICTION_HORIZON_S
from .recommend import Context, ModelFacts, recommend

if TYPE_CHECKING:
    from .core import EngineCore
    from .face import Engine
    from .learning import ModelPattern
    from .usage import ModelUsage

S = ModelStatus


def model_row(core: "EngineCore", key: str, now_s: float) -> dict[str, Any]:
    e = core.registry.entries[key]
    r = core.registry
    cfg = r.config.model(key)
    ttl_s = r.ttl_s(key)
    usage = core.accounting.usage_of(key)
    # Its last request, kept across restarts, here or (among replicas) on any replica: heard,
    # or adopted with the fleet's pattern; e's recency (a load counts, and a restart's
    # adoption is one) only for a model no request was recorded for.
    pattern = core.learner.patterns.get(key)
    asked = [t for t in (usage.last_used_at_s, pattern and pattern.last_at_s) if t is not None]
    last_used_s = max(asked) if asked else e.last_used_at_s
    managed = core.memory_managed    # else no footprint: none is used, so none is made up
    return {
        "model": key, "state": core.state_of(e), "type": e.type,
        "owner": e.owner if e.status in (S.LOADED, S.UNLOADING) else None,
        "instances": list(e.instance_ids),
        "context_length": e.context_length,
        "footprint_mb": round(r.footprint_bytes(e) / 1e6) if managed else None,
        "footprint_source": r.footprint_source(e) if managed else None,
        "backend": {**e.extra, **e.resident_extra} if e.status is S.LOADED else dict(e.extra),
        "priority": r.priority(key), "pinned": r.pinned(key),
        "ttl_s": ttl_s if ttl_s > 0 else None, "aliases": list(cfg.aliases),
        "groups": core.groups.row(key),
        "in_flight": e.leases, "holds": e.holds, "waiting": e.waiting,
        "loads": e.load_count,
        "avg_load_time_s": None if e.load_time_s is None else round(e.load_time_s, 3),
        "evictions": dict(e.evictions), "last_error": e.last_error,
        "last_used_s_ago": None if last_used_s is None else round(now_s - last_used_s, 1),
        "timer": timer_row(pattern, now_s),
        "clock": clock_row(pattern, now_s, core.clock.wall()),
        **usage.summary(now_s)}


def timer_row(pattern: "ModelPattern | None", now_s: float) -> dict[str, Any] | None:
    """What the engine believes of a timer-driven caller of the model (None: no period):
    the preloader loads it its reload seconds before the next window opens."""
    period = None if pattern is None else pattern.period(now_s)
    if period is None:
        return None
    opens_s, _ = period.next_window(now_s, pattern.starts[-1])   # type: ignore[union-attr]
    return {"period_s": round(period.period_s, 1),
            "window_s": round(period.late_s - period.early_s, 1),
            "next_window_in_s": round(max(0.0, opens_s - now_s), 1),
            "confidence": round(period.confidence, 2)}


def clock_row(pattern: "ModelPattern | None", now_s: float, wall_s: float
              ) -> dict[str, Any] | None:
    """The minute of the hour a job run by the clock usually asks for the model in, where it
    has no period (None: none stands out): the preloader loads it before that minute when
    its chance per hour is at least preload.min_probability."""
    if pattern is None or pattern.period(now_s) is not None:
        return None
    clock = pattern.clock(wall_s)
    if clock is None:
        return None
    return {"minute": clock.minute, "chance_per_hour": round(clock.chance, 2),
            "next_in_s": round(max(0.0, clock.opens_in_s(wall_s)), 1)}


def top_by_usage(usage: Mapping[str, "ModelUsage"], now_s: float, n: int = 5
                 ) -> list[dict[str, Any]]:
    """The n models most asked for in the last hour (then by all their requests)."""
    top = sorted((k for k, u in usage.items() if u.requests),
                 key=lambda k: (-usage[k].rate_per_h(now_s), -usage[k].requests))[:n]
    return [{"model": k, "frequency": usage[k].rate_per_h(now_s),
             "requests": usage[k].requests, "success_rate": round(usage[k].success_rate, 4),
             "avg_latency_ms": None if usage[k].latency.mean is None
             else round(usage[k].latency.mean * 1000, 2)} for k in top]


def memory_stats(core: "EngineCore") -> dict[str, Any]:
    """The original design's get_memory_stats() shape, plus per-model rows."""
    now = core.clock.now()
    s = core.last_sample          # none where memory is not managed
    counts = {st.value: 0 for st in ModelStatus}
    for e in core.registry:
        state = core.state_of(e)
        counts[state] = counts.get(state, 0) + 1
    return {
        "system_memory": None if s is None else {
            "total_gb": round(s.total_bytes / GB, 2),
            "available_gb": round(s.available_bytes / GB, 2),
            "used_percent": round(s.used_percent, 1)},
        "gpu_memory": [{"index": g.index, "name": g.name,
                        "total_gb": round(g.total_bytes / GB, 2),
                        "used_gb": round(g.used_bytes / GB, 2)}
                       for g in s.gpus] if s is not None and s.gpus else None,
        "memory_managed": core.memory_managed,
        "memory_pressure": pressure_shown(core),
        "sampler": core.config.memory.sampler,
        "policy": core.config.eviction.policy,
        "upstream": upstream_state(core),
        "model_counts": counts,
        "loaded_models": core.registry.loaded(),
        "queue_length": core.queue_length,
        "persistence": persistence(core),
        "preload": core.preloader.summary(),
        "top_models_by_usage": top_by_usage(
            {k: core.accounting.usage_of(k) for k in core.registry.keys()}, now),
        "models": {k: model_row(core, k, now) for k in core.registry.keys()},
    }


def pressure_shown(engine: "Engine") -> str | None:
    """The memory pressure the views show: none where memory is not managed (no eviction acts
    on it, so no alert is raised for it either)."""
    return engine.memory_pressure.value if engine.memory_managed else None


def persistence(core: "EngineCore") -> dict[str, Any] | None:
    """The history file: whether it is written, and what was found damaged (store.py)."""
    store = core.store
    return None if store is None else {
        "ok": store.ok, "path": str(store.path), "error": store.error,
        "damage": store.damage, "skipped": store.skipped}


def upstream_state(engine: "Engine") -> dict[str, Any]:
    level = engine.api_level
    return {"ok": engine.upstream_ok, "url": redact_url(engine.config.upstream.url),
            "api_level": None if level is None else level.value,
            "manages_loading": engine.manages_loading, "error": engine.upstream_error,
            "capabilities": None if engine.capabilities is None else asdict(engine.capabilities)}


def recommendations(core: "EngineCore", context: Mapping[str, Any] | str | None
                    ) -> dict[str, Any]:
    """{"recommended_models", "models_to_preload", "models_to_unload", "not_loadable",
    "reasoning"} for a context with `task_type`, `complexity` and `urgency` (0–1),
    `available_memory_gb`, `model_type` (llm | embedding)."""
    task = Context.of(context).task
    now = core.clock.now()
    r = core.registry
    manage_external = core.config.eviction.manage_external
    facts = []
    for e in r:
        u = core.accounting.usage_of(e.key)
        t = u.tasks.get(task)
        facts.append(ModelFacts(
            key=e.key, type=e.type, loaded=e.status is S.LOADED,
            idle=e.status is S.LOADED and not e.busy and not r.pinned(e.key) and
            (e.owned or manage_external),                 # what could be unloaded
            footprint_bytes=r.footprint_bytes(e), reload_s=r.reload_s(e),
            priority=r.priority(e.key), success_rate=u.success_rate,
            requests=u.requests, task_requests=int(t[0]) if t else 0,
            task_success_rate=1.0 - t[1] / t[0] if t and t[0] else 1.0,
            task_latency_s=t[2] / t[0] if t and t[0] else None,
            p_reuse=core.learner.predict(e.key, now, PREDICTION_HORIZON_S).p_within,
            load_error=(e.last_error or "no reason given")
            if e.status is S.ERROR and now < e.retry_at_s else None))
    return recommend(facts, context, headroom_bytes=core.headroom_bytes(),
                     tasks=core.config.task_models, ceiling_bytes=core.ceiling_bytes())
