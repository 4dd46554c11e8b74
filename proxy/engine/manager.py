"""ModelMemoryManager: the original design's library API, a thin facade over EngineCore.

    async with ModelMemoryManager(max_memory_usage_percent=80, min_free_memory_gb=4) as m:
        await m.ensure_models_available(["qwen/qwen3-4b"], priority=8)
        m.record_model_usage("qwen/qwen3-4b", latency=0.8, success=True, tokens_used=120)

Without `upstream=` (or with a URL), it builds the configured adapter (`upstream.kind`) and
closes it itself.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any, Callable, Iterable, Mapping

from ..config import Config, load_config
from ..errors import InvalidRequest, ModelUnavailable, ProxyError
from ..store import UsageStore
from ..upstream import create_upstream
from ..upstream.base import ModelBackend
from .clock import Clock
from .core import EngineCore
from .lifecycle import ModelEntry, ModelStatus
from .memory import MemoryPressure, MemorySampler
from .policy import PREDICTION_HORIZON_S
from .recommend import Context, ModelFacts, recommend
from .report import memory_stats
from .usage import ModelUsage, RequestRecord

log = logging.getLogger("proxy.engine")


class ModelMetrics:
    """The original design's per-model view: success rate, latency, frequency, memory."""

    def __init__(self, usage: ModelUsage, entry: ModelEntry, footprint_bytes: float,
                 now_s: float) -> None:
        self.success_rate = usage.success_rate
        self.avg_latency = usage.latency.mean or 0.0
        self.usage_frequency = usage.rate_per_h(now_s)
        self.estimated_memory_mb = footprint_bytes / 1e6
        self.requests = usage.requests
        self.load_count = entry.load_count
        self.avg_load_time_s = entry.load_time_s


