"""Loading one admitted model: adopt an instance someone else made, else load it, retry once
after evicting when the server refuses for lack of memory, and learn what the load cost.

A footprint is learned only from a drop in available memory that the sampler can really see:
a local sampler, an upstream on this host, no other load or unload in between, and a value
within PLAUSIBLE_FOOTPRINT of the model's file size. Anything else is noise.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from ..errors import ModelLoadFailed, UpstreamError
from ..upstream.base import LoadResult, ModelBackend
from .accounting import Accounting
from .clock import Clock
from .eviction import Evictor
from .lifecycle import OWNER_EXTERNAL, OWNER_PROXY, ModelEntry, ModelStatus
from .listeners import Listeners
from .memory import GB, MemorySample
from .monitor import MemoryMonitor
from .registry import Registry

log = logging.getLogger("proxy.engine")
S = ModelStatus
PLAUSIBLE_FOOTPRINT = (0.5, 3.0)   # learned footprint / file size outside this is rejected
ERROR_BACKOFF_MAX_S = 60.0


class Loader:
    def __init__(self, registry: Registry, monitor: MemoryMonitor, backend: ModelBackend,
                 evictor: Evictor, accounting: Accounting, listeners: Listeners, clock: Clock,
                 set_status: Callable[[ModelEntry, ModelStatus], None],
                 upstream_is_local: Callable[[], bool]) -> None:
        self.registry = registry
        self.monitor = monitor
        self.backend = backend
        self.evictor = evictor
        self.accounting = accounting
        self.listeners = listeners
        self.clock = clock
        self._set_status = set_status
        self._upstream_is_local = upstream_is_local

    @property
    def learns_footprints(self) -> bool:
        return self.monitor.sampler.local and self._upstream_is_local()

    async def load(self, e: ModelEntry, before: MemorySample | None) -> None:
        """e is LOADING (admitted); leave it LOADED or ERROR/UNLOADED, raising on failure."""
        started_s = self.clock.now()
        changes = self.monitor.changes
        alone = not any(x.status is S.LOADING for x in self.registry if x is not e)
        options = dict(self.registry.config.model(e.key).load)
        log.info("loading %s (footprint %.1f GB, %s)", e.key,
                 self.registry.footprint_bytes(e) / GB, self.registry.footprint_source(e))
        try:
            result, adopted = await self._load_or_adopt(e, options)
        except BaseException as exc:
            self.monitor.changes += 1
            self._fail(e, exc)
            raise
        self.monitor.changes += 1
        duration_s = self.clock.now() - started_s
        e.instance_ids = (result.instance_id,)
        e.loaded_at_s = e.last_used_at_s = self.clock.now()
        e.load_failures = 0
        e.last_error = None
        if not adopted:
            e.learn_load_time(result.load_time_s if result.load_time_s else duration_s)
            self.accounting.remember_owned(e, result.instance_id, options)
        self._set_status(e, S.LOADED)
        e.owner = OWNER_EXTERNAL if adopted else OWNER_PROXY
        after = await self.monitor.sample()    # the pressure level sees the load at once
        alone = alone and not any(x.status is S.LOADING for x in self.registry if x is not e)
        if before is not None and self.learns_footprints and alone and \
                changes + 1 == self.monitor.changes:
            self._learn_footprint(e, before, after)
        if not adopted:
            self.accounting.footprint_changed(e)
        log.info("loaded %s in %.2fs", e.key, duration_s)
        self.listeners.emit("on_load", e.key, duration_s, True)

    def mediated_loaded(self, e: ModelEntry, instance_id: str, owner: str) -> None:
        """A load performed by an SDK client through the proxy finished: e is its owner's."""
        self.monitor.changes += 1
        now = self.clock.now()
        duration_s = now - (e.loading_since_s or now)
        e.instance_ids = (instance_id,)
        e.loaded_at_s = e.last_used_at_s = now
        e.load_failures, e.last_error = 0, None
        e.learn_load_time(duration_s)
        self._set_status(e, S.LOADED)
        e.owner = owner
        log.info("%s loaded by %s in %.2fs", e.key, owner, duration_s)
        self.listeners.emit("on_load", e.key, duration_s, True)

    def abandoned(self, e: ModelEntry) -> None:
        """An admitted load that nobody performed: back to unloaded, no backoff."""
        self._fail(e, asyncio.CancelledError())

    def mediated_failed(self, e: ModelEntry, exc: BaseException) -> None:
        self.monitor.changes += 1
        self._fail(e, exc)

    def _learn_footprint(self, e: ModelEntry, before: MemorySample, after: MemorySample
                         ) -> None:
        drop = before.available_bytes - after.available_bytes
        if not e.size_bytes:
            return
        lo, hi = PLAUSIBLE_FOOTPRINT
        if lo * e.size_bytes <= drop <= hi * e.size_bytes:
            e.learn_footprint(drop)
        else:
            log.info("%s: a drop of %.2f GB across its load is not plausible for a %.2f GB "
                     "file; footprint not learned", e.key, drop / GB, e.size_bytes / GB)

    async def _load_or_adopt(self, e: ModelEntry, options: dict) -> tuple[LoadResult, bool]:
        """Load e, or adopt it (True) when someone loaded it meanwhile: asking LM Studio to
        load a loaded model would create a duplicate instance."""
        current = await self._upstream_instances(e.key)
        if current:
            return LoadResult(current[0], None), True
        try:
            return await self.backend.load(e.key, options), False
        except ModelLoadFailed as exc:
            if not exc.out_of_memory:
                raise
            log.warning("%s refused for lack of memory; evicting and retrying once", e.key)
            async with self.evictor.lock:
                freed = await self.evictor.evict_for(
                    self.registry.footprint_bytes(e), exclude=e.key, critical=True,
                    reason="admission", partial=True)
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

    def _fail(self, e: ModelEntry, exc: BaseException) -> None:
        if e.status is not S.LOADING:
            return
        if isinstance(exc, asyncio.CancelledError):   # given up, not failed: no backoff
            self._set_status(e, S.UNLOADED)
            return
        e.load_failures += 1
        e.last_error = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        e.retry_at_s = self.clock.now() + min(ERROR_BACKOFF_MAX_S, 2.0 ** (e.load_failures - 1))
        self._set_status(e, S.ERROR)
        log.warning("loading %s failed: %s", e.key, e.last_error)
        self.listeners.emit("on_load", e.key, 0.0, False)
