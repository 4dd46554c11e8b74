"""What the engine learns across models, online and in bounded memory: each model's pattern
(learning.py), and which model follows which within `FOLLOW_WINDOW_S` (agent pipelines: a
planner, then a coder, then an embedding model). Pure code.

Requests come in order of arrival, except another replica's, heard in its next batch
(engine/shared_usage.py): one heard after later ones is put in its place.
"""
from __future__ import annotations

import bisect
import collections

from .gaps import GAP_BOUNDS_S
from .learning import ModelPattern, Prediction

FOLLOW_WINDOW_S = 60.0      # B "follows" A when B is asked for within this after A
RECENT_MAX = 4              # latest requests a new one may follow (bounds the work per request)
MAX_FOLLOWERS = 32          # per model, the followers counted (the first ones seen)
OWN_WAIT_MIN_GAPS = 4.0    # gaps longer than the idle time before a model's own say counts


class UsageLearner:
    """Patterns of every model, and who follows whom."""

    def __init__(self) -> None:
        self.patterns: dict[str, ModelPattern] = {}
        # (at, model, followers counted for this request)
        self._recent: collections.deque[tuple[float, str, set[str]]] = collections.deque(
            maxlen=RECENT_MAX)
        self.dirty: set[str] = set()

    def pattern(self, key: str) -> ModelPattern:
        p = self.patterns.get(key)
        if p is None:
            p = self.patterns[key] = ModelPattern()
        return p

    def observe(self, key: str, at_s: float, wall_s: float) -> None:
        p = self.patterns.get(key)
        (p if p is not None else self.pattern(key)).observe(at_s, wall_s)
        self.dirty.add(key)      # followers counted below persist with their source's next use
        recent = self._recent
        while recent and at_s - recent[0][0] > FOLLOW_WINDOW_S:
            recent.popleft()
        if recent and at_s < recent[-1][0]:
            self._late_follows(key, at_s)
            return
        patterns = self.patterns
        for _, source, seen in recent:
            if source != key and key not in seen:
                seen.add(key)
                followers = patterns[source].followers   # _follows, without its call
                n = followers.get(key)
                if n is not None:
                    followers[key] = n + 1
                elif len(followers) < MAX_FOLLOWERS:
                    followers[key] = 1
        recent.append((at_s, key, set()))

    def _follows(self, source: str, follower: str) -> None:
        followers = self.patterns[source].followers
        n = followers.get(follower)
        if n is not None:
            followers[follower] = n + 1
        elif len(followers) < MAX_FOLLOWERS:   # bounded: a model followed by everything
            followers[follower] = 1            # says little

    def _late_follows(self, key: str, at_s: float) -> None:
        """A request heard after later ones (another replica's): it follows the earlier
        requests within the window, the later ones within it follow it, and it takes its
        place among the latest (unless it is older than all of them)."""
        recent = self._recent
        seen: set[str] = set()
        for t_s, source, theirs in recent:
            if source == key:
                continue
            if t_s <= at_s:
                if key not in theirs:
                    theirs.add(key)
                    self._follows(source, key)
            elif t_s - at_s <= FOLLOW_WINDOW_S and source not in seen:
                seen.add(source)
                self._follows(key, source)
        i = bisect.bisect_right(recent, at_s, key=lambda r: r[0])
        if len(recent) == recent.maxlen:
            if i == 0:
                return
            recent.popleft()
            i -= 1
        recent.insert(i, (at_s, key, seen))

    def follow_probability(self, source: str, follower: str) -> float:
        """P(follower is asked for within FOLLOW_WINDOW_S of a request for source)."""
        p = self.patterns.get(source)
        if p is None or not p.requests:
            return 0.0
        return min(1.0, p.followers.get(follower, 0) / p.requests)

    def follow_chance(self, key: str, now_s: float) -> float:
        """The chance key is asked for soon because a recent request's model is usually
        followed by it (and it has not come yet): a pipeline's next step."""
        best = 0.0
        for at_s, source, seen in self._recent:
            if source != key and key not in seen and now_s - at_s <= FOLLOW_WINDOW_S:
                best = max(best, self.follow_probability(source, key))
        return best

    def due_chance(self, key: str, now_s: float, wall_s: float, within_s: float) -> float:
        """The chance key is asked for within within_s for a known reason: as a recent
        request's next pipeline step, or as a clock's next run whose window opens by then (or
        is under way)."""
        best = self.follow_chance(key, now_s)
        p = self.patterns.get(key)
        if p is not None:
            run = p.next_run(now_s, wall_s, 0.0)
            if run is not None and run.opens_in_s <= within_s:
                best = max(best, run.chance)
        return best

    def own_wait(self, key: str, now_s: float, min_seen: float = OWN_WAIT_MIN_GAPS
                 ) -> float | None:
        """ModelPattern.own_wait of key, idle since its last request."""
        p = self.patterns.get(key)
        if p is None or p.last_at_s is None:
            return None
        return p.own_wait(now_s - p.last_at_s, min_seen)

    def likely_next(self, source: str, min_probability: float) -> list[tuple[str, float]]:
        """Models that followed source at least min_probability of the time, likeliest first."""
        p = self.patterns.get(source)
        if p is None or not p.requests:
            return []
        n = p.requests
        cut = min_probability * n
        out = [(k, min(1.0, c / n)) for k, c in p.followers.items() if c >= cut]
        if len(out) > 1:
            out.sort(key=lambda kq: (-kq[1], kq[0]))
        return out

    def predict(self, key: str, now_s: float, horizon_s: float) -> Prediction:
        p = self.patterns.get(key)
        if p is None or p.last_at_s is None:
            return Prediction(p_within=0.0, expected_wait_s=GAP_BOUNDS_S[-1])
        return p.predict(now_s - p.last_at_s, horizon_s)
