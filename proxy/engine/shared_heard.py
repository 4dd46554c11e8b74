"""Another replica's loads and unloads, learned as they end (engine/shared.py).

Each replica's engine events go to the replicas' shared stream (observe/relayed.py), and each
replica reads the others'. A load of another replica's that ended (`loading` → `loaded`) or an
unload (`unloading` → `unloaded`) on a host has that host's engine here reconcile with the host
at once, instead of at its next reconcile tick: it sees the model resident (the fleet's, so the
proxy's) and serves it there, or sees it gone and does not forward requests to it. The host's
own list stays the truth; the event only says when to look. Changes a replica merely noticed
(a reconcile's) are not acted on: every replica notices those by itself. A replica that wrote
the fleet's ownership record back (`owned`, engine/shared_owned.py) has the others look too.
A replica that gave up its lease on a model for a load waiting elsewhere (`lease_given_up`,
engine/shared_wants.py) has that load look again. The requests another replica served
(`arrivals`, engine/shared_usage.py) are learned here as if asked here, and a model it unloaded
by hand (`unloaded_by_hand`) is kept unloaded here as there.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

from .hostlog import working_for
from .shared_owned import OWNED_EVENT
from .shared_usage import ARRIVALS_EVENT, BY_HAND_EVENT
from .shared_wants import GIVEN_UP_EVENT

if TYPE_CHECKING:
    from .shared import SharedHost

log = logging.getLogger("proxy.shared")
# (old, new) of a replica's own load or unload that ended
ENDED = frozenset({("loading", "loaded"), ("unloading", "unloaded")})


def heard_on(hosts: Iterable["SharedHost"], event_type: str, data: dict[str, Any],
             single_host: str) -> None:
    """Route another replica's event to the host it happened on (a single upstream's events
    name no host)."""
    name, model = data.get("host") or single_host, str(data.get("model"))
    if event_type == ARRIVALS_EVENT:
        for h in hosts:
            if h.name == name:
                h.heard_arrivals(data)
        return
    if event_type == BY_HAND_EVENT:
        for h in hosts:
            if h.name == name:
                h.heard_by_hand(model)
        return
    if event_type == GIVEN_UP_EVENT:
        for h in hosts:
            if h.name == name:
                h.lease_given_up(model)
        return
    if event_type != OWNED_EVENT and (
            event_type != "state" or (data.get("old"), data.get("new")) not in ENDED):
        return
    unloaded = (data.get("old"), data.get("new")) == ("unloading", "unloaded")
    for h in hosts:
        if h.name == name:
            who = f"replica {data['replica']}" if data.get("replica") else "another replica"
            h.heard(model, who if unloaded else None)


class CatchUp:
    """The engine's reconcile, run soon after another replica acted: one run at a time, and one
    more after it when something was heard while it ran (so the last change is seen)."""

    def __init__(self, tasks: set[asyncio.Task]) -> None:
        self.reconcile: Callable[[], Awaitable[None]] | None = None   # set by the engine
        self.host: str | None = None     # a fleet's host: its engine's lines name it
        self.runs = 0
        self._tasks = tasks
        self._again = False
        self._task: asyncio.Task | None = None

    def soon(self) -> None:
        if self.reconcile is None:
            return
        self._again = True
        if self._task is None or self._task.done():
            # Started from the replicas' event reader or heartbeat: the task takes the host's
            # name from here (engine/hostlog.py), as the fleet's calls into the engine do.
            with working_for(self.host) if self.host else contextlib.nullcontext():
                self._task = asyncio.ensure_future(self._run(self.reconcile))
            self._tasks.add(self._task)
            self._task.add_done_callback(self._tasks.discard)

    async def now(self) -> None:
        """A run that starts after this call, done."""
        self.soon()
        task = self._task
        if task is not None and not task.done():
            await asyncio.shield(task)

    async def _run(self, reconcile: Callable[[], Awaitable[None]]) -> None:
        while self._again:
            self._again = False
            self.runs += 1
            try:
                await reconcile()
            except Exception:     # the reconcile tick goes on regardless
                log.exception("reconciling after another replica's change failed")
