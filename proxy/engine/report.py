"""The one per-model view: built here, read by `/proxy/stats`, `/proxy/models`, the health
report, `python -m proxy status` and the metrics, so names and rounding never drift apart."""
from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ..config import redact_url
from .lifecycle import ModelStatus
from .memory import GB

if TYPE_CHECKING:
    from .core import EngineCore

S = ModelStatus


def model_row(core: "EngineCore", key: str, now_s: float) -> dict[str, Any]:
    e = core.registry.entries[key]
    r = core.registry
    cfg = r.config.model(key)
    ttl_s = r.ttl_s(key)
    return {
        "model": key, "state": e.status.value, "type": e.type,
        "owner": e.owner if e.status in (S.LOADED, S.UNLOADING) else None,
        "instances": list(e.instance_ids),
        "footprint_mb": round(r.footprint_bytes(e) / 1e6),
        "footprint_source": r.footprint_source(e),
        "priority": r.priority(key), "pinned": r.pinned(key),
        "ttl_s": ttl_s if ttl_s > 0 else None, "aliases": list(cfg.aliases),
        "in_flight": e.leases, "holds": e.holds, "waiting": e.waiting,
        "loads": e.load_count,
        "avg_load_time_s": None if e.load_time_s is None else round(e.load_time_s, 3),
        "evictions": dict(e.evictions), "last_error": e.last_error,
        "last_used_s_ago": None if e.last_used_at_s is None else
        round(now_s - e.last_used_at_s, 1),
        **core.accounting.usage_of(key).summary(now_s)}


def memory_stats(core: "EngineCore") -> dict[str, Any]:
    """The original design's get_memory_stats() shape, plus per-model rows."""
    now = core.clock.now()
    s = core.monitor.last_sample
    counts = {st.value: 0 for st in ModelStatus}
    for e in core.registry:
        counts[e.status.value] += 1
    usage = core.accounting.usage_of
    top = sorted((k for k in core.registry.keys() if usage(k).requests),
                 key=lambda k: (-usage(k).rate_per_h(now), -usage(k).requests))[:5]
    return {
        "system_memory": None if s is None else {
            "total_gb": round(s.total_bytes / GB, 2),
            "available_gb": round(s.available_bytes / GB, 2),
            "used_percent": round(s.used_percent, 1)},
        "gpu_memory": [{"index": g.index, "name": g.name,
                        "total_gb": round(g.total_bytes / GB, 2),
                        "used_gb": round(g.used_bytes / GB, 2)}
                       for g in s.gpus] if s is not None and s.gpus else None,
        "memory_pressure": core.memory_pressure.value,
        "sampler": core.config.memory.sampler,
        "policy": core.config.eviction.policy,
        "upstream": upstream_state(core),
        "model_counts": counts,
        "loaded_models": core.registry.loaded(),
        "queue_length": core.queue_length,
        "persistence": None if core.store is None else {
            "ok": core.store.ok, "path": str(core.store.path), "error": core.store.error},
        "preload": core.preloader.summary(),
        "top_models_by_usage": [
            {"model": k, "frequency": usage(k).rate_per_h(now), "requests": usage(k).requests,
             "success_rate": round(usage(k).success_rate, 4),
             "avg_latency_ms": None if usage(k).latency.mean is None
             else round(usage(k).latency.mean * 1000, 2)} for k in top],
        "models": {k: model_row(core, k, now) for k in core.registry.keys()},
    }


def upstream_state(core: "EngineCore") -> dict[str, Any]:
    rec = core.reconciler
    return {"ok": rec.upstream_ok, "url": redact_url(core.config.upstream.url),
            "api_level": None if rec.api_level is None else rec.api_level.value,
            "manages_loading": core.manages_loading, "error": rec.upstream_error,
            "capabilities": None if rec.capabilities is None else asdict(rec.capabilities)}
