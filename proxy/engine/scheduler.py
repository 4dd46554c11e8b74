"""Admission: which waiting load starts next, with room made for it first.

Every request for a cold model joins that model's `Pending` (one per model: its requests are
served together by one load). One task admits, so two loads never spend the same free memory;
each pass walks the pending loads in order and starts every one that fits now or can be made to
fit by eviction. A load that cannot proceed never blocks one behind it that can, except that a
load waiting longer than `eviction.fairness_s` gets first claim: a load behind it may start only
without evicting and only with memory the first one can spare — what it would still be short of
once the models that hold memory for a while (serving, loading, in their residency) let go.
Nothing starves.

Order of a pass: loads past `fairness_s`, oldest first; then the others by how many requests
wait for them (most first), then by age.

Refusals: a load that can never fit (its footprint above the ceiling) fails at once with
`model_too_large`; one known to fail in the memory it may use (engine.loader), or blocked only
by what will not go by itself (pinned models, models that are not ours, memory of other
processes), fails at once with `insufficient_memory`; one blocked by what will go (models
serving, loading, inside their residency) waits up to `eviction.queue_timeout_s`. Each refusal
names what holds the memory and why. Among replicas, a load waits while other replicas' loads
in flight hold its room reserved, and an admitted load whose room they took anyway
(engine/shared_load.py) comes back to the queue as old as it was.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from ..errors import ModelLoadFailed, ProxyError, StateUnavailable, UpstreamError
from .context import EngineContext, Part
from .eviction import Evictor
from .fit import Fitter
from .groups import CLEARED, DROP, WAIT
from .lifecycle import ModelStatus
from .loader import Loader
from .memory import GB, MemoryPressure, MemorySample
from .policy import SERVING_ELSEWHERE
from .preload import PreloadTally
from .queue import LoadQueue, Pending
from .refusals import WILL_GO, Refusals
from .shared_load import RoomTaken

log = logging.getLogger("proxy.engine")
S = ModelStatus
PRELOAD_STALE_S = 60.0        # a preload not started by then is dropped
RESERVED_RECHECK_S = 1.0      # a load waiting for other replicas' reservations looks this often


class Scheduler(LoadQueue, Part):
    def __init__(self, ctx: EngineContext, evictor: Evictor, loader: Loader,
                 preloads: PreloadTally, *,
                 after_load: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(ctx)
        self.evictor = evictor
        self.loader = loader
        self.preloads = preloads
        self.pending: dict[str, Pending] = {}
        self.refusals = Refusals(ctx.registry, ctx.monitor, evictor, ctx.clock,
                                 host_path=ctx.host_path)
        self.fit = Fitter(ctx)
        self._task: asyncio.Task | None = None
        # After each load attempt of its own (the core reconciles a self-evicting server).
        self.after_load = after_load or _nothing

    @property
    def config(self):  # noqa: ANN201
        return self.registry.config

    @property
    def queue_length(self) -> int:
        """Loads waiting for admission (memory)."""
        return sum(1 for p in self.pending.values() if not p.admitted)

    @property
    def requests_waiting(self) -> bool:
        """A load that a request (not a preload) waits for has not started yet."""
        return any(not p.admitted and not p.speculative for p in self.pending.values())

    def kick(self) -> None:
        """Something changed that may let a waiting load proceed."""
        self.ctx.wake()

    async def settled(self) -> None:
        """Wait until every pending load has been looked at since the last change."""
        if self.pending:
            await self.ctx.looked.wait()

    # -- the admitting task ------------------------------------------------------------------
    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="engine-admission")

    async def stop(self) -> None:
        # Answer the queue first: the admitting task runs while anything is pending, and a
        # cancel that lands as its wait ends is lost (asyncio.wait_for, Python 3.11).
        for p in list(self.pending.values()):
            self._finish(p, ProxyError("the engine is shutting down"))
        # A load task outlives its pending entry while it reconciles (after_load).
        tasks = [t for t in [self._task] + [e.load_task for e in self.registry]
                 if t is not None and not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None

    async def _run(self) -> None:
        try:
            await self._admit_while_pending()
        finally:
            self.ctx.looked.set()

    async def _admit_while_pending(self) -> None:
        woken = self.ctx.woken
        while self.pending:
            woken.clear()
            try:
                recheck_s = await self._pass()
            except Exception:   # a bug here must not strand every waiting request
                log.exception("admission pass failed; retrying")
                recheck_s = 1.0
                woken.clear()   # what the failed pass woke waits for the retry, not a spin
            if woken.is_set():
                continue
            self.ctx.looked.set()
            try:
                async with asyncio.timeout(recheck_s):   # (wait_for on 3.11 may lose a cancel)
                    await woken.wait()
            except TimeoutError:
                pass

    def _order(self) -> list[Pending]:
        now, fair_s = self.clock.now(), self.config.eviction.fairness_s
        waiting = [p for p in self.pending.values() if not p.admitted and not p.speculative]
        starving = sorted((p for p in waiting if now - p.since_s >= fair_s),
                          key=lambda p: p.since_s)
        rest = sorted((p for p in waiting if now - p.since_s < fair_s),
                      key=lambda p: (-p.waiters, p.since_s, p.entry.key))
        guesses = sorted((p for p in self.pending.values() if not p.admitted and p.speculative),
                         key=lambda p: (-p.value_s, p.entry.key))
        return starving + rest + guesses

    async def _pass(self) -> float | None:
        """Admit what can go; return seconds until time alone may change the answer."""
        async with self.evictor.lock:
            slack: float | None = None    # bytes later loads may take: set by a first claim
            for p in self._order():
                admitted, claim = await self._try_admit(p, slack)
                if not admitted and not p.speculative and self.ctx.shared is not None:
                    self.ctx.shared.waits(p.entry.key)   # other replicas' preloads give way
                if claim is not None and slack is None and self._starving(p):
                    slack = claim
                elif admitted and slack is not None:
                    slack -= self.registry.footprint_bytes(p.entry)
        return self._recheck_s()

    def _starving(self, p: Pending) -> bool:
        return self.clock.now() - p.since_s >= self.config.eviction.fairness_s

    async def _try_admit(self, p: Pending, slack: float | None
                         ) -> tuple[bool, float | None]:
        """(dealt with: admitted or finished, claim). While p must wait, claim is the memory
        it could spare to a load behind it and still get through once what holds memory for
        a while lets go. With `slack` set (a starving load has first claim), p may go only
        without evicting and within the slack."""
        e = p.entry
        if e.status is S.LOADED:            # loaded by someone else while it waited
            self._finish(p, None)
            return True, None
        if e.status is S.ERROR and self.clock.now() < e.retry_at_s:
            self._finish(p, ModelLoadFailed(e.last_error or f"'{e.key}' failed to load",
                                            retry_after_s=e.retry_at_s - self.clock.now()))
            return True, None
        if e.status in (S.UNLOADING, S.LOADING):
            return False, None              # an unload of it first finishes
        need = self.registry.footprint_bytes(e)
        sample = await self.monitor.sample()
        fit = p.fit = self.fit.plan(e, sample)
        if isinstance(fit, ProxyError):
            self._finish(p, fit)              # too large even at its smallest context
            return True, None
        if fit is not None:
            need = fit.need_bytes
        hopeless = self.refusals.hopeless(e, need, sample)   # then wait and evict for nothing
        if hopeless is not None:
            self._finish(p, hopeless)
            return True, None
        headroom = self.monitor.headroom(sample)
        short = need - headroom
        if p.speculative and p.waiters:
            p.speculative = False             # a request came for it: a load like any other
        turn = await self.evictor.groups.exclusive_turn(
            e, self.evictor, speculative=p.speculative, waited_s=self.clock.now() - p.since_s)
        if turn is WAIT:
            return False, None                # a member of its exclusive group drains first
        if turn is DROP or isinstance(turn, ProxyError):
            self._finish(p, None if turn is DROP else turn)
            return True, None
        if turn is CLEARED:
            sample = await self.monitor.sample()
            short = need - self.monitor.headroom(sample)
        if p.speculative:
            if self.clock.now() - p.since_s > PRELOAD_STALE_S:
                return self._drop(p, "its moment has passed"), None
            if any(not q.admitted and not q.speculative for q in self.pending.values()):
                return False, None            # requested loads first; it waits its turn
            if self.ctx.shared is not None and await self.ctx.shared.demand_elsewhere(e.key):
                return False, None            # so are other replicas' (engine/shared_wants.py)
            try:
                if short > 0 and not (p.may_evict and
                                      await self.evictor.evict_for_guess(e.key, short, p.value_s)):
                    return self._drop(p, "no room worth making"), None
            except UpstreamError as exc:
                return self._drop(p, f"its victims could not be unloaded: {exc.message}"), None
            sample = await self.monitor.sample()
            short = need - self.monitor.headroom(sample)
            if short > 0:
                return self._drop(p, "its victims' memory did not come back"), None
        if slack is not None and (short > 0 or need > slack):
            return False, None              # behind a first claim: only what it can spare
        if short > 0:
            waited_s = self.clock.now() - p.since_s
            victims = self.evictor.choose(short, exclude=e.key,
                                          critical=self.monitor.level is MemoryPressure.CRITICAL,
                                          requester_waited_s=waited_s, waiters=p.waiters)
            if not victims:
                if (refused := self._state_away(p)) is not None:
                    self._finish(p, refused)
                    return True, None
                p.holders = self.refusals.holders(e, waited_s)
                will_go = sum(size for _, size, why in p.holders if why in WILL_GO)
                if will_go < short:
                    self._finish(p, self.refusals.insufficient(e, p.holders, "",
                                                               retry_after_s=30.0))
                    return True, None
                if self.ctx.shared is not None:     # let go where idle (engine/shared_wants.py)
                    self.ctx.shared.want(e.key, (k for k, _, why in p.holders
                                                 if why == SERVING_ELSEWHERE))
                return False, will_go - short
            try:
                gone = await self.evictor.evict(victims, "admission", e.key)
            except UpstreamError as exc:
                # The server could not unload a victim (gone, or refusing): its load would
                # fare no better. Fail it now, rather than ask again at every pass.
                exc.message = (f"cannot make room for '{e.key}': unloading "
                               f"{', '.join(repr(k) for k in victims)} failed: {exc.message}")
                self._finish(p, exc)
                return True, None
            sample = await self.monitor.sample()
            if need > self.monitor.headroom(sample):
                if (refused := self._state_away(p)) is not None:
                    self._finish(p, refused)    # its victims could not be claimed
                    return True, None
                if len(gone) < len(victims):
                    self.kick()     # one is not a victim now (another replica serves it)
                return False, None          # memory is not back yet; the next pass looks again
        if await self._reserved_elsewhere(p, need, sample):
            return False, None
        # The state seen before the awaits above must still hold: a model loaded or being
        # unloaded by someone else meanwhile is for the next pass to look at.
        return self._admit(p, sample), None

    async def _reserved_elsewhere(self, p: Pending, need: float, sample: MemorySample) -> bool:
        """Among replicas: the room is free as this replica sees the host, but other replicas'
        loads in flight have reserved it (their models are not listed yet). p waits for them
        as for any load, rather than be admitted and refused its own reservation; it is not
        evicted for (they are not resident), and it is looked at again each second. One of
        them loading this very model is joined instead (engine/shared.py's load lock)."""
        shared = self.ctx.shared
        if shared is None or p.speculative:
            return False                  # a preload's reservation gives way (_readmit)
        others = await shared.others_reserved_bytes()
        headroom = self.monitor.headroom(sample)
        if need + others <= headroom or await shared.loading_elsewhere(p.entry.key):
            p.reserved_elsewhere = False
            return False
        p.reserved_elsewhere = True
        p.room_taken = (f"Not enough memory on host '{shared.name}' for '{p.entry.key}': it "
                        f"needs {need / GB:.1f} GB of the {headroom / GB:.1f} GB free, and "
                        f"other replicas' loads hold {others / GB:.1f} GB of it")
        return True

    def _state_away(self, p: Pending) -> StateUnavailable | None:
        """Evictions wait for the shared state (no replica may unload what another serves
        unasked): a load that needs one waits for it as any load waits for Redis, up to
        state.unavailable_wait_s, not the whole queue_timeout_s."""
        shared = self.ctx.shared
        if shared is None or shared.replica.ok:
            p.state_blocked_since_s = None
            return None
        now = self.clock.now()
        if p.state_blocked_since_s is None:
            p.state_blocked_since_s = now
        waited_s = now - p.state_blocked_since_s
        if waited_s < shared.replica.unavailable_wait_s:
            return None
        return StateUnavailable(
            f"{shared.replica.error or 'shared state unavailable'}; '{p.entry.key}' needs "
            f"room only an eviction can make, and no replica evicts while the shared state "
            f"cannot say who serves what (waited {waited_s:.0f} s)", retry_after_s=5.0)

    def _drop(self, p: Pending, why: str) -> bool:
        log.debug("preload of %s dropped: %s", p.entry.key, why)
        self._finish(p, None)
        return True

    def _admit(self, p: Pending, sample: MemorySample) -> bool:
        e = p.entry
        self.fit.settle(e, p.fit, sample)
        if not self.ctx.swap(e, (S.UNLOADED, S.ERROR), S.LOADING):
            self.fit.unsettle(e)
            return False
        self.evictor.note_load(e.key)
        p.admitted = True
        if self.ctx.shared is not None:    # it waits on until its room is reserved
            self.ctx.shared.unwant(e.key)
        e.loading_since_s = self.clock.now()
        self.listeners.emit("on_queue_wait", e.key, e.loading_since_s - p.since_s)
        if p.speculative:
            self.preloads.started(e)
            # Told when it starts, not when queued: most queued preloads find no room.
            log.info("preloading %s (%s)", e.key, p.why)
            self.listeners.emit("on_preload", e.key, p.why)
        if p.go is not None:
            p.go.set_result(True)             # its requester loads it
            return True
        e.load_task = asyncio.create_task(self._load(p, sample), name=f"load:{e.key}")
        return True

    async def _load(self, p: Pending, sample: MemorySample) -> None:
        try:
            await self.loader.load(p.entry, sample)
        except asyncio.CancelledError:
            self._finish(p, ProxyError(f"loading '{p.entry.key}' was cancelled"))
            raise
        except RoomTaken as exc:
            await self._readmit(p, exc)
        except BaseException as exc:
            self._finish(p, exc)
        else:
            # Loaded for these requests: nothing may evict it before they take their leases.
            p.entry.reserved = p.waiters
            p.entry.preloaded = p.speculative and p.waiters == 0
            self._finish(p, None)
        await self.after_load()   # once its requests have the model (or the error)

    async def _readmit(self, p: Pending, exc: RoomTaken) -> None:
        """Other replicas' loads took the room p was admitted for: back in the queue, as old
        as it was, once this engine has seen what they loaded (it may evict those models when
        they stop serving, as it would its own). A preload gives way instead."""
        if p.speculative and not p.waiters:
            self._drop(p, "other replicas' loads took its room")
            return
        # Said once: while another replica's long load holds the room it is refused again
        # every few seconds.
        log.log(logging.DEBUG if p.readmits else logging.INFO, "%s; %s waits for room again",
                exc.message, p.entry.key)
        p.readmits += 1
        p.room_taken = exc.message
        if self.ctx.shared is not None:   # still admitted meanwhile: no pass takes it first
            await self.ctx.shared.catch_up.now()
        p.admitted = False
        self.kick()

    def _recheck_s(self) -> float | None:
        """When a residency ends, a waiting load reaches its first claim or another replica's
        hold on a model may have lapsed, look again."""
        now = self.clock.now()
        ev = self.config.eviction
        times = []
        waiting = [p for p in self.pending.values() if not p.admitted]
        holds = [(e.loaded_at_s, self.evictor.hold_for(e, now)) for e in self.registry
                 if waiting and e.status is S.LOADED and e.loaded_at_s is not None]
        weighted = ev.hold == "expected"     # the hold weighs every waiter's wait
        shared = self.ctx.shared
        if waiting and shared is not None:   # another replica's lease on a model may lapse
            times += shared.remote_busy.values()
            times += [p.state_blocked_since_s + shared.replica.unavailable_wait_s
                      for p in waiting if p.state_blocked_since_s is not None]
        for p in waiting:
            times.append(p.since_s + ev.fairness_s)
            if p.reserved_elsewhere:
                times.append(now + RESERVED_RECHECK_S)
            for loaded_at_s, res in holds:
                times.append(loaded_at_s + res)
                times.append(p.since_s + res / (max(1, p.waiters) if weighted else 1))
        future = [t - now for t in times if t > now]
        return max(0.001, min(future)) if future else None


async def _nothing() -> None:
    return None
