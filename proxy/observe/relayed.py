"""The replicas' events on every replica's `/proxy/events` and dashboard (state.backend: redis).

What a replica's engine does (state changes, loads, evictions, unloads, preloads, queues, pins,
alerts) is appended to the shared Redis Stream, tagged with the replica; each replica reads the
stream and publishes the others' events into its own hub, where clients see them with their
`replica` and resume by the hub's ids as for its own. Per-second request summaries and memory
ticks stay local: each replica's own traffic. Appending never holds up the engine: events wait
in a bounded queue, and while Redis is away they are counted as lost, never retried twice.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import TYPE_CHECKING, Any, Callable

from ..errors import StateUnavailable
from ..state import StateStore
from ..state.base import UNREADABLE

if TYPE_CHECKING:
    from .events import EventHub

log = logging.getLogger("proxy.events")
SHARED_TYPES = frozenset({"state", "load", "evict", "unload", "preload", "queue", "pin",
                          "alert"})
QUEUE_MAX = 1000
READ_WAIT_S = 1.0
RETRY_S = 1.0


class EventRelay:
    def __init__(self, hub: "EventHub", store: StateStore) -> None:
        self.hub = hub
        self.store = store
        self.me = store.replica_id
        self.pending: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self.lost = self.relayed_in = self.relayed_out = 0
        self.unreadable = 0      # stream entries something else wrote: gone past, not acted on
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.on_remote: list[Callable[[str, dict[str, Any]], None]] = []   # engine/shared.py
        hub.on_publish.append(self._out)

    def _out(self, event_type: str, data: dict[str, Any]) -> None:
        if event_type not in SHARED_TYPES or "replica" in data:
            return     # local-only, or another replica's already
        if len(self.pending) >= QUEUE_MAX:
            self.lost += 1
            return
        self.pending.append((event_type, {**data, "replica": self.me}))
        self._wake.set()

    async def start(self) -> None:
        """From the stream's newest event on, by the store's own ids (no replica's clock): a
        replica that starts neither replays the fleet's day nor misses what follows. While
        the store is away the reader asks again before reading."""
        after = None
        with contextlib.suppress(StateUnavailable):
            after = await self.store.last_event_id()
        self._tasks = [asyncio.ensure_future(self._writer()),
                       asyncio.ensure_future(self._reader(after))]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.pending:
                event_type, data = self.pending.popleft()
                try:
                    await self.store.append_event(event_type, data)
                    self.relayed_out += 1
                except StateUnavailable:
                    self.lost += 1 + len(self.pending)    # a lost reply may have appended it:
                    self.pending.clear()                  # never sent twice
                    break

    async def _reader(self, after: str | None) -> None:
        while True:
            try:
                if after is None:
                    after = await self.store.last_event_id()
                events = await self.store.events_after(after, count=100, wait_s=READ_WAIT_S)
            except StateUnavailable:
                await asyncio.sleep(RETRY_S)
                continue
            for ev in events:
                after = ev.id
                if ev.type == UNREADABLE:
                    self._unreadable(ev.id)
                elif ev.data.get("replica") != self.me:
                    self.relayed_in += 1
                    for hook in self.on_remote:    # before the hub: what acts before what shows
                        with contextlib.suppress(Exception):
                            hook(ev.type, ev.data)
                    if ev.type in SHARED_TYPES:    # others are the replicas' own (`owned`)
                        with contextlib.suppress(Exception):
                            self.hub.publish(ev.type, dict(ev.data))

    def _unreadable(self, event_id: str) -> None:
        """Said once at WARNING (a peer of another version, or a hand on the stream), then at
        DEBUG: a flood of them must not flood the log."""
        self.unreadable += 1
        (log.warning if self.unreadable == 1 else log.debug)(
            "the replicas' stream holds an entry this replica cannot read (id %s: no type, or "
            "data not a JSON object; %d so far): skipped", event_id, self.unreadable)
