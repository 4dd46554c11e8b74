"""The timeline the dashboard draws: per model, when it was resident (with its load time and
why it went), evictions and preloads with their reason, waits for memory, 503s and requests
per minute.
Bounded: the last `TIMELINE_S`, at most `TIMELINE_ITEMS` of each kind per model.

The event hub (events.py) feeds it from the engine's events and its per-second tick.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

TIMELINE_S = 24 * 3600.0
TIMELINE_ITEMS = 2000        # per model and kind: residency intervals, evictions, waits, 503s


def _bounded(maxlen: int = TIMELINE_ITEMS) -> Any:
    return field(default_factory=lambda: collections.deque(maxlen=maxlen))


@dataclass
class ModelTimeline:
    resident: collections.deque = _bounded()    # [start, end | None, load_s, end reason]
    evictions: collections.deque = _bounded()   # [t, reason, for_model]
    preloads: collections.deque = _bounded()    # [t, reason]: a load queued unasked, and why
    waits: collections.deque = _bounded()       # [start, end | None]
    rejects: collections.deque = _bounded()     # [t, 503s in that second]
    density: collections.deque = _bounded(1440)  # [minute start, requests, failures]
    loading_since: float | None = None
    evicting: tuple[str, str | None] | None = None


class Timelines:
    def __init__(self) -> None:
        self.models: dict[str, ModelTimeline] = {}

    def of(self, model: str) -> ModelTimeline:
        tl = self.models.get(model)
        if tl is None:
            tl = self.models[model] = ModelTimeline()
        return tl

    def state(self, model: str, old: str, new: str, now: float) -> None:
        tl = self.of(model)
        if new == "loading":
            tl.loading_since = now
        elif new == "loaded" and old != "unloading":
            load_s = None if tl.loading_since is None else now - tl.loading_since
            tl.resident.append([now, None, None if load_s is None else round(load_s, 3), None])
            tl.loading_since = None
        elif new in ("unloaded", "error"):
            tl.loading_since = None
            if old in ("loaded", "unloading") and tl.resident and tl.resident[-1][1] is None:
                reason = tl.evicting[0] if tl.evicting else "external"
                tl.resident[-1][1], tl.resident[-1][3] = now, reason
            tl.evicting = None

    def evict(self, model: str, reason: str, for_model: str | None, now: float) -> None:
        tl = self.of(model)
        tl.evicting = (reason, for_model)
        tl.evictions.append([now, reason, for_model])

    def preload(self, model: str, reason: str, now: float) -> None:
        self.of(model).preloads.append([now, reason])

    def queue(self, model: str, waiting: int, now: float) -> None:
        waits = self.of(model).waits
        if waiting and (not waits or waits[-1][1] is not None):
            waits.append([now, None])
        elif not waiting and waits and waits[-1][1] is None:
            waits[-1][1] = now

    def requests(self, model: str, n: int, errors: int, rejected: int, now: float) -> None:
        """One second's requests of a model."""
        tl = self.of(model)
        minute = int(now // 60) * 60
        if tl.density and tl.density[-1][0] == minute:
            tl.density[-1][1] += n
            tl.density[-1][2] += errors
        else:
            tl.density.append([minute, n, errors])
        if rejected:
            tl.rejects.append([now, rejected])

    def view(self, window_s: float, known: Iterable[str], started_wall: float,
             now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        since = now - min(window_s, TIMELINE_S)
        out: dict[str, Any] = {}
        for key in sorted(set(known) | set(self.models)):
            tl = self.models.get(key)
            if tl is None:
                out[key] = {"resident": [], "evictions": [], "preloads": [], "waits": [],
                            "rejects": [], "density": []}
                continue
            out[key] = {
                "resident": [r for r in tl.resident if r[1] is None or r[1] >= since],
                "loading_since": tl.loading_since,
                "evictions": [x for x in tl.evictions if x[0] >= since],
                "preloads": [x for x in tl.preloads if x[0] >= since],
                "waits": [w for w in tl.waits if w[1] is None or w[1] >= since],
                "rejects": [x for x in tl.rejects if x[0] >= since],
                "density": [d for d in tl.density if d[0] >= since - 60]}
        return {"now": round(now, 3), "since": round(since, 3),
                "started": round(started_wall, 3), "models": out}


def merge_history(timeline: dict[str, Any], history: dict[str, Iterable[tuple]]) -> None:
    """Requests per minute from the history store for the minutes before this process."""
    for key, rows in history.items():
        entry = timeline["models"].get(key)
        if entry is None:
            continue
        first = entry["density"][0][0] if entry["density"] else float("inf")
        older = [[minute * 60, n, failures] for minute, n, failures, *_ in rows
                 if minute * 60 < first]
        entry["density"] = older + entry["density"]
