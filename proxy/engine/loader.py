"""Loading one admitted model: adopt an instance someone else made, else load it, retry once
after evicting when the server refuses for lack of memory, and learn what the load cost.

A footprint is learned only from a drop in available memory that the sampler can really see:
a local sampler, an upstream on this host, no other load or unload in between, and a value
within PLAUSIBLE_FOOTPRINT of the model's file size. Anything else is noise.

A refusal for lack of memory teaches a lower bound instead (`footprint_floor_bytes`): the model
needs more than the memory it was refused in. While that bound holds, nothing is evicted for
the model again (the scheduler refuses it unless it fits as things are), so a model whose file
understates its memory cannot empty the cache on every retry. A load that succeeds clears it.

The proxy owns what it loads from the moment the load completes: ownership is committed before
the model serves. A load that timed out may still complete on the server; it is the proxy's
too (`unfinished_since_s`, claimed here or by the reconcile loop).
"""
from __future__ import annotations

import asyncio
import logging

from ..urls import is_local_url
from ..errors import ModelLoadFailed, StateUnavailable, UpstreamError, UpstreamUnreachable
from ..upstream.base import LoadResult
from .context import EngineContext, Part
from .eviction import Evictor
from .fit import Fitter
from .lifecycle import OWNER_EXTERNAL, OWNER_PROXY, ModelEntry, ModelStatus
from .memory import GB, MemorySample
from .shared_load import RoomTaken

log = logging.getLogger("proxy.engine")
S = ModelStatus
PLAUSIBLE_FOOTPRINT = (0.5, 3.0)   # learned footprint / file size outside this is rejected
ERROR_BACKOFF_MAX_S = 60.0


