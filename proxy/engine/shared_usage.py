"""The requests each replica serves, heard by the others: usage learned by the fleet
(engine/shared.py).

A replica learns a model's use — its gaps, rhythm and clock, who follows it — from the
requests it serves, and ranks victims and unloads idle models by their recency and heat. Behind
a load balancer each replica sees a share of the requests: the leader's preloads followed its
own share only, and a model another replica is asked for every minute looked idle here, so the
leader unloaded it after its idle timeout and a load here took it as the first victim whenever
that replica's lease had lapsed between two requests.

So each replica tells the others when its requests arrived: per host, one event on the
replicas' stream per lease batch (a third of `lease_ttl_s`), and only when there were any. Each
replica hears them as if it had been asked (engine/leases.py's `heard`): the learner places
each one where it fell (one heard after a later request goes in its place: learner.py), and the
model's entry gets its recency and heat; a preload of the model counts as used. A request
heard preloads nothing: the replica it reached has preloaded what follows it, with the
fleet's patterns.

The patterns themselves outlive the replicas: the leader writes those that changed to the shared
state every PATTERNS_EVERY_S and as it stops, and a replica that starts adopts them for the
models it has none of, or an older one (from its own history file, written before it stopped).
So a new pod, or every pod after a rolling update, starts with what the fleet learned.

An unload by hand is told too (`unloaded_by_hand`): the leader, which preloads, keeps the model
unloaded as the replica asked would (preload.HAND_UNLOAD_QUIET_S).

Bounded: a batch tells at most ARRIVALS_MAX arrivals per host; beyond that only each model's
latest is told (its recency; the others count in `arrivals_untold`), of LATEST_MAX models at
most. An event with more arrivals than that, or more models than arrivals, is not learned.
Arrivals whose append failed are not sent again. A model this replica does not know is
ignored, and so is an event that is not as written here. A batch stamped ahead of the
hearer's clock is moved back whole (its teller's clock runs ahead).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, Callable

from ..errors import StateUnavailable
from .learner import MAX_FOLLOWERS
from .learning import ModelPattern

if TYPE_CHECKING:
    from .clock import Clock
    from .learner import UsageLearner

log = logging.getLogger("proxy.shared")
ARRIVALS_EVENT = "arrivals"    # the replicas' stream: the requests a replica served on a host
BY_HAND_EVENT = "unloaded_by_hand"   # and a model it unloaded by hand there
ARRIVALS_MAX = 512             # per batch and host: about 5 KB of event
LATEST_MAX = 3584              # past it, the models whose latest arrival is told as well
MAX_SPAN_MS = 86_400_000       # a batch's arrivals lie within this of its first
HEARD_STALE_S = 600.0          # an arrival stamped this long before the hearer's now: not learned
PATTERNS_EVERY_S = 60.0        # the leader writes the patterns that changed this often
PATTERNS_TTL_S = 7 * 86_400.0  # kept a week past the last write
PATTERNS_PER_WRITE = 32        # snapshots written in one lease batch


class UsageShare:
    """Mixed into SharedHost (engine/shared.py): its `store`, `name`, `replica` and `_tasks`."""

    def _init_usage(self) -> None:
        self._arrivals: list[tuple[str, float]] = []     # (model, wall s) since the last batch
        self._latest: dict[str, float] = {}              # model → wall s, past ARRIVALS_MAX
        self.arrivals_told = self.arrivals_heard = self.arrivals_untold = 0
        self.arrivals_unlearned = 0    # heard, of a model not known here or stamped too long ago
        # Set by the engine: a request for the model that arrived (wall s) on another replica;
        # the model another replica unloaded by hand.
        self.heard_arrival: Callable[[str, float], bool] = lambda key, wall_s: False
        self.heard_by_hand: Callable[[str], None] = lambda key: None
        self.learner: UsageLearner | None = None     # the engine's, and its clock
        self.clock: Clock | None = None
        self.patterns_every_s = PATTERNS_EVERY_S
        self.patterns_adopted = self.patterns_refused = 0
        self._patterns_at_s: float | None = None     # loop time of the last write
        self._written: dict[str, tuple] = {}         # model → _mark of the pattern written
        self._backlog: list[str] = []                # models changed, not written yet

    def arrived(self, key: str, wall_s: float) -> None:
        """A request for `key` arrived here (once per request, on its path: an append)."""
        if len(self._arrivals) < ARRIVALS_MAX:
            self._arrivals.append((key, wall_s))
        else:
            self._latest[key] = wall_s
            self.arrivals_untold += 1

    async def tell_arrivals(self) -> None:
        """The batch's arrivals, as one event (the replica's lease batch calls it)."""
        if not self._arrivals:
            return
        batch, latest = self._arrivals, list(self._latest.items())[-LATEST_MAX:]
        self._arrivals, self._latest = [], {}
        batch += latest
        self.arrivals_untold -= len(latest)
        models = sorted({key for key, _ in batch})
        index = {key: i for i, key in enumerate(models)}
        t0_s = min(wall_s for _, wall_s in batch)
        data = {"host": self.name, "replica": self.replica.id, "models": models,
                "t0_ms": round(t0_s * 1000),
                "at": [[index[key], round((wall_s - t0_s) * 1000)] for key, wall_s in batch]}
        try:
            await self.store.append_event(ARRIVALS_EVENT, data)
            self.arrivals_told += len(batch)
        except StateUnavailable:
            self.arrivals_untold += len(batch)   # a lost reply may have appended it: not again

    async def write_patterns(self, *, now: bool = False) -> None:
        """The leader's patterns of this host that changed since it last wrote them: looked
        for every patterns_every_s, and written PATTERNS_PER_WRITE a batch (a snapshot is a
        few KB, and a fleet may know a thousand models); `now`: all of them, as it stops."""
        learner, clock = self.learner, self.clock
        if learner is None or clock is None:
            return
        t_s = asyncio.get_running_loop().time()
        if now or not self._backlog and (self._patterns_at_s is None or
                                         t_s - self._patterns_at_s >= self.patterns_every_s):
            self._patterns_at_s = t_s
            self._backlog = [key for key, p in learner.patterns.items()
                             if self._written.get(key) != _mark(p)]
        take = len(self._backlog) if now else PATTERNS_PER_WRITE
        batch, self._backlog = self._backlog[:take], self._backlog[take:]
        patterns = {key: p for key in batch if (p := learner.patterns.get(key)) is not None}
        if not patterns:
            return
        now_s, wall_s = clock.now(), clock.wall()
        try:
            await self.store.put_patterns(
                self.name, {key: p.snapshot(now_s, wall_s) for key, p in patterns.items()},
                PATTERNS_TTL_S)
        except StateUnavailable:
            self._backlog = batch + self._backlog     # written at a later turn
            return
        self._written.update((key, _mark(p)) for key, p in patterns.items())

    async def adopt_patterns(self) -> None:
        """At start: the fleet's pattern of each model this replica has none of, or an older
        one (its last request earlier than the fleet's)."""
        learner, clock = self.learner, self.clock
        if learner is None or clock is None:
            return
        try:
            kept = await self.store.patterns(self.name)
        except StateUnavailable as exc:
            log.warning("%s: the fleet's usage patterns of %s are not adopted; this replica "
                        "learns from requests from now on", exc.message, self.name)
            return
        now_s, wall_s = clock.now(), clock.wall()
        for key, snapshot in kept.items():
            try:
                fleet = ModelPattern.restore(snapshot, now_s, wall_s)
            except (TypeError, ValueError, KeyError, AttributeError, OverflowError):
                fleet = None
            if fleet is None or not _sane(fleet, wall_s):
                self.patterns_refused += 1      # written by another version, or by hand:
                continue                        # learned anew
            own = learner.patterns.get(key)
            if fleet.last_at_s is None or own is not None and own.last_at_s is not None and \
                    own.last_at_s >= fleet.last_at_s:
                continue
            learner.patterns[key] = fleet
            learner.dirty.add(key)      # into this replica's own history too
            self._written[key] = _mark(fleet)
            self.patterns_adopted += 1
        if self.patterns_refused:
            log.warning("%d usage patterns kept for %s are not as a replica writes them (wrong "
                        "types, negative counts, over %d followers): not adopted",
                        self.patterns_refused, self.name, MAX_FOLLOWERS)
        if self.patterns_adopted:
            log.info("adopted the usage patterns of %d models on %s that the fleet learned",
                     self.patterns_adopted, self.name)

    def tell_unloaded_by_hand(self, key: str) -> None:
        task = asyncio.ensure_future(self._tell_by_hand(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tell_by_hand(self, key: str) -> None:
        with contextlib.suppress(StateUnavailable):
            await self.store.append_event(BY_HAND_EVENT, {
                "host": self.name, "model": key, "replica": self.replica.id})

    def heard_arrivals(self, data: dict[str, Any]) -> None:
        """Another replica's batch: each arrival, in the order it came there, as if asked
        here."""
        arrivals = _parsed(data)
        if not arrivals:
            log.debug("an arrivals event from replica %s not as expected: ignored",
                      data.get("replica"))
            return
        # A teller whose clock runs ahead stamps its latest arrivals after now here: the batch
        # is moved back whole, so each keeps its gap to the others (taken each as now, they
        # would be learned as a burst of no gaps, on an hour and minute still to come). One
        # stamped long before now is not when it says (a clock far behind): not learned.
        now_wall_s = self.clock.wall() if self.clock is not None else 0.0
        ahead_s = max(0.0, max(wall_s for wall_s, _ in arrivals) - now_wall_s)
        try:
            for wall_s, key in arrivals:
                wall_s -= ahead_s
                if now_wall_s - wall_s > HEARD_STALE_S or not self.heard_arrival(key, wall_s):
                    self.arrivals_unlearned += 1
        except Exception:      # a bug here must not stop the stream's reader: said, not raised
            log.exception("learning replica %s's arrivals failed", data.get("replica"))
        self.arrivals_heard += len(arrivals)


def _sane(p: ModelPattern, wall_s: float) -> bool:
    """A snapshot another replica could have written: counts not negative, followers within
    the learner's bound. Its wall stamps past this replica's clock are taken as now (a writer's
    clock ahead; a clock minute counted from the future would read as an hour's starts)."""
    counts = (*p.gaps.counts, *p.after_short.counts, *p.after_long.counts, *p.hours,
              *p.minute_starts, *p.followers.values(), p.requests)
    if min(counts) < 0 or len(p.followers) > MAX_FOLLOWERS or \
            p.last_gap_s is not None and not p.last_gap_s >= 0:
        return False
    if p.first_wall_s is not None:
        p.first_wall_s = min(p.first_wall_s, wall_s)
    if p.minutes_since_wall_s is not None:
        p.minutes_since_wall_s = min(p.minutes_since_wall_s, wall_s)
    return True


def _mark(p: ModelPattern) -> tuple:
    """What changes when a pattern learns something (a request, a follower)."""
    return p.requests, p.last_at_s, sum(p.followers.values())


def _parsed(data: dict[str, Any]) -> list[tuple[float, str]]:
    """(wall s, model) of each arrival; [] for an event that is not as tell_arrivals writes."""
    models, t0_ms, at = data.get("models"), data.get("t0_ms"), data.get("at")
    if not (isinstance(models, list) and isinstance(at, list)
            and len(models) <= len(at) <= ARRIVALS_MAX + LATEST_MAX   # as tell_arrivals writes
            and all(isinstance(m, str) for m in models)
            and isinstance(t0_ms, int) and not isinstance(t0_ms, bool) and 0 < t0_ms < 2 ** 53):
        return []
    out = []
    for pair in at:
        if not (isinstance(pair, list) and len(pair) == 2 and
                all(isinstance(v, int) and not isinstance(v, bool) for v in pair) and
                0 <= pair[0] < len(models) and 0 <= pair[1] <= MAX_SPAN_MS):
            return []
        out.append(((t0_ms + pair[1]) / 1000, models[pair[0]]))
    return out
