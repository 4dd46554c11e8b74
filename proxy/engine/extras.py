"""Extra instances of a model the proxy loaded twice, unloaded once the model is idle.

Among replicas a load's lock lives in Redis: a Redis that restarts empty while a load runs lets
another replica take the lock and load the model again, and LM Studio then holds two instances
(`key`, `key:2`). Requests name the model and reach one of them; the other holds its memory for
nothing. An extra instance is the proxy's to remove when this replica loaded it (accounting)
or the fleet's record says a replica did (engine/shared_owned.py); a second instance someone
else loaded beside the proxy's (the GUI, an SDK client) is left alone. The instance named as
the model is kept (else the first listed). The leader does it with the idle unloads, once no
request holds the model here and no other replica serves it (its unload claim).
"""
from __future__ import annotations

import asyncio
import logging

from ..errors import StateUnavailable
from .context import EngineContext, Part
from .lifecycle import ModelEntry, ModelStatus

log = logging.getLogger("proxy.engine")
S = ModelStatus


class ExtraInstances(Part):
    def __init__(self, ctx: EngineContext, lock: asyncio.Lock) -> None:
        super().__init__(ctx)
        self.lock = lock          # the evictor's: one mutation of memory at a time
        self.unloaded = 0         # extra instances unloaded

    def extra(self, e: ModelEntry) -> tuple[str, ...]:
        """The instances of e beyond the one requests reach that the proxy loaded."""
        if e.status is not S.LOADED or not e.owned or len(e.instance_ids) < 2:
            return ()
        keep = e.key if e.key in e.instance_ids else e.instance_ids[0]
        shared = self.ctx.shared
        return tuple(i for i in e.instance_ids if i != keep and (
            self.accounting.owns(e.key, (i,)) or
            (shared is not None and shared.owned.by_instance.get(i) == e.key)))

    async def trim(self) -> None:
        for e in list(self.registry):
            if self.extra(e) and not e.busy:
                async with self.lock:
                    await self._unload(e)

    async def _unload(self, e: ModelEntry) -> None:
        shared = self.ctx.shared
        if e.busy or not self.extra(e):
            return
        if shared is not None and not await shared.may_unload(
                e.key, self.clock.now(), shared.replica.lease_ttl_s):
            return                # another replica serves it: when it is idle
        extra = self.extra(e)
        if not extra or e.busy:
            return
        for i in extra:
            await self.backend.unload(i)
        e.instance_ids = tuple(i for i in e.instance_ids if i not in extra)
        # A reconcile whose list was read before this must not bring them back.
        self.ctx.status_epoch += 1
        self.ctx.status_epochs[e.key] = self.ctx.status_epoch
        self.monitor.changes += 1
        self.unloaded += len(extra)
        self.accounting.forget_owned(extra)
        log.info("unloaded %s: an extra instance of %s that the proxy had loaded twice",
                 ", ".join(extra), e.key)
        if shared is not None:
            await shared.owned.unloaded(extra)
            try:
                await shared.owned.changed(e.key)     # the other replicas look again
            except StateUnavailable:
                pass
        await self.monitor.sample()       # its memory is back in the figures at once
        await self.accounting.commit_ownership()
        self.ctx.wake()
