"""Predictive preloading: load what the usage model expects next, before it is asked for.

Triggers:
- a request for A preloads B when B follows A (within `learner.FOLLOW_WINDOW_S`) with
  probability at least `preload.min_probability`;
- a timer's model (its first requests after a lull fall on one grid: `timers.detect_period`)
  is preloaded its reload seconds before its next window opens, the tick running at that
  moment rather than at the end of the monitoring interval;
- so is, before that minute, a model whose first requests after a lull stand out in one minute
  of the hour (`timers.ClockMinute`: a job run by cron at :00 on some hours, which breaks a
  period's grid) when its chance of a start there, per hour, is at least
  `preload.min_probability`;
- every monitoring interval, a model without a period that is due by its rhythm (requested in
  this hour of the week at least `preload.rhythm_min_rate` times a week) or by its own gaps (at
  least `preload.min_probability` of a request within a minute);
- into free memory only (never evicting), a model that usually starts in the coming hour of
  the day (as often, per day observed), a guess from a day's history that is weaker than a
  model's own gaps.
A preload never waits for memory and gives way to any load a request waits for. A preloaded
model is counted useful when a request uses it before it is unloaded, wasted (with its GB) when
it is unloaded unused, by the proxy or outside it (reconcile).

A preload evicts only when the cheapest set of victims is expected to cost (reload seconds ×
probability of reuse) under a quarter of what the preload is expected to save (its reload
seconds × the probability it is asked for); it never touches a model that is busy, pinned,
inside its residency or not the proxy's.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .context import EngineContext, Part
from .groups import Groups
from .lifecycle import ModelEntry, ModelStatus
from .policy import PREDICTION_HORIZON_S
from .registry import Registry
from .timers import NextRun

if TYPE_CHECKING:
    from .scheduler import Scheduler

log = logging.getLogger("proxy.engine")
S = ModelStatus
MAX_FOLLOWERS_PRELOADED = 2
BURST_GAP_S = 1.0          # requests closer than this to the previous one preload nothing new
HOUR_LEAD_S = 300.0        # what usually starts in an hour is preloaded this long before it
PERIOD_LEAD_S = 2.0        # a timer's model is ready this long before its window opens
MIN_TICK_S = 1.0           # the tick follows due times, but never runs more often than this
# A model unloaded by hand is not preloaded by its own history for this long, unless asked for
# (the operator's unload stands; next week's rhythm may bring it back).
HAND_UNLOAD_QUIET_S = 3600.0


class PreloadTally:
    """What preloading achieved: counted by the scheduler (a preload started), the core (a
    preloaded model used) and the evictor (unloaded unused)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.queued = self.preloads = self.useful = self.wasted = 0
        self.wasted_bytes = 0.0

    def started(self, e: ModelEntry) -> None:
        self.preloads += 1

    def used(self, e: ModelEntry) -> None:
        e.preloaded = False
        self.useful += 1

    def unloaded_unused(self, e: ModelEntry) -> None:
        e.preloaded = False
        self.wasted += 1
        self.wasted_bytes += self.registry.footprint_bytes(e)


