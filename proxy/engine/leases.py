"""Leases handed out and taken back: what a use of a model changes, and what a hold does not.

A USE lease (a request) makes the model hotter and more recent, teaches the usage model an
arrival and counts a preload as useful; a HOLD lease (a probe, an admin read) only keeps the
model from being unloaded. When the last lease on a model goes, a waiting load may find room.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .context import EngineContext
from .lifecycle import HOLD, USE, Lease, ModelEntry
from .policy import decayed_heat
from .preload import Preloader, PreloadTally

if TYPE_CHECKING:
    from .scheduler import Scheduler


class Leases:
    def __init__(self, ctx: EngineContext, preloader: Preloader, preloads: PreloadTally,
                 scheduler: "Scheduler") -> None:
        self.ctx = ctx
        self.clock = ctx.clock
        self._now = ctx.clock.now      # bound once: read twice per request
        self.learner = ctx.learner
        self.preloader = preloader
        self.preloads = preloads
        self.scheduler = scheduler
        self.active: set[Lease] = set()

    def use(self, e: ModelEntry, observed: bool = False) -> Lease:
        """A USE lease on loaded e; `observed`: its arrival was already taught."""
        now = self._now()
        e.heat = decayed_heat(e.heat, e.heat_at_s, now) + 1.0
        e.heat_at_s = e.last_used_at_s = now
        e.unloaded_by_hand_s = None
        ctx = self.ctx
        if not observed:
            wall_s = self.clock.wall()
            self.learner.observe(e.key, now, wall_s)
            self.preloader.after_request(e.key)
            if ctx.shared is not None:
                ctx.shared.arrived(e.key, wall_s)
        if e.preloaded:
            self.preloads.used(e)
        lease = Lease(e, self._released, now, USE, ctx.host_name)
        self.active.add(lease)
        if ctx.shared is not None:
            ctx.shared.touch(e.key)
        return lease

    def heard(self, key: str, wall_s: float) -> bool:
        """A request for `key` that arrived at wall_s on another replica (engine/shared_usage.py):
        learned, and counted in the model's recency and heat, as a use here would be; a preload
        it used was useful. Nothing is preloaded for it: that replica did so. False: not
        learned (a model this replica does not know)."""
        e = self.ctx.registry.entries.get(key)
        if e is None:
            return False
        now = self._now()
        at_s = now - max(0.0, self.clock.wall() - wall_s)
        self.learner.observe(key, at_s, wall_s)
        e.heat = decayed_heat(e.heat, e.heat_at_s, now) + decayed_heat(1.0, at_s, now)
        e.heat_at_s = now
        if e.last_used_at_s is None or at_s > e.last_used_at_s:
            e.last_used_at_s = at_s
        if e.unloaded_by_hand_s is not None and at_s >= e.unloaded_by_hand_s:
            e.unloaded_by_hand_s = None       # asked for since (not a request told late)
        if e.preloaded:
            self.preloads.used(e)
        return True

    def hold(self, e: ModelEntry) -> Lease:
        lease = Lease(e, self._released, self._now(), HOLD, self.ctx.host_name)
        self.active.add(lease)
        return lease

    def _released(self, lease: Lease) -> None:
        self.active.discard(lease)
        e = lease.entry
        if lease.kind is USE:
            e.last_used_at_s = self._now()
        shared = self.ctx.shared
        if (self.scheduler.pending or shared is not None) and not e.busy:
            if self.scheduler.pending:
                self.ctx.wake()
            if shared is not None:    # a load on another replica may want it
                shared.idle_now(e.key)

    def in_use(self) -> list[Lease]:
        return [lease for lease in self.active if lease.kind is USE]
