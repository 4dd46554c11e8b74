"""Eviction: which loaded models may go now, unloading them safely, pressure and idle timeouts.

Every unload goes through `unload()`: it never touches a model that is busy (a lease of either
kind), waits for memory to come back only when the model's footprint was really observed, and
tells the listeners why it went and for whom.
"""
from __future__ import annotations

import asyncio
import logging
import math
from typing import Callable

from ..errors import ModelUnavailable
from .context import EngineContext, Part
from .extras import ExtraInstances
from .groups import Groups
from .lifecycle import ModelEntry, ModelStatus
from .memory import MemoryPressure
from .preload import PreloadTally
from .policy import (GROUP_SERVING, NOT_OURS, PREDICTION_HORIZON_S, SERVING_ELSEWHERE,
                     SET_POLICIES, Candidate, blocker, cheapest_cover, client_blocker,
                     decayed_heat, expected_cost_s, expected_hold_s, in_residency, select_victims)

log = logging.getLogger("proxy.engine")
S = ModelStatus
RECLAIM_POLL_S = 0.05
ADAPTIVE_HOLD_S = 60.0     # eviction.hold: adaptive — the hold while thrashing...
THRASH_REGRET_S = 30.0     # ...which is a reload of a model evicted less than this before...
THRASH_MEMORY_S = 300.0    # ...seen within this long
PRELOAD_EVICT_MARGIN = 0.25   # a preload evicts only what costs under a quarter of its worth