class Preloader(Part):
    def __init__(self, ctx: EngineContext, tally: PreloadTally, scheduler: "Scheduler",
                 groups: Groups) -> None:
        super().__init__(ctx)
        self.tally = tally
        self.scheduler = scheduler
        self.groups = groups
        self.next_due_s: float | None = None    # when the next timer's model falls due

    def wait_s(self, interval_s: float) -> float:
        """How long until the next tick: the interval, or sooner when a timer's model falls
        due before it (its load must be done when its window opens)."""
        if self.next_due_s is None:
            return interval_s
        return max(MIN_TICK_S, min(interval_s, self.next_due_s - self.clock.now()))

    @property
    def config(self) -> Any:
        return self.registry.config.preload

    def after_request(self, key: str) -> None:
        """A request for key arrived: load its together partners (groups, whether or not
        preloading is enabled), and preload what follows it. Cheap when nothing does."""
        for partner, why in self.groups.to_load_with(key):
            self.queue(partner, 1.0, why, may_evict=False)
        if not self.registry.live.current.preload.enabled:   # self.config, two frames less
            return
        pattern = self.learner.patterns.get(key)
        if pattern is None or not pattern.followers:
            return
        if pattern.last_gap_s is not None and pattern.last_gap_s < BURST_GAP_S:
            return                       # a burst: its first request already looked
        threshold = self.config.min_probability * pattern.requests
        if max(pattern.followers.values()) < threshold or self.scheduler.requests_waiting:
            return                       # nobody follows it often enough: the common case
        for follower, probability in self.learner.likely_next(
                key, self.config.min_probability)[:MAX_FOLLOWERS_PRELOADED]:
            self.queue(follower, probability, f"follows {key}")

    async def tick(self) -> None:
        """Preload what is due: a timer's model its reload seconds before its period's next
        window opens, or before the minute of the hour it usually starts in; else by its weekly
        rhythm or by its own gaps (likely asked for within a minute); into free memory only, what
        usually starts in the coming hour of the day (a session's first request, which no
        sequence predicts)."""
        if not self.config.enabled:
            self.next_due_s = None
            return
        if self.scheduler.requests_waiting:
            return        # gives way; a due time kept brings the next look within MIN_TICK_S
        wall, now = self.clock.wall(), self.clock.now()
        rate = self.config.rhythm_min_rate
        next_due = None
        for key, pattern in list(self.learner.patterns.items()):
            e = self.registry.entries.get(key)
            if e is None or e.unloaded_by_hand_s is not None and \
                    now - e.unloaded_by_hand_s < HAND_UNLOAD_QUIET_S:
                continue
            run = pattern.next_run(now, wall, self.config.min_probability)
            if run is not None:
                next_due = self._timed(e, run, next_due)
                if run.by_period:         # its preload time is known: nothing else applies
                    continue              # (a job's minute: between its runs, as any model)
            if e.status is not S.UNLOADED:
                continue
            if pattern.rate_in_hour(wall) >= rate:
                self.queue(key, 0.5, "due by its rhythm")
            elif pattern.rate_at_hour_of_day(wall, HOUR_LEAD_S) >= rate:
                self.queue(key, 0.5, "usually asked for at this hour", may_evict=False)
            else:
                p = self.learner.predict(key, now, PREDICTION_HORIZON_S).p_within
                if p >= self.config.min_probability:
                    self.queue(key, p, "due by its gaps")
        self.next_due_s = next_due

    def _timed(self, e: ModelEntry, run: NextRun, next_due: float | None) -> float | None:
        """A model asked for by a clock: preloaded once its reload seconds (and PERIOD_LEAD_S)
        before its next run are reached. Returns the earliest due time still ahead, its own or
        next_due."""
        now = self.clock.now()
        due_s = now + run.opens_in_s - self.registry.reload_s(e) - PERIOD_LEAD_S
        if due_s > now:
            return due_s if next_due is None else min(next_due, due_s)
        self.queue(e.key, run.chance, run.why)     # (which passes over one not unloaded)
        return next_due

    def queue(self, key: str, probability: float, why: str, *, may_evict: bool = True) -> None:
        e = self.registry.entries.get(key)
        if e is None or e.status is not S.UNLOADED or self.ctx.elsewhere(key):
            return     # (a fleet's other host has it: a copy here would serve nobody)
        if self.scheduler.preload(e, probability * self.registry.reload_s(e),
                                  may_evict=may_evict, why=why):
            self.tally.queued += 1
            log.debug("preload of %s queued (%s)", key, why)

    def summary(self) -> dict[str, Any]:
        t = self.tally
        return {"enabled": self.config.enabled, "queued": t.queued, "preloads": t.preloads,
                "useful": t.useful, "wasted": t.wasted,
                "wasted_gb": round(t.wasted_bytes / 1e9, 2)}
