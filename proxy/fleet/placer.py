"""The placer: which host of a fleet serves a request for a model. A pure function of the hosts'
state as `HostView`s (built by fleet/views.py), tested on tables alone.

In order, the first rule that names a host wins:
  1. resident   — a host where the model is loaded: one with a free slot (in flight below its
                  `parallel`), else the one with the fewest in flight;
  2. loading    — a host where it is loading (or queued to load): the request joins that load,
                  unless `replicate_after_waiters` requests wait for it already and another
                  host has free room (rule `replicate`: a second copy loads there);
  3. free       — a host with free room for its footprint, the fastest to load it first (the
                  host the model's config names, if it is one of them);
  4. evict      — the host where the cheapest victim set frees enough room, costed by the
                  evictor's expected reload seconds plus the load time there;
  5. queue      — a host it fits at all but where nothing may go now: its scheduler queues the
                  request and refuses it as it would on one host;
  6. too_large  — no host can ever hold it: refuse at once, naming every host's ceiling;
     down       — only hosts that are down could hold it.
Hosts that are down, do not list the model, or may not hold it are never chosen. Ties are broken
by the random source the caller gives, so racing requests do not all pick the same host.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

LOADED, LOADING = "loaded", "loading"
# Two load estimates this close count as a tie (load times are learned, and noisy).
LOAD_TIE_FRACTION = 0.1


@dataclass(frozen=True)
class HostView:
    name: str
    status: str                    # the model's status there (loaded, loading, unloaded, ...)
    up: bool = True
    in_flight: int = 0             # requests it serves now (USE leases)
    parallel: int = 4              # requests one instance serves at once
    waiters: int = 0               # requests waiting for its load there
    free_bytes: float = 0.0        # room before anything is evicted
    footprint_bytes: float = 0.0   # the model's footprint as learned on this host
    ceiling_bytes: float = float("inf")   # the most any one model may take there
    evict_cost_s: float | None = None     # the cheapest sufficient victim set; None: none
    load_s: float = 0.0            # expected load time of the model there
    preferred: bool = False        # the model's config names this host
    failing: bool = False          # its last load there failed and is backing off


@dataclass(frozen=True)
class Placement:
    host: str | None
    rule: str


def place(views: Sequence[HostView], rng: random.Random, *,
          replicate_after_waiters: int = 0) -> Placement:
    if not views:
        return Placement(None, "down")   # no host left to try (the one that failed avoided)
    up = [v for v in views if v.up]
    resident = [(v.name, v.in_flight, v.parallel) for v in up if v.status == LOADED]
    if resident:
        return Placement(pick_resident(resident, rng), "resident")
    fits = [v for v in up if v.footprint_bytes <= v.ceiling_bytes]
    roomy = [v for v in fits if v.free_bytes >= v.footprint_bytes and v.status != LOADING
             and not v.failing]
    loading = [v for v in up if v.status == LOADING]
    if loading:
        crowd = sum(v.waiters for v in loading)
        if replicate_after_waiters and crowd >= replicate_after_waiters and roomy:
            return Placement(_fastest(roomy, rng).name, "replicate")
        return Placement(_pick(loading, rng).name, "loading")
    if roomy:
        return Placement(_fastest(roomy, rng).name, "free")
    evictable = [v for v in fits if v.evict_cost_s is not None and not v.failing]
    if evictable:
        cost = {v.name: v.evict_cost_s + v.load_s for v in evictable}   # type: ignore[operator]
        best = min(cost.values())
        return Placement(_pick([v for v in evictable if cost[v.name] <= best * 1.0000001],
                               rng).name, "evict")
    if fits:
        healthy = [v for v in fits if not v.failing] or fits
        return Placement(_pick(healthy, rng).name, "queue")
    # Too large only if no host at all could hold it; else the hosts it fits are down.
    if any(v.footprint_bytes <= v.ceiling_bytes for v in views):
        return Placement(None, "down")
    return Placement(None, "too_large")


def pick_resident(copies: Sequence[tuple[str, int, int]], rng: random.Random) -> str:
    """Rule 1 among the hosts holding the model, each as (name, in flight, parallel): one with
    a free slot, else the fewest in flight (the fleet's hot path calls this directly)."""
    if len(copies) == 1:
        return copies[0][0]
    free_slot = [c for c in copies if c[1] < c[2]]
    if not free_slot:
        fewest = min(c[1] for c in copies)
        free_slot = [c for c in copies if c[1] == fewest]
    return free_slot[0][0] if len(free_slot) == 1 else \
        free_slot[rng.randrange(len(free_slot))][0]


def _fastest(views: list[HostView], rng: random.Random) -> HostView:
    """The host the model's config prefers, else the quickest to load it (near-ties random)."""
    preferred = [v for v in views if v.preferred]
    if preferred:
        return _pick(preferred, rng)
    best = min(v.load_s for v in views)
    return _pick([v for v in views if v.load_s <= best * (1 + LOAD_TIE_FRACTION)], rng)


def _pick(views: list[HostView], rng: random.Random) -> HostView:
    return views[0] if len(views) == 1 else views[rng.randrange(len(views))]
