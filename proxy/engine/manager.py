"""ModelMemoryManager: the only place that mixes eviction policy with upstream I/O.

Requests call `acquire(model)` and get a `Lease` (or a ProxyError); the manager makes the model
resident with one load however many requests race for it, makes room first by evicting what the
policy picks among models that are idle, unpinned, old enough and its own, and queues the request
with a deadline when nothing can go. Background loops sample memory, relieve pressure, unload
idle models and reconcile with what the server really has loaded.
"""
from __future__ import annotations

import asyncio
import difflib
import inspect
import logging
from typing import Any, Awaitable, Callable, Iterable, Mapping

from ..config import Config, load_config
from ..store import UsageStore
from ..errors import (InsufficientMemory, InvalidRequest, ModelLoadFailed, ModelNotFound, ModelUnavailable,
                      ProxyError, UpstreamError)
from ..upstream.base import ApiLevel, LoadResult, ModelBackend, UpstreamModel
from .clock import Clock, SystemClock
from .lifecycle import Lease, ModelEntry, ModelStatus, transition
from .memory import (GB, BudgetSampler, MemoryPressure, MemorySample, MemorySampler,
                     NvmlSampler, PressureGauge, PsutilSampler)
from .policy import HEAT_HALF_LIFE_S, Candidate, select_victims
from .predict import ModelFacts, recommend
from .usage import ModelUsage, RequestRecord
from .usage import restore as restore_usage
from .usage import snapshot as snapshot_usage

log = logging.getLogger("proxy.engine")
S = ModelStatus
DEFAULT_FOOTPRINT_BYTES = 4 * GB   # a model whose size nobody reported
CATALOG_REFRESH_MIN_S = 2.0


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