class ModelMemoryManager(EngineCore):
    def __init__(self, max_memory_usage_percent: float = 80.0, model_timeout_hours: float = 2.0,
                 min_free_memory_gb: float = 4.0, monitoring_interval: float = 30.0,
                 upstream: ModelBackend | str | None = None, *, config: Config | None = None,
                 sampler: MemorySampler | None = None, clock: Clock | None = None,
                 owns_upstream: bool | None = None, store: UsageStore | None = None
                 ) -> None:
        if config is None:
            config = load_config(overrides={
                "memory.max_memory_usage_percent": max_memory_usage_percent,
                "memory.min_free_memory_gb": min_free_memory_gb,
                "memory.monitoring_interval": monitoring_interval,
                "eviction.model_timeout_hours": model_timeout_hours,
                **({"upstream.url": upstream} if isinstance(upstream, str) else {})})
        if isinstance(upstream, str):     # a URL: the configured adapter, built and owned here
            upstream = None
        owns = owns_upstream if owns_upstream is not None else upstream is None
        super().__init__(config, upstream if upstream is not None else
                         create_upstream(config.upstream), sampler=sampler, clock=clock,
                         store=store, owns_upstream=owns)
        self.on_model_loaded: Callable[..., Any] | None = None
        self.on_model_unloaded: Callable[..., Any] | None = None
        self.on_memory_pressure: Callable[..., Any] | None = None
        self._hook_tasks: set[asyncio.Task] = set()
        self.add_listener(_Hooks(self))

    async def __aenter__(self) -> "ModelMemoryManager":
        await self.start()
        await self.start_monitoring()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cleanup()

    def _call_hook(self, hook: Callable[..., Any] | None, *args: Any) -> None:
        if hook is None:
            return
        try:
            result = hook(*args)
        except Exception:
            log.exception("hook %r failed", hook)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._hook_tasks.add(task)
            task.add_done_callback(self._hook_tasks.discard)

    # -- the original library API ------------------------------------------------------------
    @property
    def model_status(self) -> dict[str, ModelStatus]:
        return {e.key: e.status for e in self.registry}

    @property
    def model_metrics(self) -> dict[str, ModelMetrics]:
        now = self.clock.now()
        return {e.key: ModelMetrics(self.usage(e.key), e, self.footprint_bytes(e), now)
                for e in self.registry}

    def is_pinned(self, key: str) -> bool:
        return self.registry.pinned(key)

    def set_pinned(self, key: str, pinned: bool) -> None:
        """A runtime pin (POST /proxy/models/pin): kept until the proxy restarts."""
        self.registry.pin_override[key] = pinned

    def get_loaded_models(self) -> list[str]:
        return self.registry.loaded()

    async def load_model(self, name: str, priority: int | None = None) -> bool:
        key = await self.resolve(name)
        if priority is not None:
            if not 1 <= priority <= 10:
                raise InvalidRequest("priority must be 1..10", param="priority")
            self.registry.priority_override[key] = priority
        if not self.manages_loading:
            raise ModelUnavailable(f"the upstream ({self.api_level.value if self.api_level else 'unknown'}) "
                                   "cannot load models on request")
        lease = await self.acquire(key)
        lease.release()
        return True

    async def unload_model(self, name: str, *, reason: str = "manual",
                           drain_timeout_s: float | None = None) -> bool:
        return await self.unload(name, reason=reason, drain_timeout_s=drain_timeout_s)

    async def ensure_models_available(self, models: Iterable[str], priority: int | None = None
                                      ) -> dict[str, bool]:
        out: dict[str, bool] = {}
        for name in models:
            try:
                out[name] = await self.load_model(name, priority)
            except ProxyError as exc:
                log.warning("could not make %s available: %s", name, exc.message)
                out[name] = False
        return out

    async def clear_all_models(self) -> list[str]:
        """Unload every loaded model the proxy may unload (pins included: an explicit clear)."""
        cleared = []
        for key in self.get_loaded_models():
            e = self.registry.entries[key]
            if e.owned or self.config.eviction.manage_external:
                if await self.unload_model(key, reason="manual"):
                    cleared.append(key)
        return cleared

    async def optimize_memory_usage(self) -> dict[str, Any]:
        idle = await self.unload_idle_models()
        await self.sample_memory()
        pressure = await self.relieve_pressure()
        return {"unloaded_idle": idle, "evicted_for_pressure": pressure,
                "memory_pressure": self.memory_pressure.value}

    def record_model_usage(self, model: str, latency: float, success: bool = True,
                           tokens_used: int = 0) -> None:
        key = self.registry.aliases.get(model, model)
        self.record(RequestRecord(model=key, ok=success, latency_s=latency,
                                  at_s=self.clock.now(), completion_tokens=tokens_used))

    def get_model_recommendations(self, context: Mapping[str, Any] | str | None = None
                                  ) -> dict[str, Any]:
        """{"recommended_models", "models_to_preload", "models_to_unload", "not_loadable",
        "reasoning"} for a context with `task_type`, `complexity` and `urgency` (0–1),
        `available_memory_gb`, `model_type` (llm | embedding)."""
        task = Context.of(context).task
        now = self.clock.now()
        facts = []
        for e in self.registry:
            u = self.usage(e.key)
            t = u.tasks.get(task)
            facts.append(ModelFacts(
                key=e.key, type=e.type, loaded=e.status is ModelStatus.LOADED,
                idle=e.status is ModelStatus.LOADED and not e.busy and
                not self.registry.pinned(e.key) and
                (e.owned or self.config.eviction.manage_external),   # what could be unloaded
                footprint_bytes=self.footprint_bytes(e), reload_s=self.registry.reload_s(e),
                priority=self.priority(e.key), success_rate=u.success_rate,
                requests=u.requests, task_requests=int(t[0]) if t else 0,
                task_success_rate=1.0 - t[1] / t[0] if t and t[0] else 1.0,
                task_latency_s=t[2] / t[0] if t and t[0] else None,
                p_reuse=self.learner.predict(e.key, now, PREDICTION_HORIZON_S).p_within,
                load_error=(e.last_error or "no reason given")
                if e.status is ModelStatus.ERROR and now < e.retry_at_s else None))
        return recommend(facts, context, headroom_bytes=self.headroom_bytes(),
                         tasks=self.config.tasks, ceiling_bytes=self.ceiling_bytes())

    def get_memory_stats(self) -> dict[str, Any]:
        return memory_stats(self)


class _Hooks:
    """The original design's hook attributes, fed by engine events."""

    def __init__(self, manager: ModelMemoryManager) -> None:
        self.m = manager

    def on_load(self, model: str, duration_s: float, ok: bool) -> None:
        if ok:
            self.m._call_hook(self.m.on_model_loaded, model)

    def on_unload(self, model: str, reason: str) -> None:
        self.m._call_hook(self.m.on_model_unloaded, model)

    def on_pressure(self, level: MemoryPressure) -> None:
        self.m._call_hook(self.m.on_memory_pressure, level)