class Loader(Part):
    def __init__(self, ctx: EngineContext, evictor: Evictor) -> None:
        super().__init__(ctx)
        self.evictor = evictor
        self.fit = Fitter(ctx)

    @property
    def learns_footprints(self) -> bool:
        return self.monitor.sampler.local and is_local_url(self.registry.config.upstream.url)

    async def load(self, e: ModelEntry, before: MemorySample | None) -> None:
        """e is LOADING (admitted); leave it LOADED or ERROR/UNLOADED, raising on failure."""
        started_s = self.clock.now()
        changes = self.monitor.changes
        alone = not any(x.status is S.LOADING for x in self.registry if x is not e)
        options = self.fit.load_options(e, dict(self.registry.config.model(e.key).load))
        log.info("loading %s (footprint %.1f GB, %s)", e.key,
                 self.registry.footprint_bytes(e) / GB, self.registry.footprint_source(e))
        try:
            result, loaded_now = await self._load_or_adopt(e, options)
        except BaseException as exc:
            self.monitor.changes += 1
            if _may_complete_later(exc):
                e.unfinished_since_s = started_s
            self._fail(e, exc)
            if not isinstance(exc, asyncio.CancelledError):
                await self.monitor.sample()   # whatever the attempt left, seen at once
            raise
        self.monitor.changes += 1
        duration_s = self.clock.now() - started_s
        ours = e.claim_unfinished(self.clock.now()) or loaded_now
        e.instance_ids = (result.instance_id,)
        e.loaded_at_s = e.last_used_at_s = self.clock.now()
        e.load_failures = 0
        e.last_error = None
        self._fitted(e)
        if loaded_now:
            e.learn_load_time(result.load_time_s if result.load_time_s else duration_s)
            self.fit.loaded(e, options, result.context_length)
        else:                                   # adopted: the server's list tells its context
            self.fit.unsettle(e)
        fleet = False          # adopted: another replica's load of it, as the fleet records
        try:
            if ours:
                self.accounting.remember_owned(e, result.instance_id, options)
                await self.accounting.commit_ownership()   # durable before it serves
            elif self.ctx.shared is not None:
                fleet = await self.ctx.shared.fleet_copy(e.key, result.instance_id)
        finally:                                # even if cancelled meanwhile: it is loaded
            self.ctx.swap(e, S.LOADING, S.LOADED)
            e.owner = OWNER_PROXY if ours or fleet else OWNER_EXTERNAL
        after = await self.monitor.sample()    # the pressure level sees the load at once
        alone = alone and not any(x.status is S.LOADING for x in self.registry if x is not e)
        if before is not None and self.learns_footprints and alone and \
                changes + 1 == self.monitor.changes:
            self._learn_footprint(e, before, after)
        if loaded_now:
            self.accounting.footprint_changed(e)
        if fleet:
            # Another replica's load, counted and told (its load event) there: here it was
            # waited for, not loaded, or every replica that joined would count one more load.
            log.info("%s loaded by another replica; waited %.2fs for it", e.key, duration_s)
            return
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
        self.accounting.footprint_changed(e)    # its load time is kept with the footprint
        self._fitted(e)
        self.ctx.swap(e, S.LOADING, S.LOADED)
        e.owner = owner
        if self.registry.config.native.evict != "never":
            # Once its client is gone the model is the proxy's to manage, after a restart too;
            # the reconcile the mediator awaits before the client hears of it writes this.
            self.accounting.remember_owned(e, instance_id, {})
        self.monitor.sample_soon()
        log.info("%s loaded by %s in %.2fs", e.key, owner, duration_s)
        self.listeners.emit("on_load", e.key, duration_s, True)

    def abandoned(self, e: ModelEntry) -> None:
        """An admitted load that nobody performed: back to unloaded, no backoff."""
        self._fail(e, asyncio.CancelledError())

    def mediated_failed(self, e: ModelEntry, exc: BaseException) -> None:
        self.monitor.changes += 1
        self._fail(e, exc)
        self.monitor.sample_soon()

    def mediated_left(self, e: ModelEntry, sent: bool) -> None:
        """Its requester left before the server answered: unloaded as far as the engine knows,
        no backoff. An instance the server finishes anyway is the proxy's to manage, like a late
        load of its own (reconcile claims it, unloads it unless a request wants it), except
        under native.evict: never, where SDK clients' models are left alone."""
        self.monitor.changes += 1
        if sent and self.registry.config.native.evict != "never":
            e.unfinished_since_s = e.loading_since_s or self.clock.now()
        self.ctx.swap(e, S.LOADING, S.UNLOADED)
        self.monitor.sample_soon()
        log.info("the load of %s was left by its requester; unloaded unless the server "
                 "finishes it", e.key)

    def _fitted(self, e: ModelEntry) -> None:
        """It loaded: a lower bound learned from a refusal is revised by the facts."""
        if e.footprint_floor_bytes is not None:
            e.footprint_floor_bytes = None
            self.accounting.footprint_changed(e)

    def _learn_footprint(self, e: ModelEntry, before: MemorySample, after: MemorySample
                         ) -> None:
        drop = before.available_bytes - after.available_bytes
        if not e.size_bytes:
            return
        lo, hi = PLAUSIBLE_FOOTPRINT
        if lo * e.size_bytes <= drop <= hi * e.size_bytes:
            if not self.fit.learned(e, drop):
                e.learn_footprint(drop)
        else:
            log.info("%s: a drop of %.2f GB across its load is not plausible for a %.2f GB "
                     "file; footprint not learned", e.key, drop / GB, e.size_bytes / GB)

    async def _load_or_adopt(self, e: ModelEntry, options: dict) -> tuple[LoadResult, bool]:
        """Load e (True), or adopt it (False) when it is loaded already: asking LM Studio to
        load a loaded model would create a duplicate instance. Among replicas, under the
        (host, model) load lock and a reservation of its memory (engine/shared.py)."""
        shared = self.ctx.shared
        if shared is None:
            return await self._load_or_adopt_here(e, options)
        async with shared.load_slot(
                e, self.registry.footprint_bytes(e), lambda: self._room_for(e),
                loaded=lambda: self._upstream_has(e.key),
                timeout_s=self.registry.config.upstream.load_timeout_s) as token:
            result, loaded_now = await self._load_or_adopt_here(e, options)
            if loaded_now:
                await shared.owned.loaded(result.instance_id, e.key, token)
            return result, loaded_now

    async def _room_for(self, e: ModelEntry) -> float:
        """Memory the host has for loads, as its own list says now: the ceiling less what it
        holds resident (other replicas' loads in flight are their reservations)."""
        try:
            models = await self.backend.list_models()
        except UpstreamError:
            models = []
        entries = self.registry.entries
        resident = sum(self.registry.footprint_bytes(entries[m.key]) * len(m.instance_ids)
                       for m in models if m.loaded and m.key != e.key and m.key in entries)
        s = self.monitor.last_sample or await self.monitor.sample()
        return self.monitor.ceiling_bytes(s) - resident

    async def _upstream_has(self, key: str) -> bool:
        return bool(await self._upstream_instances(key))

    async def _load_or_adopt_here(self, e: ModelEntry, options: dict
                                  ) -> tuple[LoadResult, bool]:
        current = await self._upstream_instances(e.key)
        if current:
            return LoadResult(current[0], None), False
        try:
            return await self.backend.load(e.key, options), True
        except ModelLoadFailed as exc:
            # Among replicas another one's loads may hold the memory it was refused for: the
            # refusal says nothing about this model's need (it fails, with the usual backoff).
            if not exc.out_of_memory or self.ctx.shared is not None:
                raise
            known = self.registry.footprint_floor_bytes(e) is not None
            need = self.registry.footprint_bytes(e)
            floor, ceiling = await self._learn_floor(e)
            if known or floor >= ceiling:
                # Known to fail already, or evicting everything would not make enough room.
                raise self._refused(e, exc) from None
            log.warning("%s refused for lack of memory; evicting and retrying once", e.key)
            async with self.evictor.lock:
                freed = await self.evictor.evict_for(need, exclude=e.key, critical=True,
                                                     reason="admission", partial=True)
            if not freed:
                raise self._refused(e, exc) from None
        try:
            return await self.backend.load(e.key, options), True
        except ModelLoadFailed as exc:
            if not exc.out_of_memory:
                raise
            await self._learn_floor(e)
            raise self._refused(e, exc) from None

    async def _learn_floor(self, e: ModelEntry) -> tuple[float, float]:
        """LM Studio refused e for lack of memory: it needs more than the memory it could have
        used just now. Returns (that bound, the most any one model may take)."""
        own = self.registry.footprint_bytes(e)
        s = await self.monitor.sample()
        if self.monitor.sampler.local:          # other loads in flight will take theirs
            room = s.available_bytes - (self.registry.loading_bytes() - own)
        else:                                   # a budget charges this load while it runs
            room = s.available_bytes + own
        floor = max(room, e.footprint_floor_bytes or 0.0)
        e.footprint_floor_bytes = floor
        self.accounting.footprint_changed(e)
        log.warning("%s was refused for lack of memory with %.1f GB free for it: it needs "
                    "more than that", e.key, floor / GB)
        return floor, self.monitor.ceiling_bytes(s)

    def _refused(self, e: ModelEntry, exc: ModelLoadFailed) -> ModelLoadFailed:
        floor = e.footprint_floor_bytes or 0.0
        return ModelLoadFailed(
            f"{exc.message} It needs more than the {floor / GB:.1f} GB that were free for it; "
            f"no model will be evicted for it again until its footprint is revised (set "
            f"models.{e.key}.footprint_gb to its real need, or free memory so that more than "
            f"{floor / GB:.1f} GB are available).")

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
        # Given up, the replicas' shared state was away, other replicas' loads took its room,
        # or the engine closed (its connection to the server is gone until it starts again):
        # not the model's failure, no backoff.
        if isinstance(exc, (asyncio.CancelledError, StateUnavailable, RoomTaken)) or \
                not getattr(self.backend, "started", True):
            self.ctx.swap(e, S.LOADING, S.UNLOADED)
            return
        if e.status is not S.LOADING:
            return
        e.load_failures += 1
        e.last_error = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        e.failed_unreachable = isinstance(exc, UpstreamUnreachable)
        e.retry_at_s = self.clock.now() + min(ERROR_BACKOFF_MAX_S, 2.0 ** (e.load_failures - 1))
        self.ctx.swap(e, S.LOADING, S.ERROR)
        log.warning("loading %s failed: %s", e.key, e.last_error)
        self.listeners.emit("on_load", e.key, 0.0, False)


def _may_complete_later(exc: BaseException) -> bool:
    """The load request reached the server but its answer did not come back (a timeout, a
    connection cut): the server may still finish the load."""
    return isinstance(exc, UpstreamError) and not isinstance(exc, UpstreamUnreachable)