class ModelMemoryManager:
    def __init__(self, max_memory_usage_percent: float = 80.0, model_timeout_hours: float = 2.0,
                 min_free_memory_gb: float = 4.0, monitoring_interval: float = 30.0,
                 upstream: ModelBackend | None = None, *, config: Config | None = None,
                 sampler: MemorySampler | None = None, clock: Clock | None = None,
                 owns_upstream: bool | None = None, store: UsageStore | None = None
                 ) -> None:
        if config is None:
            config = load_config(overrides={
                "memory.max_memory_usage_percent": max_memory_usage_percent,
                "memory.min_free_memory_gb": min_free_memory_gb,
                "memory.monitoring_interval": monitoring_interval,
                "eviction.model_timeout_hours": model_timeout_hours})
        self.config = config
        # Whoever creates the upstream closes it; a library user may hand it over instead.
        self._owns_backend = owns_upstream if owns_upstream is not None else upstream is None
        if upstream is None:
            from ..upstream.lmstudio import LMStudioUpstream
            upstream = LMStudioUpstream(config.upstream)
        self.backend = upstream
        self.clock = clock or SystemClock()
        self.sampler = sampler or self._default_sampler()
        mem = config.memory
        self._gauge = PressureGauge(mem.max_memory_usage_percent, mem.min_free_memory_gb * GB)
        self._aliases = config.alias_map()
        self._entries: dict[str, ModelEntry] = {}
        self._usage: dict[str, ModelUsage] = {}
        self._priority_override: dict[str, int] = {}
        self.api_level: ApiLevel | None = None
        self.upstream_ok = False
        self.upstream_error: str | None = None
        self._upstream_error_type: type[UpstreamError] = UpstreamError
        self._admission = asyncio.Lock()
        self._room = asyncio.Event()
        self._mem_epoch = 0          # bumps on every load/unload: footprints learn only when still
        self._status_epoch = 0
        self._status_epochs: dict[str, int] = {}
        self._queued = 0
        self._active: set[Lease] = set()
        self._last_catalog_refresh_s = -1e9
        self._last_sample: MemorySample | None = None
        self._tasks: list[asyncio.Task] = []
        self._hook_tasks: set[asyncio.Task] = set()
        self.on_model_loaded: Callable[..., Any] | None = None
        self.on_model_unloaded: Callable[..., Any] | None = None
        self.on_memory_pressure: Callable[..., Any] | None = None
        self.listeners: list[Any] = []   # see add_listener()
        self._request_hooks: list[Callable[[RequestRecord], None]] = []
        self.store = store
        self._pending_minutes: dict[tuple[str, int], list[float]] = {}
        self._dirty_stats: set[str] = set()
        self._dirty_footprints: set[str] = set()
        self._restored_footprints: dict[str, dict[str, Any]] = {}

    def apply_config(self, config: Config) -> None:
        """Take a reloaded config without unloading anything: priorities, pins, TTLs, aliases,
        policy and memory thresholds count from the next decision on. (Sampler kind, loop
        intervals and the upstream need a restart.)"""
        self.config = config
        self._aliases = config.alias_map()
        mem = config.memory
        self._gauge.max_usage_percent = mem.max_memory_usage_percent
        self._gauge.min_free_bytes = mem.min_free_memory_gb * GB
        if isinstance(self.sampler, BudgetSampler) and mem.budget_gb is not None:
            self.sampler.budget_bytes = int(mem.budget_gb * GB)
        self._room.set()   # a load queued for memory may fit under the new limits

    # -- construction helpers ----------------------------------------------------------------
    def _default_sampler(self) -> MemorySampler:
        mem = self.config.memory
        if mem.sampler == "budget":
            assert mem.budget_gb is not None
            return BudgetSampler(int(mem.budget_gb * GB), self._charged_bytes)
        return PsutilSampler(gpu=NvmlSampler.create())

    def _charged_bytes(self) -> float:
        return sum(self.footprint_bytes(e) for e in self._entries.values()
                   if e.status in (S.LOADED, S.LOADING, S.UNLOADING))

    # -- lifecycle of the manager itself -----------------------------------------------------
    async def start(self) -> None:
        """Connect to the upstream, learn its API level and what it has loaded. Never raises for
        an unreachable upstream: the manager keeps trying in its reconcile loop."""
        start = getattr(self.backend, "start", None)
        if start is not None:
            await start()   # idempotent: the app may have started it already
        if self.store is not None and self.store._db is None and self.store.error is None:
            if await asyncio.to_thread(self.store.open):
                self._restore(await asyncio.to_thread(self.store.load))
        await self.reconcile()
        await self.sample_memory()

    async def start_monitoring(self) -> None:
        if self._tasks:
            return
        if self.api_level is None and not self.upstream_ok:
            await self.start()
        intervals = [("monitor", self.config.memory.monitoring_interval, self._monitor_tick),
                     ("idle", min(60.0, self.config.memory.monitoring_interval),
                      self.unload_idle_models),
                     ("reconcile", self.config.upstream.reconcile_interval_s, self.reconcile)]
        if self.store is not None:
            intervals.append(("flush", self.config.storage.flush_interval_s, self.flush))
        for name, interval, tick in intervals:
            self._tasks.append(asyncio.create_task(self._loop(name, interval, tick),
                                                   name=f"engine-{name}"))

    async def stop_monitoring(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def cleanup(self) -> None:
        await self.stop_monitoring()
        if self.store is not None:
            await self.flush()
            await asyncio.to_thread(self.store.close)
        for e in self._entries.values():
            if e.load_task is not None and not e.load_task.done():
                e.load_task.cancel()
        close = getattr(self.backend, "close", None)
        if self._owns_backend and close is not None:
            await close()

    async def __aenter__(self) -> "ModelMemoryManager":
        await self.start()
        await self.start_monitoring()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cleanup()

    async def _loop(self, name: str, interval_s: float, tick: Callable[[], Awaitable]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("engine %s loop failed; continuing", name)

    # -- model identity ----------------------------------------------------------------------
    @property
    def manages_loading(self) -> bool:
        return self.api_level is ApiLevel.MANAGED

    def known_models(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, name: str) -> ModelEntry | None:
        return self._entries.get(self._aliases.get(name, name))

    async def resolve(self, name: str) -> str:
        """Alias or key → model key; refreshes the catalogue once before giving up."""
        key = self._aliases.get(name, name)
        if key in self._entries:
            return key
        for e in self._entries.values():
            if key in e.instance_ids:
                return e.key
        now = self.clock.now()
        if now - self._last_catalog_refresh_s >= CATALOG_REFRESH_MIN_S:
            await self.reconcile()
            if key in self._entries:
                return key
        if not self._entries and not self.upstream_ok:
            raise self._upstream_failure()
        names = list(self._entries) + list(self._aliases)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
        hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""
        raise ModelNotFound(f"The model '{name}' does not exist.{hint}", param="model")

    def _upstream_failure(self) -> UpstreamError:
        return self._upstream_error_type(self.upstream_error or "the upstream has not answered")

    def priority(self, key: str) -> int:
        return self._priority_override.get(key) or self.config.model(key).priority

    def footprint_bytes(self, e: ModelEntry) -> float:
        override = self.config.model(e.key).footprint_gb
        if override is not None:
            return override * GB
        if e.footprint_bytes is not None:
            return e.footprint_bytes
        if e.size_bytes:
            return e.size_bytes * self.config.memory.footprint_factor
        return DEFAULT_FOOTPRINT_BYTES

    # -- the request path --------------------------------------------------------------------
    async def acquire(self, name: str) -> Lease:
        """A lease on a resident model, loading it first if needed; raises ProxyError."""
        e = self._entries.get(self._aliases.get(name, name))
        if e is not None and (e.status is S.LOADED or not self.manages_loading):
            return self._lease(e)   # hot path: no lock, no await
        if e is None:
            e = self._entries[await self.resolve(name)]
        while True:
            if e.status is S.LOADED or not self.manages_loading:
                return self._lease(e)
            if e.status is S.ERROR and self.clock.now() < e.retry_at_s:
                raise ModelLoadFailed(e.last_error or f"'{e.key}' failed to load",
                                      retry_after_s=e.retry_at_s - self.clock.now())
            if e.load_task is None or e.load_task.done():
                e.load_task = asyncio.create_task(self._load(e), name=f"load:{e.key}")
            if e.waiting == 0:
                e.waiting_since_s = self.clock.now()
            e.waiting += 1
            try:
                await asyncio.shield(e.load_task)
            finally:
                e.waiting -= 1
                if e.waiting == 0:
                    e.waiting_since_s = None
                    if not e.load_task.done() and e.status is not S.LOADING:
                        # Everyone waiting went away while it queued for memory: leave the
                        # queue instead of loading a model nobody asked for any more.
                        e.load_task.cancel()

    def _lease(self, e: ModelEntry) -> Lease:
        now = self.clock.now()
        e.heat = e.heat * 0.5 ** ((now - e.heat_at_s) / HEAT_HALF_LIFE_S) + 1.0
        e.heat_at_s = now
        e.last_used_at_s = now
        lease = Lease(e, self._on_release, now)
        self._active.add(lease)
        return lease

    def _on_release(self, lease: Lease) -> None:
        self._active.discard(lease)
        lease.entry.last_used_at_s = self.clock.now()
        if lease.entry.leases == 0:
            self._room.set()

    def active_leases(self) -> list[Lease]:
        return list(self._active)

    def record(self, r: RequestRecord) -> None:
        """Account a finished request; names that are not known models are not kept."""
        usage = self._usage.get(r.model)
        if usage is None and r.model in self._entries:
            usage = self._usage[r.model] = ModelUsage()
        if usage is not None:
            usage.record(r)
            if self.store is not None:
                minute_key = (r.model, int(self.clock.wall() // 60))
                slot = self._pending_minutes.get(minute_key)
                if slot is None:
                    slot = self._pending_minutes[minute_key] = [0, 0, 0, 0, 0.0]
                slot[0] += 1
                slot[1] += 0 if r.ok else 1
                slot[2] += r.prompt_tokens
                slot[3] += r.completion_tokens
                slot[4] += r.latency_s
                self._dirty_stats.add(r.model)
        for hook in self._request_hooks:
            hook(r)

    def add_listener(self, listener: Any) -> None:
        """Subscribe to engine events: any of on_request(record), on_load(model, duration_s,
        ok), on_unload(model, reason), on_queue_wait(model, seconds)."""
        self.listeners.append(listener)
        hook = getattr(listener, "on_request", None)
        if hook is not None:
            self._request_hooks.append(hook)

    def usage(self, key: str) -> ModelUsage:
        return self._usage.get(key) or ModelUsage()

    # -- persistence -------------------------------------------------------------------------
    def _restore(self, state: dict[str, Any]) -> None:
        for key, snap in state["stats"].items():
            self._usage[key] = restore_usage(snap)
        self._restored_footprints = state["footprints"]
        for key, e in self._entries.items():
            self._apply_footprint(e)
        log.info("restored statistics of %d models from %s", len(state["stats"]),
                 self.store.path if self.store else "?")

    def _apply_footprint(self, e: ModelEntry) -> None:
        saved = self._restored_footprints.pop(e.key, None)
        if saved is not None:
            e.footprint_bytes, e.footprint_samples = saved["footprint_bytes"], saved["samples"]
            e.load_time_s, e.load_count = saved["load_time_s"], saved["load_count"]

    async def flush(self) -> None:
        """Write what changed since the last flush, off the event loop, in one transaction."""
        if self.store is None or self.store._db is None:
            return
        if not (self._pending_minutes or self._dirty_stats or self._dirty_footprints):
            return
        minutes, self._pending_minutes = self._pending_minutes, {}
        stats = {k: snapshot_usage(self._usage[k]) for k in self._dirty_stats
                 if k in self._usage}
        footprints = {k: {"footprint_bytes": e.footprint_bytes, "samples": e.footprint_samples,
                          "load_time_s": e.load_time_s, "load_count": e.load_count}
                      for k in self._dirty_footprints if (e := self._entries.get(k))}
        self._dirty_stats, self._dirty_footprints = set(), set()
        await asyncio.to_thread(self.store.write, minutes, stats, footprints,
                                int(self.clock.wall() // 60))

    # -- loading -----------------------------------------------------------------------------
    async def _load(self, e: ModelEntry) -> None:
        await e.settled.wait()          # an unload in progress finishes first
        if e.status is S.LOADED:
            return
        started_s = self.clock.now()
        before = await self._admit(e)
        if e.status is S.LOADED:
            return
        epoch = self._mem_epoch
        log.info("loading %s (footprint %.1f GB)", e.key, self.footprint_bytes(e) / GB)
        try:
            result, adopted = await self._load_with_retry(e)
        except BaseException as exc:
            self._mem_epoch += 1
            self._fail_load(e, exc)
            raise
        self._mem_epoch += 1
        duration_s = self.clock.now() - started_s
        e.instance_ids = (result.instance_id,)
        e.loaded_at_s = e.last_used_at_s = self.clock.now()
        e.load_failures = 0
        e.last_error = None
        if not adopted:
            e.learn_load_time(result.load_time_s if result.load_time_s else duration_s)
            self._dirty_footprints.add(e.key)
        self._set_status(e, S.LOADED)
        e.owned = not adopted
        after = await self.sample_memory()
        if self.sampler.local and before is not None and epoch + 1 == self._mem_epoch:
            drop = before.available_bytes - after.available_bytes
            if drop > 0.05 * self.footprint_bytes(e):
                e.learn_footprint(drop)
        log.info("loaded %s in %.2fs", e.key, duration_s)
        self._notify("on_load", e.key, duration_s, True)
        self._call_hook(self.on_model_loaded, e.key)

    async def _load_with_retry(self, e: ModelEntry) -> tuple[LoadResult, bool]:
        """Load e, or adopt it (True) when someone loaded it meanwhile: asking LM Studio to
        load a loaded model would create a duplicate instance."""
        options = dict(self.config.model(e.key).load)
        current = await self._upstream_instances(e.key)
        if current:
            return LoadResult(current[0], None), True
        try:
            return await self.backend.load(e.key, options), False
        except ModelLoadFailed as exc:
            if not exc.out_of_memory:
                raise
            log.warning("%s refused for lack of memory; evicting and retrying once", e.key)
            async with self._admission:
                freed = await self._evict_for(self.footprint_bytes(e), exclude=e.key,
                                              critical=True, reason="admission", partial=True)
            if not freed:
                raise
            return await self.backend.load(e.key, options), False

    async def _upstream_instances(self, key: str) -> tuple[str, ...]:
        try:
            models = await self.backend.list_models()
        except UpstreamError:
            return ()
        for m in models:
            if m.key == key:
                return m.instance_ids
        return ()

    def _fail_load(self, e: ModelEntry, exc: BaseException) -> None:
        if e.status is not S.LOADING:
            return
        if isinstance(exc, (asyncio.CancelledError, InsufficientMemory)):
            self._set_status(e, S.UNLOADED)
            return
        e.load_failures += 1
        e.last_error = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        e.retry_at_s = self.clock.now() + min(60.0, 2.0 ** (e.load_failures - 1))
        self._set_status(e, S.ERROR)
        log.warning("loading %s failed: %s", e.key, e.last_error)
        self._notify("on_load", e.key, 0.0, False)

    async def _admit(self, e: ModelEntry) -> MemorySample | None:
        """Make room for e's footprint, then mark it loading; serialized, FIFO, with deadline."""
        timeout_s = self.config.eviction.queue_timeout_s
        self._queued += 1   # waiting for admission: behind the lock or for room
        queued_at = self.clock.now()
        try:
            async with asyncio.timeout(timeout_s):
                async with self._admission:
                    sample = await self._make_room(e)
                    if e.status is S.LOADED:   # loaded by someone else while it queued
                        return None
                    self._set_status(e, S.LOADING)
                    e.loading_since_s = self.clock.now()
                    self._notify("on_queue_wait", e.key, e.loading_since_s - queued_at)
                    return sample
        except TimeoutError:
            raise InsufficientMemory(
                f"Not enough memory to load '{e.key}' ({self.footprint_bytes(e) / GB:.1f} GB) "
                f"within {timeout_s:g}s: the models holding memory are pinned or serving.",
                retry_after_s=max(1.0, min(30.0, timeout_s))) from None
        finally:
            self._queued -= 1

    async def _make_room(self, e: ModelEntry) -> MemorySample:
        need = self.footprint_bytes(e)
        while True:
            sample = await self.sample_memory()
            headroom = self._headroom(sample)
            if headroom >= need:
                return sample
            if need > sample.total_bytes:
                raise InsufficientMemory(f"'{e.key}' needs {need / GB:.1f} GB, more than the "
                                         f"{sample.total_bytes / GB:.1f} GB there are")
            if await self._evict_for(need - headroom, exclude=e.key,
                                     critical=self.memory_pressure is MemoryPressure.CRITICAL,
                                     reason="admission"):
                continue
            self._room.clear()
            log.info("%s waits for memory (%.1f GB short)", e.key, (need - headroom) / GB)
            try:   # wake on a release or unload, or when a young model may be evicted
                await asyncio.wait_for(self._room.wait(), self._next_residency_expiry_s())
            except TimeoutError:
                pass

    def _next_residency_expiry_s(self) -> float | None:
        """Seconds until the first loaded model outgrows eviction.min_residency_s."""
        now, residency = self.clock.now(), self.config.eviction.min_residency_s
        waits = [e.loaded_at_s + residency - now for e in self._entries.values()
                 if e.status is S.LOADED and e.loaded_at_s is not None
                 and e.loaded_at_s + residency > now]
        return max(0.01, min(waits)) if waits else None

    def _headroom(self, s: MemorySample) -> float:
        """Bytes a new load may take now, keeping min_free and the usage ceiling."""
        mem = self.config.memory
        reserved = 0.0
        if self.sampler.local:  # loads in flight have not taken their memory yet
            reserved = sum(self.footprint_bytes(x) for x in self._entries.values()
                           if x.status is S.LOADING)
        available = s.available_bytes - reserved
        by_free = available - mem.min_free_memory_gb * GB
        by_ceiling = s.total_bytes * mem.max_memory_usage_percent / 100.0 - (
            s.total_bytes - available)
        return min(by_free, by_ceiling)

    # -- eviction ----------------------------------------------------------------------------
    def _candidates(self, exclude: str | None, critical: bool) -> list[Candidate]:
        now = self.clock.now()
        ev = self.config.eviction
        out = []
        for e in self._entries.values():
            if e.status is not S.LOADED or e.leases or e.key == exclude:
                continue
            if self.config.model(e.key).pinned or not (e.owned or ev.manage_external):
                continue
            if not critical and now - (e.loaded_at_s or now) < ev.min_residency_s:
                continue
            out.append(Candidate(
                key=e.key, footprint_bytes=self.footprint_bytes(e),
                last_used_s=e.last_used_at_s or e.loaded_at_s or now,
                priority=self.priority(e.key),
                reload_s=e.load_time_s if e.load_time_s is not None else
                self.footprint_bytes(e) / GB,
                rate_per_h=self.usage(e.key).rate_per_h(now),
                heat=e.heat * 0.5 ** ((now - e.heat_at_s) / HEAT_HALF_LIFE_S)))
        return out

    async def _evict_for(self, need_bytes: float, *, exclude: str | None, critical: bool,
                         reason: str, partial: bool = False) -> bool:
        victims = select_victims(self.config.eviction.policy,
                                 self._candidates(exclude, critical), need_bytes,
                                 self.clock.now(), partial=partial)
        for key in victims:
            await self._unload(self._entries[key], reason)
        return bool(victims)

    async def _unload(self, e: ModelEntry, reason: str) -> None:
        """Unload an idle model (caller checked leases == 0) and wait for its memory."""
        if e.status is not S.LOADED or e.leases:
            return
        # Only a footprint we measured is worth waiting for; an estimate may never come back.
        learned = e.footprint_bytes if self.config.model(e.key).footprint_gb is None else None
        before = await self.sample_memory() if self.sampler.local and learned else None
        self._set_status(e, S.UNLOADING)
        try:
            for instance_id in e.instance_ids or (e.key,):
                await self.backend.unload(instance_id)
        except BaseException:
            self._set_status(e, S.LOADED)
            raise
        self._mem_epoch += 1
        e.evictions[reason] += 1
        self._set_status(e, S.UNLOADED)
        log.info("unloaded %s (%s)", e.key, reason)
        if before is not None and learned:
            await self._await_reclaim(before.available_bytes + 0.5 * learned)
        self._room.set()
        self._notify("on_unload", e.key, reason)
        self._call_hook(self.on_model_unloaded, e.key)

    async def _await_reclaim(self, target_available_bytes: float) -> None:
        """After an unload, memory returns to the OS a little later; admit nothing before."""
        deadline = self.clock.now() + self.config.memory.reclaim_timeout_s
        while True:
            s = await self.sample_memory()
            if s.available_bytes >= target_available_bytes or self.clock.now() >= deadline:
                return
            await asyncio.sleep(0.05)

    # -- background work ---------------------------------------------------------------------
    async def sample_memory(self) -> MemorySample:
        if self.sampler.blocking:
            s = await asyncio.to_thread(self.sampler.sample)
        else:
            s = self.sampler.sample()
        self._last_sample = s
        old = self._gauge.level
        new = self._gauge.update(s)
        if new is not old:
            log.log(logging.WARNING if new.rank > old.rank else logging.INFO,
                    "memory pressure %s → %s (%.0f%% used, %.1f GB free)", old.value,
                    new.value, s.used_percent, s.available_bytes / GB)
            self._call_hook(self.on_memory_pressure, new)
        return s

    async def _monitor_tick(self) -> None:
        await self.sample_memory()
        await self.relieve_pressure()

    async def relieve_pressure(self) -> list[str]:
        """At high pressure evict by policy until back to normal; at critical, escalate."""
        if self.memory_pressure is MemoryPressure.CRITICAL:
            return await self._handle_critical_memory()
        return await self._evict_until_normal(critical=False)

    async def _handle_critical_memory(self) -> list[str]:
        """Critical memory; overridable. By default: evict idle models by policy, ignoring
        min residency, until pressure is back to normal."""
        log.error("critical memory pressure; evicting idle models regardless of residency")
        return await self._evict_until_normal(critical=True)

    async def _evict_until_normal(self, *, critical: bool) -> list[str]:
        evicted: list[str] = []
        while self.memory_pressure.rank >= MemoryPressure.HIGH.rank:
            s = self._last_sample
            assert s is not None
            # Free enough to get below the threshold by the gauge's hysteresis margin.
            need = 0.03 * s.total_bytes - self._headroom(s)
            before = set(self.get_loaded_models())
            async with self._admission:
                ok = await self._evict_for(max(need, 1.0), exclude=None, critical=critical,
                                           reason="pressure", partial=True)
            evicted += sorted(before - set(self.get_loaded_models()))
            if not ok:
                break
            await self.sample_memory()
        return evicted

    async def unload_idle_models(self) -> list[str]:
        now = self.clock.now()
        default_ttl_s = self.config.eviction.model_timeout_hours * 3600.0
        out = []
        for e in list(self._entries.values()):
            if e.status is not S.LOADED or e.leases or not e.owned:
                continue
            cfg = self.config.model(e.key)
            ttl_s = cfg.ttl_s if cfg.ttl_s is not None else default_ttl_s
            if cfg.pinned or ttl_s <= 0:
                continue
            if now - (e.last_used_at_s or e.loaded_at_s or now) >= ttl_s:
                await self._unload(e, "idle")
                out.append(e.key)
        return out

    async def reconcile(self) -> None:
        """Align our view with the server: models loaded or unloaded by others, restarts."""
        self._last_catalog_refresh_s = self.clock.now()
        epoch = self._status_epoch
        try:
            if self.api_level is None:
                self.api_level = await self.backend.detect()
                log.info("upstream speaks %s%s", self.api_level.value,
                         "" if self.manages_loading else
                         ": loading is left to the server's own JIT")
            models = await self.backend.list_models()
        except UpstreamError as exc:
            if self.upstream_ok:
                log.warning("upstream unavailable: %s", exc.message)
            self.upstream_ok, self.upstream_error = False, exc.message
            self._upstream_error_type = type(exc)
            return
        self.upstream_ok, self.upstream_error = True, None
        for m in models:
            self._reconcile_one(m, epoch)

    def _reconcile_one(self, m: UpstreamModel, epoch: int) -> None:
        e = self._entries.get(m.key)
        if e is None:
            e = self._entries[m.key] = ModelEntry(m.key)
            self._apply_footprint(e)
        e.type, e.size_bytes = m.type, m.size_bytes or e.size_bytes
        if self._status_epochs.get(m.key, -1) > epoch:
            return   # changed by us while the list was in flight; the list is stale for it
        if m.loaded:
            e.instance_ids = m.instance_ids
            if e.status in (S.UNLOADED, S.ERROR):
                self._set_status(e, S.LOADED)
                e.owned = False
                e.loaded_at_s = e.last_used_at_s = self.clock.now()
                log.info("%s was loaded outside the proxy", m.key)
        elif e.status is S.LOADED and self.api_level is not ApiLevel.JIT_ONLY:
            log.info("%s was unloaded outside the proxy", m.key)
            self._set_status(e, S.UNLOADED)
            self._room.set()

    def _set_status(self, e: ModelEntry, status: ModelStatus) -> None:
        transition(e, status)
        self._status_epoch += 1
        self._status_epochs[e.key] = self._status_epoch

    def _notify(self, event: str, *args: Any) -> None:
        for listener in self.listeners:
            hook = getattr(listener, event, None)
            if hook is not None:
                hook(*args)

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
    def memory_pressure(self) -> MemoryPressure:
        return self._gauge.level

    @property
    def model_status(self) -> dict[str, ModelStatus]:
        return {k: e.status for k, e in self._entries.items()}

    @property
    def model_metrics(self) -> dict[str, ModelMetrics]:
        now = self.clock.now()
        return {k: ModelMetrics(self.usage(k), e, self.footprint_bytes(e), now)
                for k, e in self._entries.items()}

    @property
    def queue_length(self) -> int:
        return self._queued

    @property
    def last_sample(self) -> MemorySample | None:
        return self._last_sample

    def get_loaded_models(self) -> list[str]:
        return sorted(k for k, e in self._entries.items() if e.status is S.LOADED)

    async def load_model(self, name: str, priority: int | None = None) -> bool:
        key = await self.resolve(name)
        if priority is not None:
            if not 1 <= priority <= 10:
                raise InvalidRequest("priority must be 1..10", param="priority")
            self._priority_override[key] = priority
        if not self.manages_loading:
            raise ModelUnavailable(f"the upstream ({self.api_level.value if self.api_level else 'unknown'}) "
                                   "cannot load models on request")
        lease = await self.acquire(key)
        lease.release()
        return True

    async def unload_model(self, name: str, *, reason: str = "manual",
                           drain_timeout_s: float | None = None) -> bool:
        """Unload after in-flight requests finish (never cut a generation)."""
        e = self._entries[await self.resolve(name)]
        timeout_s = drain_timeout_s if drain_timeout_s is not None else \
            self.config.eviction.queue_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                while e.status in (S.LOADING, S.UNLOADING) or e.leases:
                    if e.leases:
                        await e.drained.wait()
                    elif e.load_task is not None and not e.load_task.done():
                        await asyncio.wait([e.load_task])
                    else:
                        await e.settled.wait()
        except TimeoutError:
            raise ModelUnavailable(f"'{e.key}' is still serving {e.leases} request(s) after "
                                   f"{timeout_s:g}s; not unloaded", retry_after_s=timeout_s
                                   ) from None
        if e.status is not S.LOADED:
            return False
        async with self._admission:
            await self._unload(e, reason)
        return e.status is S.UNLOADED

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
        cleared = []
        for key in self.get_loaded_models():
            e = self._entries[key]
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
        key = self._aliases.get(model, model)
        self.record(RequestRecord(model=key, ok=success, latency_s=latency,
                                  at_s=self.clock.now(), completion_tokens=tokens_used))

    def get_model_recommendations(self, context: Mapping[str, Any] | str | None = None
                                  ) -> list[dict[str, Any]]:
        now = self.clock.now()
        facts = [ModelFacts(key=k, type=e.type, loaded=e.status is S.LOADED,
                            footprint_bytes=self.footprint_bytes(e),
                            requests=self.usage(k).requests,
                            success_rate=self.usage(k).success_rate,
                            avg_latency_s=self.usage(k).latency.mean,
                            rate_per_h=self.usage(k).rate_per_h(now), priority=self.priority(k))
                 for k, e in self._entries.items()]
        headroom = self._headroom(self._last_sample) if self._last_sample else 0.0
        return recommend(facts, context, headroom)

    def get_memory_stats(self) -> dict[str, Any]:
        now = self.clock.now()
        s = self._last_sample
        counts = {st.value: 0 for st in ModelStatus}
        for e in self._entries.values():
            counts[e.status.value] += 1
        models = {}
        for k, e in sorted(self._entries.items()):
            u = self.usage(k)
            models[k] = {
                "state": e.status.value, "owner": "proxy" if e.owned else "external"
                if e.status is S.LOADED else None,
                "type": e.type, "priority": self.priority(k),
                "pinned": self.config.model(k).pinned,
                "estimated_memory_mb": round(self.footprint_bytes(e) / 1e6),
                "footprint_learned": e.footprint_bytes is not None,
                "leases": e.leases, "loads": e.load_count,
                "avg_load_time_s": None if e.load_time_s is None else round(e.load_time_s, 3),
                "evictions": dict(e.evictions), "last_error": e.last_error,
                "last_used_s_ago": None if e.last_used_at_s is None else
                round(now - e.last_used_at_s, 1),
                **u.summary(now)}
        top = sorted(((k, self.usage(k)) for k in self._entries if self.usage(k).requests),
                     key=lambda kv: (-kv[1].rate_per_h(now), -kv[1].requests))[:5]
        return {
            "system_memory": None if s is None else {
                "total_gb": round(s.total_bytes / GB, 2),
                "available_gb": round(s.available_bytes / GB, 2),
                "used_percent": round(s.used_percent, 1)},
            "gpu_memory": [{"index": g.index, "name": g.name,
                            "total_gb": round(g.total_bytes / GB, 2),
                            "used_gb": round(g.used_bytes / GB, 2)}
                           for g in s.gpus] if s is not None and s.gpus else None,
            "memory_pressure": self.memory_pressure.value,
            "sampler": self.config.memory.sampler,
            "policy": self.config.eviction.policy,
            "upstream": {"ok": self.upstream_ok, "api_level": None if self.api_level is None
                         else self.api_level.value, "error": self.upstream_error},
            "model_counts": counts,
            "loaded_models": self.get_loaded_models(),
            "queue_length": self._queued,
            "persistence": None if self.store is None else {
                "ok": self.store.ok, "path": str(self.store.path), "error": self.store.error},
            "top_models_by_usage": [
                {"model": k, "frequency": u.rate_per_h(now), "requests": u.requests,
                 "success_rate": round(u.success_rate, 4),
                 "avg_latency_ms": None if u.latency.mean is None
                 else round(u.latency.mean * 1000, 2)} for k, u in top],
            "models": models,
        }
