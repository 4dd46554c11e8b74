"""The engine core's views: what it tells of itself — the server's answers and capabilities,
memory and pressure, the queue, the models and their rows, the report, recommendations, and the
host's record for the other replicas. Read-only; the parts it reads are the core's."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from ..state import HostRecord
from ..urls import normal_url
from ..upstream.base import ApiLevel, Capabilities
from .lifecycle import ModelEntry, ModelStatus
from .memory import MemoryPressure, MemorySample, MemorySampler
from .report import memory_stats, model_row, recommendations
from .usage import ModelUsage

if TYPE_CHECKING:
    from .accounting import Accounting
    from .clock import Clock
    from .context import EngineContext
    from .monitor import MemoryMonitor
    from .reconcile import Reconciler
    from .registry import Registry
    from .scheduler import Scheduler

S = ModelStatus
UNKNOWN = "unknown"   # the state shown for a model whose residency the server does not tell


class CoreViews:
    reconciler: "Reconciler"
    monitor: "MemoryMonitor"
    scheduler: "Scheduler"
    registry: "Registry"
    accounting: "Accounting"
    clock: "Clock"
    ctx: "EngineContext"

    def _host_record(self) -> HostRecord:
        """This host as this engine sees it, for the other replicas (engine/shared.py)."""
        r = self.registry
        return HostRecord(
            resident={i: e.key for e in r.entries.values() if e.status is S.LOADED
                      for i in (e.instance_ids or (e.key,))},
            used_bytes=int(r.charged_bytes()),
            budget_bytes=int(self.ceiling_bytes()) if self.monitor.last_sample else 0,
            reported_by=self.ctx.shared.replica.id if self.ctx.shared else "",
            url=normal_url(self.registry.config.upstream.url))

    @property
    def manages_loading(self) -> bool:
        """Without it the proxy relays and measures: the server loads on its own."""
        caps = self.reconciler.capabilities
        return caps is not None and caps.manages_loading

    @property
    def memory_managed(self) -> bool:
        """Whether the proxy manages memory: only where it loads and unloads. Elsewhere the
        views show no memory figures, pressure or footprints: the proxy acts on none of them
        (assumed managed until the server first answers)."""
        caps = self.reconciler.capabilities
        return caps is None or caps.manages_loading

    def state_of(self, e: ModelEntry) -> str:
        """A model's state as the views show it: `unknown` on a server that does not say what
        it has loaded (not `unloaded`: it may well be resident)."""
        caps = self.reconciler.capabilities
        if e.status is S.UNLOADED and caps is not None and not caps.reports_residency:
            return UNKNOWN
        return e.status.value

    @property
    def capabilities(self) -> Capabilities | None:
        """The backend's, once it has answered."""
        return self.reconciler.capabilities

    @property
    def api_level(self) -> ApiLevel | None:
        return self.reconciler.api_level

    @property
    def upstream_ok(self) -> bool:
        return self.reconciler.upstream_ok

    @property
    def upstream_error(self) -> str | None:
        return self.reconciler.upstream_error

    @property
    def memory_pressure(self) -> MemoryPressure:
        return self.monitor.level

    @property
    def queue_length(self) -> int:
        return self.scheduler.queue_length

    @property
    def last_sample(self) -> MemorySample | None:
        """The memory the views show: none where memory is not managed."""
        return self.monitor.last_sample if self.memory_managed else None

    @property
    def sampler(self) -> MemorySampler:
        return self.monitor.sampler

    @property
    def last_reconcile_s(self) -> float:
        return self.reconciler.last_run_s

    def known_models(self) -> list[str]:
        return self.registry.keys()

    def loaded_models(self) -> list[str]:
        return self.registry.loaded()

    def owner_of(self, name: str) -> tuple[str | None, str | None]:
        """A native client's model name or instance identifier → (the model it reaches, as
        LM Studio resolves it: loaded instances first; its owner while loaded)."""
        key = self.registry.loaded_as(name)
        e = self.registry.entries.get(key) if key is not None else None
        return key, (e.owner if e is not None and e.status is S.LOADED else None)

    def report(self) -> dict[str, Any]:
        """The original get_memory_stats() shape, plus per-model rows (GET /proxy/stats)."""
        return memory_stats(self)

    def row(self, key: str) -> dict[str, Any]:
        """The one per-model view (GET /proxy/models)."""
        return model_row(self, key, self.clock.now())

    def recommend(self, context: Mapping[str, Any] | str | None = None) -> dict[str, Any]:
        """Recommendations for a task, and the choice behind `auto:<task>`."""
        return recommendations(self, context)

    def entry(self, name: str) -> ModelEntry | None:
        return self.registry.get(name)

    def usage(self, key: str) -> ModelUsage:
        return self.accounting.usage_of(key)

    def footprint_bytes(self, e: ModelEntry) -> float:
        return self.registry.footprint_bytes(e)

    def footprint_source(self, e: ModelEntry) -> str:
        return self.registry.footprint_source(e)

    def priority(self, key: str) -> int:
        return self.registry.priority(key)

    def headroom_bytes(self) -> float:
        s = self.monitor.last_sample
        return self.monitor.headroom(s) if s is not None else 0.0

    def ceiling_bytes(self) -> float:
        """The most any one model may take; unbounded until memory was first sampled."""
        s = self.monitor.last_sample
        return self.monitor.ceiling_bytes(s) if s is not None else float("inf")
