"""Footprints and load times measured by one replica, shared with the others (engine/shared.py).

A replica that loads a model measures its load time, and its footprint (a drop in available
memory it could see, or the resident bytes the host reports). Those measurements go to the
shared state per (host, model), stamped on the store's clock; the other replicas adopt them
where they only have an estimate, so a replica that never loaded a model plans its memory with
what another measured instead of a guess from the file size.

    own         measured by this process (its counts rose since it first saw the model), or
                the host's report: published when it changes
    restored    from this replica's history file: published only where the store has none;
                its age is unknown, so it is kept against what the store holds when this
                replica first sees the model, and gives way to anything measured later
    adopted     another replica's measurement: its count of loads starts anew from there
                (load_time_since), so this replica's first own measurement replaces it
                outright; the count of loads this replica made stays

An own measurement is displaced only by one stamped later than its own publication; a restored
one is kept. Everything here runs when the host's record is published (reconcile, a load or an
unload of this replica's), never on a request's path.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from ..state import Learned, Measured, StateStore
from .memory import GB

if TYPE_CHECKING:
    from .lifecycle import ModelEntry

log = logging.getLogger("proxy.shared")
LEARNED_TTL_S = 7 * 86_400.0      # a model nobody loaded for a week is forgotten by the fleet


class LearnedShare:
    def __init__(self, store: StateStore, host: str) -> None:
        self.store = store
        self.host = host
        self.me = store.replica_id
        self._base: dict[str, tuple[int, int]] = {}    # key → (samples, loads) when first seen
        self._sent: dict[tuple[str, str], float] = {}  # (key, kind) → value published
        self._own_at: dict[tuple[str, str], int] = {}  # (key, kind) → its stamp (store's ms)
        self.adopted = 0

    def _own(self, e: "ModelEntry") -> dict[str, tuple[float, bool]]:
        """kind → (value, measured by this process) for what this replica knows itself."""
        samples0, loads0 = self._base.setdefault(e.key, (e.footprint_samples, e.load_count))
        own: dict[str, tuple[float, bool]] = {}
        if e.reported_bytes is not None:              # the host's own figure, read just now
            own["footprint"] = (float(e.reported_bytes), True)
        elif e.footprint_bytes is not None and e.footprint_samples:
            own["footprint"] = (e.footprint_bytes, e.footprint_samples > samples0)
        if e.load_time_s is not None and e.load_count > e.load_time_since:
            own["load"] = (e.load_time_s, e.load_count > loads0)
        return own

    async def sync(self, entries: dict[str, "ModelEntry"]) -> None:
        """Publish what this replica measured since, then adopt what others did."""
        shared = await self.store.learned(self.host)
        for key, e in list(entries.items()):
            send: dict[str, float] = {}
            for kind, (value, fresh) in self._own(e).items():
                if fresh and self._sent.get((key, kind)) != value:
                    send[kind] = value
                elif not fresh:
                    held = getattr(shared.get(key, Learned()), kind)
                    if held is None:
                        send[kind] = value
                    else:   # kept against what the fleet held when first seen, not later
                        self._own_at.setdefault((key, kind), held.at_ms)
            if send:
                at_ms = await self.store.put_learned(
                    self.host, key, footprint_bytes=send.get("footprint"),
                    load_s=send.get("load"), ttl_s=LEARNED_TTL_S)
                for kind, value in send.items():
                    self._sent[(key, kind)], self._own_at[(key, kind)] = value, at_ms
                if key in shared:          # what the store holds of these now is this
                    shared[key] = dataclasses.replace(shared[key], **dict.fromkeys(send))
        for key, learned in shared.items():
            e = entries.get(key)
            if e is not None:
                self._adopt(e, learned)

    def _adopt(self, e: "ModelEntry", learned: Learned) -> None:
        own = self._own(e)
        fp, load = learned.footprint, learned.load
        if self._takes(e, "footprint", fp, own) and fp.value != e.footprint_bytes:
            log.info("%s on %s: footprint %.2f GB as replica %s measured it", e.key,
                     self.host, fp.value / GB, fp.by)
            e.footprint_bytes, e.footprint_samples = fp.value, 0
            self._base[e.key] = (0, self._base[e.key][1])
            self.adopted += 1
        if self._takes(e, "load", load, own) and load.value != e.load_time_s:
            log.info("%s on %s: load time %.2f s as replica %s measured it", e.key,
                     self.host, load.value, load.by)
            # Not its own: its next load replaces it outright. load_count stays the loads
            # this replica made (/proxy/models `loads`).
            e.load_time_s, e.load_time_since = load.value, e.load_count
            self._base[e.key] = (self._base[e.key][0], e.load_count)
            self.adopted += 1

    def _takes(self, e: "ModelEntry", kind: str, m: Measured | None,
               own: dict[str, tuple[float, bool]]) -> bool:
        """Is another replica's measurement better than what this one has?"""
        if m is None or m.by == self.me:
            return False
        if kind not in own:
            return True                                # an estimate, or adopted earlier
        if kind == "footprint" and e.reported_bytes is not None:
            return False                               # the host's own figure wins anyway
        # An own measurement gives way only to a later one (a restored one: see sync).
        at_ms = self._own_at.get((e.key, kind))
        return at_ms is not None and m.at_ms > at_ms