class Evictor(Part):
    def __init__(self, ctx: EngineContext, preloads: PreloadTally, groups: Groups) -> None:
        super().__init__(ctx)
        self.preloads = preloads
        self.groups = groups
        # One mutation of memory at a time: evictions for a load, for pressure, by hand.
        self.lock = asyncio.Lock()
        self.extras = ExtraInstances(ctx, self.lock)    # instances the proxy loaded twice
        self._evicted_at: dict[str, float] = {}
        self._last_thrash_s: float | None = None

    # -- the anti-thrash hold ----------------------------------------------------------------
    def note_load(self, key: str) -> None:
        """A load starts: a reload of a model evicted moments ago is thrashing."""
        evicted = self._evicted_at.pop(key, None)
        now = self.clock.now()
        if evicted is not None and now - evicted < THRASH_REGRET_S:
            self._last_thrash_s = now

    @property
    def thrashing(self) -> bool:
        return self._last_thrash_s is not None and \
            self.clock.now() - self._last_thrash_s < THRASH_MEMORY_S

    def hold_s(self) -> float:
        hold = self.config.eviction.hold
        if hold in ("off", "expected"):
            return 0.0
        if hold == "adaptive":
            return ADAPTIVE_HOLD_S if self.thrashing else 0.0
        return float(hold)

    def hold_for(self, e: ModelEntry, now: float) -> float:
        """How long loaded model e is spared after its load."""
        if self.config.eviction.hold != "expected":
            return self.hold_s()
        return expected_hold_s(self.registry.reload_s(e), self._p_reuse(e.key, now))

    def _p_reuse(self, key: str, now: float) -> float:
        return max(self.learner.predict(key, now, PREDICTION_HORIZON_S).p_within,
                   self.learner.due_chance(key, now, self.clock.wall(), PREDICTION_HORIZON_S))

    @property
    def config(self):  # noqa: ANN201 - the registry holds the live config
        return self.registry.config

    # -- who may go --------------------------------------------------------------------------
    def why_kept(self, e: ModelEntry, *, critical: bool, requester_waited_s: float = 0.0,
                 waiters: int = 1) -> str | None:
        """Why loaded model e may not be evicted now (None: it may). Under `hold: expected`
        the wait weighed against the hold is every waiter's: waiters × seconds waited."""
        ours, not_ours = self.ours(e, critical=critical)
        now = self.clock.now()
        if self.config.eviction.hold == "expected":
            requester_waited_s *= max(1, waiters)
        why = blocker(busy=e.busy > 0, pinned=self.registry.pinned(e.key), ours=ours,
                      held=in_residency(e.loaded_at_s, now, self.hold_for(e, now),
                                        requester_waited_s),
                      critical=critical, not_ours=not_ours)
        if why is None and self.groups.partner_serving(e):
            return GROUP_SERVING
        shared = self.ctx.shared
        if why is None and shared is not None and shared.busy_elsewhere(e.key, now):
            return SERVING_ELSEWHERE
        return why

    def ours(self, e: ModelEntry, *, critical: bool) -> tuple[bool, str]:
        """Is e the proxy's to unload (and if not, why): what it loaded; an SDK client's once
        native.evict allows; anything with eviction.manage_external."""
        if e.owned or self.config.eviction.manage_external:
            return True, NOT_OURS
        client = e.client
        if client is None:
            return False, NOT_OURS
        why = client_blocker(self.config.native.evict,
                             connected=self.registry.clients[client] > 0, critical=critical)
        return why is None, why or NOT_OURS

    def candidates(self, *, exclude: str | None, critical: bool,
                   requester_waited_s: float = 0.0, waiters: int = 1, predicted: bool = False
                   ) -> list[Candidate]:
        now = self.clock.now()
        out = []
        for e in self.registry:
            if e.status is not S.LOADED or e.key == exclude:
                continue
            if self.why_kept(e, critical=critical, requester_waited_s=requester_waited_s,
                             waiters=waiters):
                continue
            out.append(self.candidate(e, now, predicted=predicted))
        return out

    def candidate(self, e: ModelEntry, now: float, predicted: bool = False) -> Candidate:
        p_reuse = 0.0
        if predicted or self.config.eviction.policy in SET_POLICIES:
            p_reuse = self.learner.predict(e.key, now, PREDICTION_HORIZON_S).p_within
        return Candidate(
            p_reuse=p_reuse, p_due=self.learner.due_chance(e.key, now, self.clock.wall(),
                                                           PREDICTION_HORIZON_S),
            key=e.key, footprint_bytes=self.registry.held_bytes(e),
            last_used_s=e.last_used_at_s or e.loaded_at_s or now,
            priority=self.registry.priority(e.key), reload_s=self.registry.reload_s(e),
            rate_per_h=self.accounting.usage_of(e.key).rate_per_h(now),
            heat=decayed_heat(e.heat, e.heat_at_s, now),
            own_wait_s=_or_inf(self.learner.own_wait(e.key, now)))

    def choose(self, need_bytes: float, *, exclude: str | None, critical: bool,
               requester_waited_s: float = 0.0, waiters: int = 1, partial: bool = False
               ) -> tuple[str, ...]:
        """Victims in eviction order; a together group's idle members are one choice. The
        partners of the model to load (exclude) are spared while others can make room."""
        candidates = self.candidates(exclude=exclude, critical=critical,
                                     requester_waited_s=requester_waited_s, waiters=waiters)
        spares = (exclude, None) if exclude in self.groups.index.together else (None,)
        for spare in spares:
            units, riders = self.groups.units(candidates, spare)
            picked = select_victims(self.config.eviction.policy, units, need_bytes,
                                    self.clock.now(), partial=partial)
            if picked:
                break
        return _with_riders(picked, riders)

    async def evict_for_guess(self, key: str, short_bytes: float, value_s: float) -> bool:
        """Make room for a preload of key only when the cheapest victim set is expected to
        cost (reload seconds × chance of reuse) under PRELOAD_EVICT_MARGIN of what the preload
        is expected to save (value_s). True when it evicted."""
        units, riders = self.groups.units(self.candidates(exclude=key, critical=False,
                                                          predicted=True), key)
        candidates = {c.key: c for c in units}
        victims = cheapest_cover(units, short_bytes, expected_cost_s)
        if not victims or sum(expected_cost_s(candidates[k]) for k in victims) >= \
                PRELOAD_EVICT_MARGIN * value_s:
            return False
        await self.evict(_with_riders(victims, riders), "preload", key)
        return True

    # -- unloading ---------------------------------------------------------------------------
    async def evict(self, keys: tuple[str, ...], reason: str, for_model: str | None = None
                    ) -> list[str]:
        """Unload the victims chosen; a member that goes with its together group's victim
        says so (`group:<name>`), and none goes while another member serves."""
        gone: list[str] = []
        for key in keys:
            e = self.registry.entries[key]
            if self.groups.partner_serving(e):
                continue
            why = self.groups.rider_reason(key, set(gone)) or reason
            if await self.unload(e, why, for_model):
                gone.append(key)
        return gone

    async def evict_for(self, need_bytes: float, *, exclude: str | None, critical: bool,
                        reason: str, partial: bool = False) -> bool:
        victims = self.choose(need_bytes, exclude=exclude, critical=critical, partial=partial)
        await self.evict(victims, reason, exclude)
        return bool(victims)

    async def unload(self, e: ModelEntry, reason: str, for_model: str | None = None) -> bool:
        """Unload an idle model and wait for its memory; False if it was not idle and loaded."""
        if e.status is not S.LOADED or e.busy:
            return False
        learned = e.footprint_bytes if self.registry.configured_footprint_bytes(e.key) is None \
            else None
        local = self.monitor.sampler.local
        # Only a footprint we observed is worth waiting for; an estimate may never come back.
        before = await self.monitor.sample() if local and learned else None
        if e.busy or e.status is not S.LOADED:
            return False     # a request took it, or someone else unloaded it, while we sampled
        shared = self.ctx.shared
        # Another replica serves it: passed over until its next lease batch, then asked again.
        if shared is not None and not await shared.may_unload(
                e.key, self.clock.now(), shared.replica.lease_ttl_s / 3):
            return False
        if e.busy or e.status is not S.LOADED:
            return False
        instance_ids = e.instance_ids
        self.listeners.emit("on_evict", e.key, reason, for_model)   # told before the state
        self.ctx.swap(e, S.LOADED, S.UNLOADING)
        try:
            for instance_id in instance_ids or (e.key,):
                await self.backend.unload(instance_id)
        except BaseException:
            self.ctx.swap(e, S.UNLOADING, S.LOADED)
            raise
        self.monitor.changes += 1
        e.evictions[reason] += 1
        self.accounting.evicted(e)
        self._evicted_at[e.key] = self.clock.now()
        if e.preloaded:
            self.preloads.unloaded_unused(e)
        self.ctx.swap(e, S.UNLOADING, S.UNLOADED)
        self.accounting.forget_owned(instance_ids)
        if shared is not None:
            await shared.owned.unloaded(instance_ids)
        log.info("unloaded %s (%s%s)", e.key, reason, f" for {for_model}" if for_model else "")
        if before is not None and learned:
            await self._await_reclaim(before.available_bytes + 0.5 * learned)
        else:
            await self.monitor.sample()   # the memory figures show the unload at once
        await self.accounting.commit_ownership()
        self.ctx.wake()                   # the memory is back: a waiting load may fit now
        self.listeners.emit("on_unload", e.key, reason)
        return True

    async def unload_drained(self, e: ModelEntry, reason: str, timeout_s: float) -> bool:
        """Unload e once in-flight requests finish (never cut a generation); ModelUnavailable
        if it is still busy after timeout_s. False if it was not loaded by then."""
        try:
            async with asyncio.timeout(timeout_s):
                while e.status in (S.LOADING, S.UNLOADING) or e.busy:
                    if e.leases or e.holds:
                        await e.drained.wait()
                    elif e.reserved:
                        await asyncio.sleep(0)   # its waiters take their leases first
                    elif e.load_task is not None and not e.load_task.done():
                        await asyncio.wait([e.load_task])
                    else:
                        await e.settled.wait()
        except TimeoutError:
            raise ModelUnavailable(f"'{e.key}' is still busy after {timeout_s:g}s ({e.leases} "
                                   f"request(s), {e.holds} probe(s) or reads); not unloaded",
                                   retry_after_s=timeout_s) from None
        async with self.lock:
            await self.unload(e, reason)
        return e.status is S.UNLOADED

    async def _await_reclaim(self, target_available_bytes: float) -> None:
        """After an unload memory returns to the OS a little later; admit nothing before."""
        deadline = self.clock.now() + self.config.memory.reclaim_timeout_s
        while True:
            s = await self.monitor.sample()
            if s.available_bytes >= target_available_bytes or self.clock.now() >= deadline:
                return
            await asyncio.sleep(RECLAIM_POLL_S)

    async def unload_abandoned(self, late: list[ModelEntry],
                               wanted: Callable[[str], bool]) -> None:
        """Loads of ours that completed after their requests gave up: unless a request waits
        for one again (or it is pinned), it goes now rather than sit in memory for nobody."""
        for e in late:
            if not (e.busy or wanted(e.key) or self.registry.pinned(e.key)):
                async with self.lock:
                    await self.unload(e, "abandoned")

    # -- pressure and idleness ---------------------------------------------------------------
    async def relieve(self, *, critical: bool) -> list[str]:
        """Evict by policy while pressure is high (at critical, residency is waived)."""
        evicted: list[str] = []
        while self.monitor.level.rank >= MemoryPressure.HIGH.rank:
            s = self.monitor.last_sample
            assert s is not None
            # Free enough to get below the threshold by the gauge's hysteresis margin.
            need = 0.03 * s.total_bytes - self.monitor.headroom(s)
            async with self.lock:
                victims = self.choose(max(need, 1.0), exclude=None, critical=critical,
                                      partial=True)
                evicted += await self.evict(victims, "pressure")
            if not victims:
                break
            await self.monitor.sample()
        return evicted

    async def unload_idle(self) -> list[str]:
        """Unload what the proxy loaded and nobody used for its idle timeout (pins kept), and
        what SDK clients loaded once it is the proxy's to manage (native.evict); and the extra
        instances of a model the proxy loaded twice, when it is idle (engine/extras.py)."""
        now = self.clock.now()
        out = []
        for e in list(self.registry):
            managed = e.owned or (e.client is not None and self.ours(e, critical=False)[0])
            if e.status is not S.LOADED or e.busy or not managed or \
                    self.groups.partner_serving(e):
                continue
            ttl_s = self.registry.ttl_s(e.key)
            if self.registry.pinned(e.key) or ttl_s <= 0:
                continue
            last_used_s = self.groups.last_used_s(e)   # a together group's: its last use
            if now - (now if last_used_s is None else last_used_s) >= ttl_s:
                async with self.lock:
                    if await self.unload(e, "idle"):
                        out.append(e.key)
        await self.extras.trim()
        return out


def _with_riders(victims: tuple[str, ...], riders: dict[str, tuple[str, ...]]
                 ) -> tuple[str, ...]:
    """Each victim followed by the members of its together group that go with it."""
    return tuple(k for v in victims for k in (v, *riders.get(v, ())))


def _or_inf(wait_s: float | None) -> float:
    return math.inf if wait_s is None else wait_s
