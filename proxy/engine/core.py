"""EngineCore: composes the engine's parts and is the request path's only entry.

    acquire(name) → Lease     the model made resident first (scheduler → loader), heat bumped
    hold(name)    → Lease     a probe's or admin read's hold: blocks unloading, counts as no use
    record(r)                 a finished request, to accounting and listeners

Parts, one job each: `registry` (what is known), `monitor` (memory and pressure), `accounting`
(statistics and what survives a restart), `evictor` (who may go, unloading, pressure, idle),
`loader` (one load), `scheduler` (admission), `reconciler` (the server's truth), `report`
(the per-model view). The core receives its upstream; it never constructs one.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Any
from urllib.parse import urlsplit

from ..config import Config, redact_url
from ..errors import ModelLoadFailed, ModelNotFound, ModelUnavailable
from ..liveconfig import LiveConfig
from ..store import UsageStore
from ..upstream.base import ApiLevel, Capabilities, ModelBackend
from .accounting import Accounting
from .clock import Clock, SystemClock
from .eviction import Evictor
from .lifecycle import Lease, LeaseKind, ModelEntry, ModelStatus, transition
from .learning import UsageLearner
from .listeners import Listeners
from .loader import Loader
from .memory import (GB, BudgetSampler, MemoryPressure, MemorySample, MemorySampler,
                     NvmlSampler, PsutilSampler)
from .monitor import MemoryMonitor
from .periodic import Periodic
from .preload import Preloader
from .policy import decayed_heat
from .reconcile import Reconciler
from .registry import Registry, printable
from .scheduler import Scheduler
from .usage import ModelUsage, RequestRecord

log = logging.getLogger("proxy.engine")
S = ModelStatus
CATALOG_REFRESH_MIN_S = 2.0
IDLE_CHECK_MAX_S = 60.0


def default_sampler(config: Config, charged_bytes: Any) -> MemorySampler:
    mem = config.memory
    if mem.sampler == "budget":
        assert mem.budget_gb is not None
        return BudgetSampler(int(mem.budget_gb * 1e9), charged_bytes)
    return PsutilSampler(gpu=NvmlSampler.create())


def is_local_url(url: str) -> bool:
    """Does this URL point at this host (so that its loads show up in local memory)?"""
    host = (urlsplit(url).hostname or "").lower()
    if host in ("localhost", socket.gethostname().lower()):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EngineCore:
    def __init__(self, config: Config | LiveConfig, upstream: ModelBackend, *,
                 sampler: MemorySampler | None = None, clock: Clock | None = None,
                 store: UsageStore | None = None, owns_upstream: bool = False) -> None:
        """`config`: the app's live holder, or a plain Config (the engine as a library)."""
        self.live = live = LiveConfig.of(config)
        config = live.current
        self.backend = upstream
        self._owns_backend = owns_upstream     # whoever created the upstream closes it
        self.clock = clock or SystemClock()
        self.store = store
        self.listeners = Listeners()
        self.registry = r = Registry(live)
        self._upstream_local = live.derive(lambda c: is_local_url(c.upstream.url))
        self.learner = UsageLearner()
        self.accounting = Accounting(r, self.clock, self.listeners, store,
                                     lambda: redact_url(self.config.upstream.url),
                                     self.learner)
        self.monitor = MemoryMonitor(live, sampler or default_sampler(config, r.charged_bytes),
                                     self.listeners, reserved_bytes=r.loading_bytes,
                                     on_level=self._pressure_changed)
        self.reconciler = Reconciler(r, upstream, self.accounting, self.monitor, self.clock,
                                     self._set_status, self._room, listeners=self.listeners)
        self.evictor = Evictor(r, self.monitor, upstream, self.accounting, self.listeners,
                               self.clock, self._set_status, self._room, self.learner)
        self.loader = Loader(r, self.monitor, upstream, self.evictor, self.accounting,
                             self.listeners, self.clock, self._set_status,
                             lambda: self._upstream_local.value)
        self.scheduler = Scheduler(r, self.monitor, self.evictor, self.loader, self.listeners,
                                   self.clock, self._set_status)
        self.preloader = Preloader(r, self.learner, self.monitor, self.clock, self.listeners,
                                   lambda e, value_s, may_evict: self.scheduler.preload(
                                       e, value_s, may_evict=may_evict),
                                   lambda: self.scheduler.requests_waiting)
        self.evictor.on_unused_preload = self.preloader.unloaded_unused
        self.scheduler.after_load = self._after_load
        self.scheduler.on_preload_started = self.preloader.started
        self._periodic = Periodic("engine", log)
        self._active: set[Lease] = set()
        live.on_swap(self._config_swapped)

    @property
    def config(self) -> Config:
        return self.live.current

    @config.setter
    def config(self, config: Config) -> None:
        self.apply_config(config)

    def apply_config(self, config: Config) -> None:
        """Take a new configuration without unloading anything (hot reload): priorities, pins,
        TTLs, aliases, policy, hold and memory limits count from the next decision on. (The
        sampler kind, the upstream and the store are set up once: they need a restart.)"""
        self.live.swap(config)

    def _config_swapped(self, old: Config, new: Config) -> None:
        sampler = self.monitor.sampler
        if isinstance(sampler, BudgetSampler) and new.memory.budget_gb is not None:
            sampler.budget_bytes = int(new.memory.budget_gb * GB)
        self.scheduler.kick()   # a wait may be over: limits, pins or priorities changed

    # -- the engine's own lifecycle ----------------------------------------------------------
    async def start(self) -> None:
        """Connect, restore what survives restarts, learn the server's API level and what it
        has loaded. Never raises for an unreachable upstream: reconcile keeps trying."""
        start = getattr(self.backend, "start", None)
        if start is not None:
            await start()   # idempotent: the app may have started it already
        await self.accounting.open()
        await self.reconcile()
        await self.sample_memory()

    async def start_monitoring(self) -> None:
        if self._periodic.running:
            return
        if self.api_level is None and not self.upstream_ok:
            await self.start()
        c = self.config
        self._periodic.start("monitor", lambda: self.config.memory.monitoring_interval,
                             self._monitor_tick)
        self._periodic.start("idle", lambda: min(IDLE_CHECK_MAX_S,
                                                 self.config.memory.monitoring_interval),
                             self.unload_idle_models)
        self._periodic.start("reconcile", lambda: self.config.upstream.reconcile_interval_s,
                             self.reconcile)
        self._periodic.start("preload", lambda: self.config.memory.monitoring_interval,
                             self.preloader.tick)
        if self.store is not None:
            self._periodic.start("flush", c.storage.flush_interval_s, self.flush)

    async def stop_monitoring(self) -> None:
        await self._periodic.stop()

    async def cleanup(self) -> None:
        await self.stop_monitoring()
        await self.scheduler.stop()
        await self.accounting.close()
        close = getattr(self.backend, "close", None)
        if self._owns_backend and close is not None:
            await close()

    # -- the request path --------------------------------------------------------------------
    async def acquire(self, name: str) -> Lease:
        """A USE lease on a resident model, loading it first if needed; raises ProxyError."""
        e = self.registry.get(name)
        if e is not None and (e.status is S.LOADED or not self.manages_loading):
            return self._lease(e)   # hot path: no lock, no await
        if e is None:
            e = self.registry.entries[await self.resolve(name)]
        arrived_s = self.clock.now()
        self.learner.observe(e.key, arrived_s, self.clock.wall())   # arrival, not admission
        self.preloader.after_request(e.key)
        deadline_s = arrived_s + self.config.eviction.queue_timeout_s
        while True:
            if e.status is S.LOADED or not self.manages_loading:
                return self._lease(e, observed=True)
            if e.status is S.ERROR and self.clock.now() < e.retry_at_s:
                raise ModelLoadFailed(e.last_error or f"'{e.key}' failed to load",
                                      retry_after_s=e.retry_at_s - self.clock.now())
            await self.scheduler.ensure_loaded(e, deadline_s)

    async def admit_load(self, name: str, *, owner: str) -> "MediatedLoad | None":
        """Admission for a load its requester performs itself (an LM Studio SDK client's
        `loadModel` through the proxy): room is made by the policy, with the same order,
        fail-fast and refusals as for any request (ProxyError). Returns None when the model
        is loaded already; else the caller loads it and reports with `loaded()`/`failed()`.
        Models loaded this way belong to `owner` and are evicted only under the rules for
        models that are not the proxy's."""
        e = self.registry.entries[await self.resolve(name)]
        if e.status is S.LOADED:
            return None
        deadline_s = self.clock.now() + self.config.eviction.queue_timeout_s
        pending = await self.scheduler.admit_mediated(e, deadline_s)
        return None if pending is None else MediatedLoad(self, pending, owner)

    def client_connection(self, client: str, delta: int) -> None:
        """An SDK client (`sdk:<id>`, the owner of what it loads) opened (+1) or closed (-1) a
        connection; once none is open its models may make room (native.evict)."""
        clients = self.registry.clients
        clients[client] += delta
        if clients[client] <= 0:
            del clients[client]
            self.scheduler.kick()

    def hold(self, name: str) -> Lease | None:
        """A HOLD lease on a loaded model (None if it is not loaded): it cannot be unloaded
        while held, and nothing about its use — recency, heat, idle timer, statistics —
        changes."""
        e = self.registry.get(name)
        if e is None or e.status is not S.LOADED:
            return None
        lease = Lease(e, self._on_release, self.clock.now(), LeaseKind.HOLD)
        self._active.add(lease)
        return lease

    def _lease(self, e: ModelEntry, observed: bool = False) -> Lease:
        now = self.clock.now()
        e.heat = decayed_heat(e.heat, e.heat_at_s, now) + 1.0
        e.heat_at_s = now
        e.last_used_at_s = now
        if not observed:
            self.learner.observe(e.key, now, self.clock.wall())
            self.preloader.after_request(e.key)
        if e.preloaded:
            self.preloader.used(e)
        lease = Lease(e, self._on_release, now)
        self._active.add(lease)
        return lease

    def _on_release(self, lease: Lease) -> None:
        self._active.discard(lease)
        e = lease.entry
        if lease.kind is LeaseKind.USE:
            e.last_used_at_s = self.clock.now()
        if not e.busy and self.scheduler.pending:
            self.scheduler.kick()

    def record(self, r: RequestRecord) -> None:
        self.accounting.record(r)

    def add_listener(self, listener: Any) -> None:
        """Subscribe to engine events (see engine.listeners for the list)."""
        self.listeners.add(listener)

    def active_leases(self) -> list[Lease]:
        return [lease for lease in self._active if lease.kind is LeaseKind.USE]

    async def resolve(self, name: str) -> str:
        """Alias, key or instance id → model key; refreshes the catalogue once before giving
        up, then names the closest known models."""
        key = self.registry.key_of(name)
        if key is not None:
            return key
        if self.clock.now() - self.reconciler.last_run_s >= CATALOG_REFRESH_MIN_S:
            await self.reconcile()
            key = self.registry.key_of(name)
            if key is not None:
                return key
        if not len(self.registry) and not self.upstream_ok:
            raise self.reconciler.failure()
        close = self.registry.suggestions(name)
        hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""
        raise ModelNotFound(f"The model '{printable(name)}' does not exist.{hint}",
                            param="model")

    # -- background work ---------------------------------------------------------------------
    async def sample_memory(self) -> MemorySample:
        return await self.monitor.sample()

    async def _monitor_tick(self) -> None:
        await self.sample_memory()
        await self.relieve_pressure()

    async def relieve_pressure(self) -> list[str]:
        """At high pressure evict by policy until back to normal; at critical, escalate."""
        if self.memory_pressure is MemoryPressure.CRITICAL:
            return await self._handle_critical_memory()
        return await self.evictor.relieve(critical=False)

    async def _handle_critical_memory(self) -> list[str]:
        """Critical memory; overridable. By default: evict idle models by policy, ignoring
        their residency, until pressure is back to normal."""
        log.error("critical memory pressure; evicting idle models regardless of residency")
        return await self.evictor.relieve(critical=True)

    async def unload_idle_models(self) -> list[str]:
        return await self.evictor.unload_idle()

    async def reconcile(self) -> None:
        late = await self.reconciler.run()
        await self.evictor.unload_abandoned(late, lambda key: key in self.scheduler.pending)
        self.scheduler.kick()

    async def _after_load(self) -> None:
        """A server that evicts by itself may have dropped another model for this load (even
        for one that failed): learn it now, not at the next reconcile tick."""
        caps = self.reconciler.capabilities
        if caps is not None and caps.self_evicts:
            await self.reconcile()

    async def flush(self) -> None:
        await self.accounting.flush()

    async def unload(self, name: str, *, reason: str = "manual",
                     drain_timeout_s: float | None = None) -> bool:
        """Unload after in-flight requests finish (never cut a generation)."""
        e = self.registry.entries[await self.resolve(name)]
        timeout_s = drain_timeout_s if drain_timeout_s is not None else \
            self.config.eviction.queue_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                while e.status in (S.LOADING, S.UNLOADING) or e.busy:
                    if e.leases or e.holds:
                        await e.drained.wait()
                    elif e.reserved:
                        await asyncio.sleep(0)   # its waiters take their leases first
                    elif e.load_task is not None and not e.load_task.done():
                        await asyncio.wait([e.load_task])
                    else:
                        await e.settled.wait()
        except TimeoutError:
            raise ModelUnavailable(f"'{e.key}' is still busy after {timeout_s:g}s ({e.leases} "
                                   f"request(s), {e.holds} probe(s) or reads); not unloaded",
                                   retry_after_s=timeout_s) from None
        if e.status is not S.LOADED:
            return False
        async with self.evictor.lock:
            await self.evictor.unload(e, reason)
        return e.status is S.UNLOADED

    # -- state changes -----------------------------------------------------------------------
    def _set_status(self, e: ModelEntry, status: ModelStatus) -> None:
        old = transition(e, status)
        self.reconciler.note_change(e.key)
        if old is not status:
            self.listeners.emit("on_state", e.key, old.value, status.value)

    def _room(self) -> None:
        self.scheduler.kick()

    def _pressure_changed(self, level: MemoryPressure) -> None:
        self.listeners.emit("on_pressure", level)

    # -- views -------------------------------------------------------------------------------
    @property
    def manages_loading(self) -> bool:
        """Without it the proxy relays and measures: the server loads on its own."""
        caps = self.reconciler.capabilities
        return caps is not None and caps.manages_loading

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
        return self.monitor.last_sample

    @property
    def sampler(self) -> MemorySampler:
        return self.monitor.sampler

    def known_models(self) -> list[str]:
        return self.registry.keys()

    def entry(self, name: str) -> ModelEntry | None:
        return self.registry.get(name)

    def usage(self, key: str) -> ModelUsage:
        return self.accounting.usage_of(key)

    def footprint_bytes(self, e: ModelEntry) -> float:
        return self.registry.footprint_bytes(e)

    def priority(self, key: str) -> int:
        return self.registry.priority(key)

    def headroom_bytes(self) -> float:
        s = self.monitor.last_sample
        return self.monitor.headroom(s) if s is not None else 0.0

    def ceiling_bytes(self) -> float:
        """The most any one model may take; unbounded until memory was first sampled."""
        s = self.monitor.last_sample
        return self.monitor.ceiling_bytes(s) if s is not None else float("inf")


class MediatedLoad:
    """An admitted load that its requester performs; report exactly once."""

    def __init__(self, core: EngineCore, pending: Any, owner: str) -> None:
        self._core, self._pending, self.owner = core, pending, owner
        self.key = pending.entry.key
        self.reported = False

    def loaded(self, instance_id: str) -> None:
        if not self.reported:
            self.reported = True
            self._core.loader.mediated_loaded(self._pending.entry, instance_id, self.owner)
            self._core.scheduler.finish_mediated(self._pending, None)

    def failed(self, message: str) -> None:
        if not self.reported:
            self.reported = True
            error = ModelLoadFailed(message)
            self._core.loader.mediated_failed(self._pending.entry, error)
            self._core.scheduler.finish_mediated(self._pending, error)
