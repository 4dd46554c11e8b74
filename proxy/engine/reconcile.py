"""Reconcile: align the engine's view with what the server really has loaded.

Models loaded or unloaded by others (the GUI, `lms`, a restart of LM Studio) are noticed here.
A loaded instance that this proxy loaded before a restart of its own (remembered by
accounting, with its load options) is re-adopted as the proxy's, and so is one that a load the
proxy gave up waiting for completed late (`ModelEntry.unfinished_since_s`); any other is
someone else's.

The backend's capabilities are learned here with its API level. One that evicts by itself
(`self_evicts`) has a model it dropped recorded as an eviction by the backend; one that
`reports_memory` has its per-model resident bytes kept as the models' footprints.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from ..errors import UpstreamError, UpstreamTimeout
from ..upstream.base import ApiLevel, Capabilities, UpstreamModel, capabilities_of
from ..urls import redact_url
from .context import EngineContext, Part
from .lifecycle import OWNER_EXTERNAL, OWNER_PROXY, ModelEntry, ModelStatus
from .preload import PreloadTally

log = logging.getLogger("proxy.engine")
S = ModelStatus
EVICTED_BY_BACKEND = "backend"   # the eviction reason of a model the server dropped itself


class Reconciler(Part):
    def __init__(self, ctx: EngineContext, preloads: PreloadTally) -> None:
        super().__init__(ctx)
        self.preloads = preloads
        self._running = asyncio.Lock()
        self.api_level: ApiLevel | None = None
        self.capabilities: Capabilities | None = None   # with api_level, after detect()
        self.upstream_ok = False
        self.listed_once = False        # the server has answered with its models (once)
        self.upstream_error: str | None = None
        self.down_since_s: float | None = None   # since its "unavailable" line, until it answers
        self.error_type: type[UpstreamError] = UpstreamError
        self.last_run_s = -1e9
        # Called when a look at the server fails (a fleet's host: requests still waiting for
        # its answer go elsewhere).
        self.on_down: Callable[[], None] | None = None

    def failure(self) -> UpstreamError:
        return self.error_type(self.upstream_error or "the upstream has not answered")

    async def run(self) -> list[ModelEntry]:
        """Align with the server. Returns the models that are late results of the proxy's own
        loads (whoever waited for them may have gone). One run at a time: the loop's, an
        after-load one and a caller's would otherwise interleave their ownership writes."""
        async with self._running:
            return await self._run()

    async def _run(self) -> list[ModelEntry]:
        self.last_run_s = self.clock.now()
        epoch = self.ctx.status_epoch
        upstream = self.registry.config.upstream
        shared = self.ctx.shared
        # The fleet's ownership record, read before the host's list (engine/shared_owned.py).
        owned_read = shared is not None and await shared.owned.refresh()
        try:
            # One deadline for the whole look: a server that accepts and never answers (frozen,
            # swapping) is down now, not after read_timeout_s.
            async with asyncio.timeout(upstream.probe_timeout_s):
                if self.api_level is None:
                    level = await self.backend.detect()
                    self.capabilities = capabilities_of(self.backend, level)
                    self.api_level = level
                    log.info("upstream speaks %s%s", self.api_level.value,
                             "" if self.capabilities.manages_loading else
                             ": loading is left to the server's own JIT")
                models = await self.backend.list_models()
        except (UpstreamError, TimeoutError) as exc:
            err = exc if isinstance(exc, UpstreamError) else UpstreamTimeout(
                f"{redact_url(upstream.url)} did not answer a look at its models within "
                f"{upstream.probe_timeout_s:g}s (upstream.probe_timeout_s): counted down")
            if self.upstream_ok:
                log.warning("upstream unavailable: %s", err.message)
                self.down_since_s = self.clock.now()
            self.upstream_ok, self.upstream_error = False, err.message
            self.error_type = type(err)
            if self.on_down is not None:
                self.on_down()
            return []
        if self.down_since_s is not None:   # the warning above gets its end said
            log.info("upstream reachable again after %.0fs", self.clock.now() - self.down_since_s)
            self.down_since_s = None
        self.upstream_ok, self.upstream_error = True, None
        changed: list[ModelEntry] = []
        late: list[ModelEntry] = []
        for m in models:
            self._one(m, epoch, changed, late)
        self.listed_once = True
        self._answered_again()
        if shared is not None and owned_read:
            await shared.owned.restore(self.registry.entries, self.accounting.owns)
        await self.accounting.commit_ownership()   # nothing to write: no I/O
        if changed:
            await self.monitor.sample()     # the memory figures show what others changed
        return late

    def _answered_again(self) -> None:
        """A load that failed because the server could not be reached says nothing of the
        model: now that the server answers, it may load again at once (its error kept as
        `last_error`)."""
        for e in self.registry:
            if e.status is S.ERROR and e.failed_unreachable:
                e.failed_unreachable, e.load_failures, e.retry_at_s = False, 0, 0.0
                self.ctx.swap(e, S.ERROR, S.UNLOADED)
                log.info("%s may load again: the server answers (its load could not reach "
                         "it: %s)", e.key, e.last_error)

    def _one(self, m: UpstreamModel, epoch: int, changed: list[ModelEntry],
             late: list[ModelEntry]) -> None:
        e, new = self.registry.ensure(m.key)
        if new:
            self.accounting.apply_learned(e)
        e.type, e.size_bytes = m.type, m.size_bytes or e.size_bytes
        e.max_context_length = m.max_context_length or e.max_context_length
        e.extra = m.extra
        for alias in m.aliases:
            self.registry.upstream_aliases[alias] = m.key
        if m.memory_bytes and self.capabilities and self.capabilities.reports_memory:
            e.reported_bytes = m.memory_bytes   # kept once unloaded: its next load's need
        if self.ctx.status_epochs.get(m.key, -1) > epoch:
            return   # changed by us while the list was in flight; the list is stale for it
        e.resident_extra = m.resident
        if m.loaded:
            if e.status is S.LOADED and e.instance_ids != m.instance_ids:
                changed.append(e)        # each instance holds memory: sampled again below
            e.instance_ids = m.instance_ids
            if m.context_length and e.status is not S.LOADING:
                e.context_length = m.context_length
            if self.ctx.swap(e, (S.UNLOADED, S.ERROR), S.LOADED):
                changed.append(e)
                e.loaded_at_s = e.last_used_at_s = self.clock.now()
                shared = self.ctx.shared
                if self.accounting.owns(e.key, m.instance_ids) or (
                        shared is not None and shared.owned.has(e.key, m.instance_ids)):
                    e.owner = OWNER_PROXY
                    log.info("%s is loaded and the proxy's (from before a restart, or loaded "
                             "by another replica)", m.key)
                elif e.claim_unfinished(self.clock.now()):
                    e.owner = OWNER_PROXY
                    e.load_failures, e.last_error = 0, None   # it did load, if late
                    options = dict(self.registry.config.model(e.key).load)
                    for instance_id in m.instance_ids:
                        self.accounting.remember_owned(e, instance_id, options)
                    late.append(e)
                    log.info("%s finished loading after the proxy stopped waiting for it; it "
                             "is the proxy's", m.key)
                else:
                    e.owner = OWNER_EXTERNAL
                    log.info("%s was loaded outside the proxy", m.key)
            elif e.owner == OWNER_EXTERNAL and e.status is S.LOADED and \
                    self.ctx.shared is not None and \
                    self.ctx.shared.owned.has(e.key, m.instance_ids):
                # Seen on the host before the replica that loaded it had recorded it so.
                e.owner = OWNER_PROXY
                log.info("%s is the proxy's: another replica loaded it", m.key)
        elif e.status is S.LOADED and self.api_level is not ApiLevel.JIT_ONLY:
            # Another replica's unload, as the replicas' event stream told: its eviction, told
            # and counted there, not the server's.
            by_replica = self.ctx.shared.unloaded_by.pop(m.key, None) \
                if self.ctx.shared is not None else None
            by_backend = by_replica is None and self.capabilities is not None and \
                self.capabilities.self_evicts
            if by_replica is not None:
                log.info("%s was unloaded by %s", m.key, by_replica)
            elif by_backend:   # a fact of this server's, not a failure: counted as its eviction
                log.info("%s was unloaded by the server itself", m.key)
                e.evictions[EVICTED_BY_BACKEND] += 1
                self.accounting.evicted(e)
                self.listeners.emit("on_evict", m.key, EVICTED_BY_BACKEND, None)
            else:
                log.info("%s was unloaded outside the proxy", m.key)
            if e.preloaded:   # unused: wasted, whoever unloaded it
                self.preloads.unloaded_unused(e)
            self.accounting.forget_owned(e.instance_ids)
            self.ctx.swap(e, S.LOADED, S.UNLOADED)     # the swap wakes admission: room
            changed.append(e)
            if by_backend:
                self.listeners.emit("on_unload", m.key, EVICTED_BY_BACKEND)
