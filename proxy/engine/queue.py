"""The admission queue's membership: a cold model's requests join its one `Pending` and wait
(`ensure_loaded`), an LM Studio SDK client's own load joins it too (`admit_mediated`), a
preload joins as a guess (`preload`); each leaves when its load is done, fails, times out or
nobody waits for it any more. Which pending load starts next, and the room made for it, is the
admitting task's (engine/scheduler.py, which this is a part of)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..errors import InsufficientMemory, ProxyError, UpstreamTimeout
from .fit import Choice
from .lifecycle import ModelEntry, ModelStatus
from .refusals import Holder

if TYPE_CHECKING:
    from .clock import Clock
    from .eviction import Evictor
    from .listeners import Listeners
    from .loader import Loader
    from .refusals import Refusals

S = ModelStatus


@dataclass(eq=False)
class Pending:
    entry: ModelEntry
    since_s: float
    done: asyncio.Future
    waiters: int = 0
    admitted: bool = False
    holders: list[Holder] = field(default_factory=list)  # what held memory when it last waited
    # A load its requester performs itself (an LM Studio SDK client through the proxy):
    # resolved True when admitted, False when the model got loaded meanwhile.
    go: asyncio.Future | None = None
    # A speculative load (a preload): no one waits for it; it gives way to any load a request
    # waits for, and evicts only victims whose expected reload cost is well below the reload
    # it is expected to save (`value_s`).
    speculative: bool = False
    value_s: float = 0.0
    may_evict: bool = True     # False: into free memory only
    why: str = ""              # a preload's reason, given when it starts
    fit: Choice | None = None  # loaded with a smaller context than configured (engine/fit.py)
    # Since when its room could only be made by an eviction the unreachable shared state
    # forbids (None: not so): past state.unavailable_wait_s it is refused, state_unavailable.
    state_blocked_since_s: float | None = None
    # Other replicas' loads hold the room it needs (engine/shared.py): it waits for them
    # unadmitted (reserved_elsewhere), or was admitted and refused its reservation (readmits);
    # what it was told last, its answer should its requests time out meanwhile.
    reserved_elsewhere: bool = False
    readmits: int = 0
    room_taken: str | None = None


class LoadQueue:
    """The request side of the Scheduler (a mixin: the attributes below are the Scheduler's)."""
    pending: dict[str, "Pending"]
    clock: "Clock"
    listeners: "Listeners"
    loader: "Loader"
    evictor: "Evictor"
    refusals: "Refusals"
    config: Any
    ctx: Any            # the EngineContext: its `shared` (engine/shared_wants.py)
    kick: Callable[[], None]
    _ensure_running: Callable[[], None]

    async def ensure_loaded(self, e: ModelEntry, deadline_s: float) -> None:
        """Wait until e's load is done (raises its failure), or the request's deadline (clock
        time) passes. On success the caller must take its lease before it next awaits: the
        model is reserved for it until then."""
        p = self.pending.get(e.key)
        if p is None:
            done = asyncio.get_running_loop().create_future()
            done.add_done_callback(_consume)
            p = self.pending[e.key] = Pending(e, self.clock.now(), done)
            self._ensure_running()
            self.kick()
        elif p.speculative:
            self.kick()       # a guess a request now waits for: a requested load, looked at now
        self._count(p, +1)
        try:
            async with asyncio.timeout(max(0.0, deadline_s - self.clock.now())):
                await asyncio.shield(p.done)
        except TimeoutError:
            raise self._timed_out(p) from None
        finally:
            self._count(p, -1)
            if p.admitted and e.reserved:
                e.reserved -= 1
            if p.waiters == 0 and not p.admitted and not p.done.done():
                # Everyone waiting went away: leave the queue rather than load for nobody.
                self._finish(p, None)

    async def admit_mediated(self, e: ModelEntry, deadline_s: float) -> Pending | None:
        """Queue a load that the caller performs itself, with the same admission, order and
        refusals as any load. Returns the admitted Pending (e is LOADING; report the outcome
        with finish_mediated), or None when there is nothing to load any more."""
        while e.key in self.pending:          # a load of it is under way: that one first
            await self.ensure_loaded(e, deadline_s)
            if e.status is S.LOADED:
                return None
        loop = asyncio.get_running_loop()
        done, go = loop.create_future(), loop.create_future()
        done.add_done_callback(_consume)      # go fails only while its requester awaits it
        p = self.pending[e.key] = Pending(e, self.clock.now(), done, go=go)
        self._count(p, +1)
        self._ensure_running()
        self.kick()
        try:
            async with asyncio.timeout(max(0.0, deadline_s - self.clock.now())):
                admitted = await asyncio.shield(go)
        except BaseException as exc:
            if p.admitted and not done.done():
                # Let in, but the caller is gone (cancelled, or its deadline fell just as it
                # was admitted): nobody will load it, so undo the admission; requests that
                # joined it find the model unloaded and queue a load of their own.
                self.loader.abandoned(e)
                self._finish(p, None)
            elif isinstance(exc, TimeoutError):
                raise self._timed_out(p) from None
            raise
        finally:
            self._count(p, -1)
            if not p.admitted and not done.done():
                self._finish(p, None)         # the caller went away before its turn
        return p if admitted else None

    def preload(self, e: ModelEntry, value_s: float, *, may_evict: bool = True,
                why: str = "") -> bool:
        """Queue a speculative load of e, expected to save value_s seconds of reload (into free
        memory only unless may_evict); False if a load of it is already pending."""
        if e.key in self.pending or e.status is not S.UNLOADED:
            return False
        done = asyncio.get_running_loop().create_future()
        done.add_done_callback(_consume)
        self.pending[e.key] = Pending(e, self.clock.now(), done, speculative=True,
                                      value_s=value_s, may_evict=may_evict, why=why)
        self._ensure_running()
        self.kick()
        return True

    def finish_mediated(self, p: Pending, error: BaseException | None) -> None:
        """The requester's outcome. Without an error it loaded (its waiters' leases reserved
        until they take them), or its requester left: then they find it unloaded and queue a
        load of their own."""
        if error is None:
            p.entry.reserved = p.waiters
        self._finish(p, error)

    def _timed_out(self, p: Pending) -> ProxyError:
        timeout_s = self.config.eviction.queue_timeout_s
        group = None if p.admitted else self.evictor.groups.refusal(p.entry, timeout_s)
        if group is not None:
            return group
        e = p.entry
        if p.admitted and e.status is S.LOADING and e.room_refused is None:
            # memory was found; the load itself is slow
            return UpstreamTimeout(
                f"'{p.entry.key}' is still loading after {timeout_s:g}s "
                f"(eviction.queue_timeout_s); try again shortly",
                retry_after_s=max(1.0, min(30.0, timeout_s)))
        holders = p.holders or self.refusals.holders(e, self.clock.now() - p.since_s)
        refused = e.room_refused or p.room_taken
        if refused is not None and not holders:
            # Other replicas' loads in flight, which this replica's list does not show.
            return InsufficientMemory(f"{refused}; waited {timeout_s:g}s "
                                      f"(eviction.queue_timeout_s)",
                                      retry_after_s=max(1.0, min(30.0, timeout_s)))
        return self.refusals.insufficient(p.entry, holders, f" within {timeout_s:g}s",
                                          retry_after_s=max(1.0, min(30.0, timeout_s)))

    def _count(self, p: Pending, delta: int) -> None:
        p.waiters += delta
        e = p.entry
        e.waiting = p.waiters
        if p.waiters == 0:
            e.waiting_since_s = None
        elif e.waiting_since_s is None:
            # Its first waiter, on a load just queued or one queued before (a preload):
            # the hang alert counts from here.
            e.waiting_since_s = self.clock.now()
        self.listeners.emit("on_queue", e.key, p.waiters)

    def _finish(self, p: Pending, error: BaseException | None) -> None:
        if self.pending.get(p.entry.key) is p:
            del self.pending[p.entry.key]
            if self.ctx.shared is not None:   # its want and its wait end with it
                self.ctx.shared.left(p.entry.key)
        if not p.done.done():
            if error is None:
                p.done.set_result(None)
            else:
                p.done.set_exception(error)
        if p.go is not None and not p.go.done():
            if error is None:
                p.go.set_result(False)
            else:
                p.go.set_exception(error)
        self.kick()


def _consume(f: asyncio.Future) -> None:
    """A pending load may fail with nobody left waiting: retrieve the error so it is not
    reported as never retrieved."""
    if not f.cancelled():
        f.exception()
