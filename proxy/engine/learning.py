"""What the engine learns about each model's use, online and in bounded memory. Pure code.

Per model (`ModelPattern`):
- the empirical distribution of the gaps between its consecutive requests, kept twice more by
  the class of the gap before (after a short gap, after a long one): bursts and lulls differ;
- its hour-of-week rhythm (168 counters).
Across models (`UsageLearner`, learner.py): which model follows which within
`FOLLOW_WINDOW_S` (agent pipelines: a planner, then a coder, then an embedding model).

A model asked for by a clock shows it in its first requests after a lull (its "starts", kept
for the latest START_MAX lulls, and counted by minute of the hour): a period, or a minute of the
hour it usually starts in (`timers`, looked at by the preloader's tick, not per request).

From these it predicts, for a model idle for `age_s`, the probability of a request within a
horizon and the expected wait for it: the empirical conditional distribution of its gaps given
that the gap is already longer than `age_s`, mixed with a prior that says "the wait ahead is
about as long as the wait so far" (remaining wait t with P(T > a + t | T > a) = a / (a + t)),
the prior weighing less the more gaps longer than `age_s` were seen.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any

from .gaps import GAP_BOUNDS_S, GAP_RATIO, GapHistogram, bin_of
from .timers import CLOCK_HOURS_CAP, MAX_SKIPPED_PERIODS, ClockMinute, NextRun, Period, \
    busiest_minute, detect_period, minute_of_hour

SHORT_GAP_S = 60.0          # a gap below this is "short" (a burst), else "long"
PRIOR_WEIGHT = 4.0          # pseudo-observations of the prior
MIN_CLASS_SAMPLES = 12      # below this a gap class falls back to all gaps
WEEK_HOURS = 168
START_MAX = 16              # per model, the latest starts (first request after a lull) kept


@dataclass
class Prediction:
    p_within: float          # probability of a request within the horizon
    expected_wait_s: float   # expected time until the next request


@dataclass
class ModelPattern:
    gaps: GapHistogram = field(default_factory=GapHistogram)
    after_short: GapHistogram = field(default_factory=GapHistogram)
    after_long: GapHistogram = field(default_factory=GapHistogram)
    hours: list[int] = field(default_factory=lambda: [0] * WEEK_HOURS)
    followers: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    first_wall_s: float | None = None
    last_at_s: float | None = None
    last_gap_s: float | None = None
    gap_after_short: bool | None = None   # the class last_gap_s was counted in (none: unknown)
    starts: collections.deque = field(default_factory=lambda: collections.deque(maxlen=START_MAX))
    minute_starts: list[int] = field(default_factory=lambda: [0] * 60)   # by minute of the hour
    minutes_since_wall_s: float | None = None      # since when minute_starts counts its hours
    _period: Period | None = None
    _period_of_s: float | None = None     # the latest start _period was detected with
    _busiest: tuple[int, int] | None = None
    _busiest_stale: bool = True           # a start came since _busiest was found

    def observe(self, at_s: float, wall_s: float) -> None:
        if self.last_at_s is not None:
            gap = at_s - self.last_at_s
            if not gap > 0.0:     # max(0.0, gap), without the call (once per request)
                if gap < 0.0:     # heard after a later one: another replica's
                    self._late(at_s, wall_s)
                    return
                gap = 0.0
            self.gaps.add(gap)
            if self.last_gap_s is not None:
                short = self.last_gap_s < SHORT_GAP_S
                (self.after_short if short else self.after_long).add(gap)
                self.gap_after_short = short
            self.last_gap_s = gap
            if gap >= SHORT_GAP_S:
                self._start(at_s, wall_s)
        else:
            self._start(at_s, wall_s)
        self.last_at_s = at_s
        self.requests += 1
        if self.first_wall_s is None:
            self.first_wall_s = wall_s
        self.hours[hour_of_week(wall_s)] += 1

    def _late(self, at_s: float, wall_s: float) -> None:
        """A request heard after a later one (another replica's, told in its next batch:
        engine/shared_usage.py). Within the latest gap it splits that gap in two, and every
        count ends as if it had come in order; an older one counts as a request only (the
        gaps before the latest are not kept)."""
        self.requests += 1
        self.hours[hour_of_week(wall_s)] += 1
        if self.first_wall_s is None or wall_s < self.first_wall_s:
            self.first_wall_s = wall_s
        last_s, g = self.last_at_s, self.last_gap_s
        assert last_s is not None
        if g is not None and at_s <= last_s - g:
            return
        after = last_s - at_s                  # its gap to the latest request
        before = None if g is None else g - after
        if before is not None and g is not None:
            self.gaps.remove(g)
            self.gaps.add(before)
            if self.gap_after_short is not None:
                h = self.after_short if self.gap_after_short else self.after_long
                h.remove(g)
                h.add(before)
        self.gaps.add(after)
        if before is not None:       # (else it is the first: no gap before it, no class)
            short = before < SHORT_GAP_S
            (self.after_short if short else self.after_long).add(after)
            self.gap_after_short = short
        self.last_gap_s = after
        # Starts: the latest request was one after a long gap (or as the first), and is one
        # now only if the gap from this request is long; this one is if the gap before it is.
        latest_started = self.starts and self.starts[-1] == last_s
        if latest_started and after < SHORT_GAP_S:
            self.starts.pop()
            minute = minute_of_hour(wall_s + after)
            self.minute_starts[minute] = max(0, self.minute_starts[minute] - 1)
            self._busiest_stale = True
            latest_started = False
        if before is None or before >= SHORT_GAP_S:
            if latest_started:
                self.starts.pop()
            self._start(at_s, wall_s)
            if latest_started:
                self.starts.append(last_s)
            if self.minutes_since_wall_s is not None and self.minutes_since_wall_s > wall_s:
                self.minutes_since_wall_s = wall_s
        self._period_of_s = None               # its starts changed before the latest

    def _start(self, at_s: float, wall_s: float) -> None:
        self.starts.append(at_s)
        since = self.minutes_since_wall_s
        if since is None:
            since = self.minutes_since_wall_s = wall_s
        elif wall_s - since > CLOCK_HOURS_CAP * 3600.0:     # halve the hours and the counts
            self.minutes_since_wall_s = wall_s - (wall_s - since) / 2.0
            self.minute_starts = [c // 2 for c in self.minute_starts]
        self.minute_starts[minute_of_hour(wall_s)] += 1
        self._busiest_stale = True

    def clock(self, wall_s: float) -> ClockMinute | None:
        """The minute of the hour its starts stand out in (found again only when a start came),
        with the chance of a start there in an hour: its starts in that minute per hour
        counted."""
        if self._busiest_stale:
            self._busiest_stale = False
            self._busiest = busiest_minute(self.minute_starts)
        if self._busiest is None or self.minutes_since_wall_s is None:
            return None
        minute, hits = self._busiest
        hours = max(1.0, (wall_s - self.minutes_since_wall_s) / 3600.0)
        return ClockMinute(minute, min(1.0, hits / hours))

    def next_run(self, now_s: float, wall_s: float, min_chance: float) -> NextRun | None:
        """When a clock next asks for the model: by its period, else by the minute of the hour
        its starts stand out in if that chance is at least min_chance."""
        period = self.period(now_s)
        if period is not None:
            opens_s, _ = period.next_window(now_s, self.starts[-1])
            return NextRun(opens_s - now_s, period.confidence, None)
        clock = self.clock(wall_s)
        if clock is None or clock.chance < min_chance:
            return None
        return NextRun(clock.opens_in_s(wall_s), clock.chance, clock.minute)

    def period(self, now_s: float) -> Period | None:
        """The period its starts show (detected again only when a new start came), while it
        holds: a timer silent for more than MAX_SKIPPED_PERIODS periods has stopped, and is
        preloaded no more."""
        latest = self.starts[-1] if self.starts else None
        if latest != self._period_of_s:
            self._period_of_s = latest
            self._period = detect_period(list(self.starts))
        p = self._period
        if p is None or latest is None or \
                now_s - latest > MAX_SKIPPED_PERIODS * p.period_s + p.late_s - p.early_s:
            return None
        return p

    def _histogram(self) -> GapHistogram:
        if self.last_gap_s is not None:
            h = self.after_short if self.last_gap_s < SHORT_GAP_S else self.after_long
            if h.total >= MIN_CLASS_SAMPLES:
                return h
        return self.gaps

    def predict(self, age_s: float, horizon_s: float) -> Prediction:
        """Given no request for age_s, the chance of one within horizon_s and the expected
        wait until it."""
        a = max(age_s, 1.0)
        h = self._histogram()
        seen = h.survival(age_s)             # gaps longer than the idle time so far
        w = seen / (seen + PRIOR_WEIGHT)
        prior_p = horizon_s / (a + horizon_s)
        if seen > 0:
            emp_p = 1.0 - h.survival(age_s + horizon_s) / seen
            emp_wait = self._conditional_mean_wait(h, age_s, seen)
        else:
            emp_p, emp_wait = 0.0, 0.0
        # The prior's expected wait is unbounded; cap it where the evidence cannot reach.
        prior_wait = min(10.0 * a, GAP_BOUNDS_S[-1])
        return Prediction(p_within=w * emp_p + (1 - w) * prior_p,
                          expected_wait_s=w * emp_wait + (1 - w) * prior_wait)

    def own_wait(self, age_s: float, min_seen: float) -> float | None:
        """The mean wait ahead by this model's own gaps alone, when at least min_seen of them
        were longer than age_s (None otherwise)."""
        h = self._histogram()
        seen = h.survival(age_s)
        if seen < min_seen:
            return None
        return self._conditional_mean_wait(h, age_s, seen)

    @staticmethod
    def _conditional_mean_wait(h: GapHistogram, age_s: float, seen: float) -> float:
        """E[gap - age | gap > age] from the histogram (each bin at its geometric middle)."""
        total, i0 = 0.0, bin_of(age_s)
        for i in range(i0, len(h.counts)):
            lo = max(GAP_BOUNDS_S[i - 1] if i > 0 else 0.0, age_s)
            hi = GAP_BOUNDS_S[i] if i < len(GAP_BOUNDS_S) else GAP_BOUNDS_S[-1] * GAP_RATIO
            weight = h.counts[i] if i > i0 else h.survival(age_s) - h.survival(hi)
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 2
            total += max(0.0, weight) * max(0.0, mid - age_s)
        return total / seen

    def rate_in_hour(self, wall_s: float) -> float:
        """Requests in this hour of the week, per week observed (a rhythm of 1.0: it is asked
        for in this hour every week)."""
        if self.first_wall_s is None:
            return 0.0
        weeks = (wall_s - self.first_wall_s) / (WEEK_HOURS * 3600.0)
        if weeks < 1.0:
            return 0.0                   # a rhythm needs a week of history to be one
        return self.hours[hour_of_week(wall_s)] / weeks

    def rate_at_hour_of_day(self, wall_s: float, ahead_s: float = 0.0) -> float:
        """Requests in the hour of the day ahead_s from now, per day observed (1.0: asked for
        in that hour every day): "what usually starts at this hour", learnt after a day."""
        if self.first_wall_s is None:
            return 0.0
        days = (wall_s - self.first_wall_s) / 86400.0
        if days < 1.0:
            return 0.0
        return sum(self.hours[hour_of_week(wall_s + ahead_s) % 24::24]) / days

    # -- persistence -------------------------------------------------------------------------
    def snapshot(self, now_s: float = 0.0, wall_s: float = 0.0) -> dict[str, Any]:
        """What survives a restart; the last request as wall time (the engine's clock is
        monotonic and starts anew)."""
        return {"gaps": self.gaps.counts, "after_short": self.after_short.counts,
                "after_long": self.after_long.counts, "hours": self.hours,
                "followers": self.followers, "requests": self.requests,
                "first_wall_s": self.first_wall_s, "last_gap_s": self.last_gap_s,
                "gap_after_short": self.gap_after_short,
                "last_wall_s": None if self.last_at_s is None
                else wall_s - (now_s - self.last_at_s),
                "starts_wall_s": [wall_s - (now_s - at) for at in self.starts],
                "minute_starts": self.minute_starts,
                "minutes_since_wall_s": self.minutes_since_wall_s}

    @classmethod
    def restore(cls, data: dict[str, Any], now_s: float = 0.0, wall_s: float = 0.0
                ) -> "ModelPattern":
        n = len(GAP_BOUNDS_S) + 1
        p = cls()
        for name in ("gaps", "after_short", "after_long"):
            counts = data.get(name)
            if isinstance(counts, list) and len(counts) == n:
                setattr(p, name, GapHistogram([int(c) for c in counts]))
        hours = data.get("hours")
        if isinstance(hours, list) and len(hours) == WEEK_HOURS:
            p.hours = [int(c) for c in hours]
        p.followers = {str(k): int(v) for k, v in (data.get("followers") or {}).items()}
        p.requests = int(data.get("requests") or 0)
        first = data.get("first_wall_s")
        p.first_wall_s = float(first) if isinstance(first, (int, float)) else None
        last = data.get("last_wall_s")
        if isinstance(last, (int, float)):   # idle since then, on the new clock
            p.last_at_s = now_s - max(0.0, wall_s - float(last))
        starts = data.get("starts_wall_s")
        if isinstance(starts, list):
            p.starts.extend(now_s - max(0.0, wall_s - float(w)) for w in starts
                            if isinstance(w, (int, float)))
        minutes = data.get("minute_starts")
        since = data.get("minutes_since_wall_s")
        if isinstance(minutes, list) and len(minutes) == 60 and isinstance(since, (int, float)):
            p.minute_starts = [int(c) for c in minutes]
            p.minutes_since_wall_s = float(since)
        gap = data.get("last_gap_s")
        p.last_gap_s = float(gap) if isinstance(gap, (int, float)) else None
        after_short = data.get("gap_after_short")
        p.gap_after_short = after_short if isinstance(after_short, bool) else None
        return p


def hour_of_week(wall_s: float) -> int:
    # The Unix epoch was a Thursday: shift so that hour 0 is Monday 00:00 UTC.
    return (int(wall_s // 3600) + 72) % WEEK_HOURS   # (int arithmetic: one float mod less)
