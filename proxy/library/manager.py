"""ModelMemoryManager: the original design's library API, wrapped around an EngineCore.

    async with ModelMemoryManager(max_memory_usage_percent=80, min_free_memory_gb=4) as m:
        await m.ensure_models_available(["qwen/qwen3-4b"], priority=8)
        m.record_model_usage("qwen/qwen3-4b", latency=0.8, success=True, tokens_used=120)

Without `upstream=` (or with a URL), it builds the configured adapter (`upstream.kind`) and
closes it itself; it keeps its history in the store `storage:` names, as the proxy does. The
engine itself is `manager.core`; the manager offers the engine's face
(`proxy.engine.face.Engine`) by reading it through (library/face.py), plus the original names
(their arguments checked as the HTTP API checks them, proxy/inputs.py), hooks and the
overridable `_handle_critical_memory()`, which the core calls at critical pressure. It belongs
to the event loop it is first used in, until cleanup() closes it for good.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any, Callable, Iterable, Mapping

from .. import inputs
from ..config import Config
from ..configload import load_config
from ..engine.clock import Clock
from ..engine.core import EngineCore
from ..engine.lifecycle import ModelEntry, ModelStatus
from ..engine.memory import MemoryPressure, MemorySampler
from ..engine.usage import ModelUsage, RequestRecord
from ..errors import ProxyError
from ..liveconfig import LiveConfig
from ..storage import configured_store
from ..store import UsageStore
from ..upstream import create_upstream
from ..upstream.base import ModelBackend
from .face import EngineFace

log = logging.getLogger("proxy.library")


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


BACKEND_METHODS = ("detect", "list_models", "load", "unload")   # upstream.base.ModelBackend


class ModelMemoryManager(EngineFace):
    def __init__(self, max_memory_usage_percent: float = 80.0, model_timeout_hours: float = 2.0,
                 min_free_memory_gb: float = 4.0, monitoring_interval: float = 30.0,
                 upstream: ModelBackend | str | None = None, *,
                 config: Config | LiveConfig | None = None,
                 sampler: MemorySampler | None = None, clock: Clock | None = None,
                 owns_upstream: bool | None = None, store: UsageStore | None = None
                 ) -> None:
        """`store`: a history store of your own instead of the one `storage:` names."""
        if upstream is not None and not isinstance(upstream, str) and \
                not all(callable(getattr(upstream, m, None)) for m in BACKEND_METHODS):
            raise TypeError("upstream must be the server's URL (a str) or an adapter "
                            "(a proxy.upstream ModelBackend), not "
                            f"{type(upstream).__name__}")
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
        if store is None:     # as the proxy does: the history survives a restart
            store = configured_store(LiveConfig.of(config).current.storage, library=True)
        self.core = EngineCore(config, upstream if upstream is not None else
                               create_upstream(LiveConfig.of(config).current.upstream),
                               sampler=sampler, clock=clock, store=store, owns_upstream=owns,
                               on_critical=self._handle_critical_memory)
        self.on_model_loaded: Callable[..., Any] | None = None
        self.on_model_unloaded: Callable[..., Any] | None = None
        self.on_memory_pressure: Callable[..., Any] | None = None
        self._hook_tasks: set[asyncio.Task[Any]] = set()
        self.core.add_listener(_Hooks(self))

    @property
    def config(self) -> Config:
        return self.core.config

    @config.setter
    def config(self, config: Config) -> None:
        self.core.apply_config(config)

    async def _handle_critical_memory(self) -> list[str]:
        """Critical memory; overridable. By default: evict idle models by policy, ignoring
        their residency, until pressure is back to normal."""
        return await self.core.relieve_critical()

    async def __aenter__(self) -> "ModelMemoryManager":
        await self.start()
        await self.start_monitoring()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cleanup()

    async def cleanup(self) -> None:
        """Stop monitoring, write and close the history, close the adapter it built. The
        manager is closed for good; a second cleanup() does nothing."""
        if self._closed:
            return
        self._check_tie()
        self._closed = True
        await self.core.cleanup()

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

    def _key(self, name: object, *, with_history: bool = False) -> str:
        """The key of a known model (no catalogue refresh: the caller is not async); with
        `with_history`, also one not listed now whose statistics were kept from before."""
        name = inputs.model_name(name)
        key = self.core.registry.key_of(name)
        if key is None and with_history and name in self.core.accounting.usage:
            key = name
        if key is None:
            raise self.core.registry.not_found(name)
        return key

    # -- the original library API ------------------------------------------------------------
    @property
    def model_status(self) -> dict[str, ModelStatus]:
        return {e.key: e.status for e in self.core.registry}

    @property
    def model_metrics(self) -> dict[str, ModelMetrics]:
        core = self.core
        now = core.clock.now()
        return {e.key: ModelMetrics(core.usage(e.key), e, core.footprint_bytes(e), now)
                for e in core.registry}

    def is_pinned(self, key: str) -> bool:
        return self.core.pinned(key)

    def set_pinned(self, key: str, pinned: bool) -> None:
        """A runtime pin: kept until the process ends."""
        self._check_tie()
        pinned = inputs.flag("pinned", pinned)
        self.core.pin(self._key(key), pinned)

    def get_loaded_models(self) -> list[str]:
        return self.core.loaded_models()

    async def load_model(self, name: str, priority: int | None = None) -> bool:
        """Cancelling the caller does not cancel the load (LM Studio cannot): the model
        still becomes resident, and on_model_loaded fires."""
        self._check_tie()
        return await self.core.load(inputs.model_name(name), inputs.priority(priority))

    async def unload_model(self, name: str, *, reason: str = "manual",
                           drain_timeout_s: float | None = None) -> bool:
        self._check_tie()
        return await self.core.unload(inputs.model_name(name), reason=reason,
                                      drain_timeout_s=drain_timeout_s)

    async def ensure_models_available(self, models: Iterable[str] | str,
                                      priority: int | None = None) -> dict[str, bool]:
        """Each model loaded if it can be: name → whether it is available (a refusal is
        logged and is False). One name may be given as a str."""
        self._check_tie()
        names = [inputs.model_name(n) for n in ([models] if isinstance(models, str) else models)]
        priority = inputs.priority(priority)
        out: dict[str, bool] = {}
        for name in names:
            try:
                out[name] = await self.core.load(name, priority)
            except ProxyError as exc:
                log.warning("could not make %s available: %s", name, exc.message)
                out[name] = False
        return out

    async def clear_all_models(self) -> list[str]:
        """Unload every loaded model the proxy may unload (pins included: an explicit clear)."""
        self._check_tie()
        unloaded: list[str] = (await self.core.clear())["unloaded"]
        return unloaded

    async def optimize_memory_usage(self) -> dict[str, Any]:
        self._check_tie()
        return await self.core.optimize()

    def record_model_usage(self, model: str, latency: float, success: bool = True,
                           tokens_used: int = 0) -> None:
        """One request of a known model (listed, or with statistics kept from before a
        restart): `latency` seconds (0 or more), `tokens_used` the completion tokens."""
        self._check_tie()
        core = self.core
        key = self._key(model, with_history=True)
        record = RequestRecord(model=key, ok=inputs.flag("success", success),
                               latency_s=inputs.number("latency", latency, minimum=0),
                               at_s=core.clock.now(),
                               completion_tokens=inputs.count("tokens_used", tokens_used))
        core.record(record)

    def get_model_recommendations(self, context: Mapping[str, Any] | str | None = None
                                  ) -> dict[str, Any]:
        """{"recommended_models", "models_to_preload", "models_to_unload", "not_loadable",
        "reasoning"} for a context with `task_type`, `complexity` and `urgency` (0–1),
        `available_memory_gb`, `model_type` (llm | embedding)."""
        return self.core.recommend(context)

    def get_memory_stats(self) -> dict[str, Any]:
        return self.core.report()


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
