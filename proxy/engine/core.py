"""EngineCore: composes the engine's parts and is the request path's only entry.

    acquire(name) → Lease     the model made resident first (scheduler → loader), heat bumped
    hold(name)    → Lease     a probe's or admin read's hold: blocks unloading, counts as no use
    record(r)                 a finished request, to accounting and listeners (Accounting.record)

Parts, one job each: `registry` (what is known), `monitor` (memory and pressure), `accounting`
(statistics and what survives a restart), `evictor` (who may go, unloading, pressure, idle),
`loader` (one load), `scheduler` (admission), `reconciler` (the server's truth), `report`
(the per-model view). Its views are engine/coreviews.py. The core receives its upstream;
it never constructs one.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from ..config import Config
from ..errors import ModelLoadFailed
from ..liveconfig import LiveConfig
from ..store import UsageStore
from ..upstream.base import ModelBackend
from .accounting import Accounting
from .clock import Clock, SystemClock
from .context import EngineContext
from .coreviews import CoreViews
from .manual import ManualOperations
from .eviction import Evictor
from .groups import Groups
from .leases import Leases
from .lifecycle import Lease, ModelStatus
from .learner import UsageLearner
from .listeners import Listeners
from .loader import Loader
from .mediated import MediatedLoad
from .memory import MemoryPressure, MemorySample, MemorySampler, default_sampler
from .monitor import MemoryMonitor
from .periodic import Periodic
from .preload import Preloader, PreloadTally
from .reconcile import Reconciler
from .registry import Registry
from .scheduler import Scheduler
from .shared import SharedHost
from .unlisted import Unlisted
from .usage import RequestRecord

log = logging.getLogger("proxy.engine")
S = ModelStatus
LOADED = S.LOADED   # a module constant: the request path reads it (an Enum member is slow to read)
CATALOG_REFRESH_MIN_S = 2.0
IDLE_CHECK_MAX_S = 60.0
# What to do at critical memory pressure; returns the models it unloaded.
CriticalHandler = Callable[[], Awaitable[list[str]]]


class EngineCore(ManualOperations, CoreViews):
    def __init__(self, config: Config | LiveConfig, upstream: ModelBackend, *,
                 sampler: MemorySampler | None = None, clock: Clock | None = None,
                 store: UsageStore | None = None, owns_upstream: bool = False,
                 on_critical: CriticalHandler | None = None,
                 shared: SharedHost | None = None, host_name: str | None = None,
                 host_path: str | None = None) -> None:
        """`config`: the app's live holder, or a plain Config (the engine as a library);
        `host_name`: the engine is one host's of a fleet (its leases name it), `host_path`
        that host's entry in the config (`upstreams[<i>]`: its refusals name its keys)."""
        self.live = live = LiveConfig.of(config)
        config = live.current
        self.backend = upstream
        self._owns_backend = owns_upstream     # whoever created the upstream closes it
        self.clock = clock or SystemClock()
        self.store = store
        self.listeners = Listeners()
        self.registry = r = Registry(live)
        self._entries = r.entries     # the request path's lookup (the dict is never replaced)
        self.learner = UsageLearner()
        self.accounting = Accounting(r, self.clock, self.listeners, store, self.learner)
        # A finished request, to accounting and listeners: the accounting's own method (the
        # request path calls it once per request; no frame of the core's in between).
        self.record: Callable[[RequestRecord], None] = self.accounting.record
        self.monitor = MemoryMonitor(live, sampler or default_sampler(config.memory, r.charged_bytes),
                                     self.listeners, reserved_bytes=r.loading_bytes,
                                     managed=lambda: self.memory_managed)
        self.ctx = ctx = EngineContext(r, self.monitor, self.accounting, self.listeners,
                                       self.clock, upstream, self.learner)
        ctx.host_name, ctx.host_path = host_name, host_path
        if shared is not None:   # one of several replicas: what they share (engine/shared.py)
            ctx.shared = shared
            # A model pinned here is held as if it served here: no other replica evicts it.
            shared.leases_of = lambda: [
                e.key for e in r.entries.values()
                if e.leases or (e.status is ModelStatus.LOADED and r.pinned(e.key))]
            shared.record_of = self._host_record
            shared.registry = r
            shared.learner, shared.clock = self.learner, self.clock   # patterns the fleet keeps
            shared.catch_up.reconcile = self.reconcile   # when another replica loads or unloads
            shared.catch_up.host = host_name
            shared.wake = ctx.wake      # a lease another replica gave up for a load here
            shared.record_ttl_s = max(60.0, 3 * live.current.upstream.reconcile_interval_s)
            self.listeners.add(shared)     # its loads and unloads: the host's record now
        self.preloads = PreloadTally(r)
        self.reconciler = Reconciler(ctx, self.preloads)
        self.groups = Groups(ctx)
        self.evictor = Evictor(ctx, self.preloads, self.groups)
        self.loader = Loader(ctx, self.evictor)
        self.scheduler = Scheduler(ctx, self.evictor, self.loader, self.preloads,
                                   after_load=self._after_load)
        self.preloader = Preloader(ctx, self.preloads, self.scheduler, self.groups)
        # Critical pressure: the library's manager may answer it its own way.
        self._on_critical = on_critical or self.relieve_critical
        self._critical_since_s: float | None = None   # an episode relieve_critical logged
        self.leases = Leases(ctx, self.preloader, self.preloads, self.scheduler)
        if shared is not None:
            shared.heard_arrival = self.leases.heard   # another replica's request, learned here
            shared.heard_by_hand = lambda key: self.keep_unloaded(key, tell=False)
        self._periodic = Periodic("engine", log)
        # After each reconcile that got the model list: configured names it lacks are warned
        # of (once). A fleet's host leaves that to the fleet, which knows every host's list.
        self._unlisted = Unlisted()
        self.after_reconcile: Callable[[], object] | None = \
            None if host_name is not None else self._warn_unlisted
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
        # (The monitor has judged the pressure under the new memory limits already.)
        if old.memory != new.memory:
            self._periodic.run_now("monitor")   # sample, and relieve pressure, now
        self.ctx.wake()   # a wait may be over: limits, pins or priorities changed

    # -- the engine's own lifecycle ----------------------------------------------------------
    async def start(self) -> None:
        """Connect, restore what survives restarts, learn the server's API level and what it
        has loaded. Never raises for an unreachable upstream: reconcile keeps trying."""
        # The history first: a file another process holds refuses the start (StorageInUse)
        # before any connection is opened that would then be left open.
        await self.accounting.open()
        if self.ctx.shared is not None:
            await self.ctx.shared.adopt_patterns()   # after its own history: newer ones win
        start = getattr(self.backend, "start", None)
        if start is not None:
            await start()   # idempotent: the app may have started it already
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
                             self._idle_tick)
        self._periodic.start("reconcile", lambda: self.config.upstream.reconcile_interval_s,
                             self.reconcile)
        self._periodic.start("preload", self.preload_wait_s, self._preload_tick)
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
    async def acquire(self, name: str, *, avoid: str | None = None) -> Lease:
        """A USE lease on a resident model, loading it first if needed; raises ProxyError.
        (`avoid` names a fleet's host; one server has no other to go to.)"""
        e = self._entries.get(self.live.aliases.get(name, name))   # registry.get, inlined
        shared = self.ctx.shared
        if e is not None and (e.status is LOADED or not self.manages_loading) and (
                shared is None or shared.leased(e.key)):
            return self.leases.use(e)   # hot path: no lock, no await
        if e is None:
            e = self.registry.entries[await self.resolve(name)]
        arrived_s, arrived_wall_s = self.clock.now(), self.clock.wall()
        self.learner.observe(e.key, arrived_s, arrived_wall_s)   # arrival, not admission
        self.preloader.after_request(e.key)
        if shared is not None:
            shared.arrived(e.key, arrived_wall_s)
        deadline_s = arrived_s + self.config.eviction.queue_timeout_s
        while True:
            if e.status is LOADED or not self.manages_loading:
                lease = self.leases.use(e, observed=True)
                if shared is not None:
                    try:
                        leased = await shared.lease_now(e.key)
                    except BaseException:    # cancelled meanwhile: the lease goes back
                        lease.release()
                        raise
                    # Another replica unloaded it meanwhile (then its stream event or the
                    # state's record has had the host asked, which may have said so already).
                    if not leased or e.status is not LOADED and self.manages_loading:
                        lease.release()
                        await self.reconcile()
                        if e.status is LOADED:    # the unload waited for was given up
                            shared.unloaded_by.pop(e.key, None)
                        continue
                return lease
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
        return None if pending is None else MediatedLoad(self.loader, self.scheduler, pending, owner)

    def client_connection(self, client: str, delta: int) -> None:
        """An SDK client (`sdk:<id>`, the owner of what it loads) opened (+1) or closed (-1) a
        connection; once none is open its models may make room (native.evict)."""
        clients = self.registry.clients
        clients[client] += delta
        if clients[client] <= 0:
            del clients[client]
            self.ctx.wake()

    def upstream_for(self, lease: Lease) -> Any:
        """The server to forward a leased request to: the one there is."""
        return self.backend

    def host_failed(self, name: str) -> None:
        """A fleet routes around a host that stopped answering; one server has no other."""

    def host_lost(self, name: str) -> asyncio.Future[None] | None:
        """A fleet's signal that host `name` is counted down; one server has none: its
        requests wait for it (up to upstream.read_timeout_s)."""
        return None

    def hold(self, name: str) -> Lease | None:
        """A HOLD lease on a loaded model (None if it is not loaded): it cannot be unloaded
        while held, and nothing about its use — recency, heat, idle timer, statistics —
        changes."""
        e = self.registry.get(name)
        if e is None or e.status is not S.LOADED:
            return None
        return self.leases.hold(e)

    def add_listener(self, listener: Any) -> None:
        """Subscribe to engine events (see engine.listeners for the list)."""
        self.listeners.add(listener)

    def active_leases(self) -> list[Lease]:
        return self.leases.in_use()

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
        raise self.registry.not_found(name)

    # -- background work ---------------------------------------------------------------------
    async def sample_memory(self) -> MemorySample:
        return await self.monitor.sample()

    @property
    def leads(self) -> bool:
        """Runs the background jobs that act on the hosts: alone, or as the replicas' leader."""
        shared = self.ctx.shared
        return shared is None or shared.replica.leader

    async def _monitor_tick(self) -> None:
        await self.sample_memory()
        if self.leads:
            await self.relieve_pressure()

    async def _idle_tick(self) -> None:
        if self.leads:
            await self.unload_idle_models()

    def preload_wait_s(self) -> float:
        """Until the next preload tick: the monitoring interval, or sooner when a timer's
        model falls due."""
        return self.preloader.wait_s(self.config.memory.monitoring_interval)

    async def _preload_tick(self) -> None:
        if self.leads:
            await self.preloader.tick()

    async def relieve_pressure(self) -> list[str]:
        """At high pressure evict by policy until back to normal; at critical, escalate (to
        the handler given at construction, if one was)."""
        if self.memory_pressure is MemoryPressure.CRITICAL:
            evicted = await self._on_critical()
            self._critical_over()
            return evicted
        self._critical_over()
        return await self.evictor.relieve(critical=False)

    async def relieve_critical(self) -> list[str]:
        """The default answer to critical memory: evict idle models by policy, ignoring
        their residency, until pressure is back to normal. Said once an episode (at ERROR):
        while pinned models alone exceed the memory, it is tried again every interval."""
        if self._critical_since_s is None:
            self._critical_since_s = self.clock.now()
            log.error("critical memory pressure; evicting idle models regardless of residency")
        else:
            log.debug("critical memory pressure for %.0fs; evicting idle models regardless "
                      "of residency", self.clock.now() - self._critical_since_s)
        return await self.evictor.relieve(critical=True)

    def _critical_over(self) -> None:
        if self._critical_since_s is not None and \
                self.memory_pressure is not MemoryPressure.CRITICAL:
            log.info("critical memory pressure over after %.0fs (pressure %s)",
                     self.clock.now() - self._critical_since_s, self.memory_pressure.value)
            self._critical_since_s = None

    async def unload_idle_models(self) -> list[str]:
        return await self.evictor.unload_idle()

    async def reconcile(self) -> None:
        late = await self.reconciler.run()
        if self.upstream_ok and self.after_reconcile is not None:
            self.after_reconcile()
        if self.ctx.shared is not None and self.upstream_ok:
            self.ctx.shared.publish_soon()
        await self.evictor.unload_abandoned(late, lambda key: key in self.scheduler.pending)
        self.ctx.wake()

    def _warn_unlisted(self) -> list[str]:
        return self._unlisted.check(self.config,
                                    lambda name, _host: self.registry.key_of(name) is not None)

    async def _after_load(self) -> None:
        """A server that evicts by itself may have dropped another model for this load (even
        for one that failed): learn it now, not at the next reconcile tick."""
        caps = self.reconciler.capabilities
        if caps is not None and caps.self_evicts:
            await self.reconcile()

    async def flush(self) -> None:
        await self.accounting.flush()
