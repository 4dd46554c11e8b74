"""A load on one replica that waits for the memory of a model another replica serves.

A single proxy evicts a model for a waiting load between two of its requests. Among replicas a
lease outlives a model's last request by a batch, so a model another replica is asked for every
few seconds would never look idle from here. So a load that requests wait for, blocked by
nothing but models other replicas serve (engine/scheduler.py; with another victim at hand it
takes that one, as a single proxy would keep the model in use), leaves a want of them in the
shared state (`want_unload`), and each replica leasing one gives its lease up at the model's
next idle moment there:

    at a batch             a lease no request holds now is given up in the renewal itself
                           (one atomic step: a request meanwhile waits for its outcome, then
                           takes its lease by asking, as a first request does)
    at a request's end     a model the last batch found wanted, once its last request here
                           ends, gives its lease up at once instead of at the next batch

Giving one up is told on the replicas' stream (`lease_given_up`): the wanting replica looks
again at once. Its claim ends the want; so does the load, once it no longer waits for that
model (admitted, served, refused, failed or left by its clients: `unwant`, `left`), so no
lease is given up for a load that is gone. Unsent or lost, a want lapses a lease TTL after
the load last asked (once per batch while it waits). The model is promised to it for a
batch: a request here meanwhile waits for that claim (as one on a single proxy waits once its
model was chosen to make room) rather than take the lease back at once, which under steady
traffic would refuse the claim every time. Once the claim is seen it waits for the unload and
loads the model again, as after any unload by another replica; with no claim by the batch's
end it takes its lease again (at once if the want is withdrawn meanwhile).

A load that requests wait for and that waits for room here, for whatever reason, is noted in
the shared state too (`waits`, once per batch; ended once it has reserved its room, or by
`left`): preloads on any replica give way to it (`demand_elsewhere`), as on one proxy a
preload waits while a requested load does, rather than fill the memory that load is making
room in.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

from ..errors import StateUnavailable
from ..state import Renewal
from .shared_load import POLL_S

if TYPE_CHECKING:
    from .replica import Replica

log = logging.getLogger("proxy.shared")
GIVEN_UP_EVENT = "lease_given_up"   # the replicas' stream: a lease given up for a want


class LeaseWants:
    """SharedHost's part: its leases given up for other replicas' waiting loads."""

    name: str
    replica: "Replica"
    renewed: set[str]
    remote_busy: dict[str, float]
    unloaded_by: dict[str, str]
    leases_of: Callable[[], list[str]]
    _tasks: set[asyncio.Task]

    def _init_wants(self) -> None:
        self.wanted: set[str] = set()   # leased here, wanted by another replica's load
        self.given_up = 0               # leases given up so (GET /proxy/stats: replicas)
        self.wake: Callable[[], None] = lambda: None    # the engine's admission, set by it
        self._settling: dict[str, asyncio.Future[None]] = {}   # model → its renewal's outcome
        self._wanting: dict[str, float] = {}    # model → when its want is next sent (loop s)
        self._promised: dict[str, float] = {}   # model → until (loop s): given up, not claimed
        self._wants_of: dict[str, set[str]] = {}    # a load waiting here → the models it wants
        self._waits: dict[str, float] = {}  # such a load → when it is next noted (loop s)
        self._giving_way: set[str] = set()  # preloads here told to wait for them (logged)
        # Wants, waits and their withdrawals reach the state in the order they were made: a
        # withdrawal overtaken by the want it ends would leave that want standing.
        self._telling = asyncio.Lock()

    def want(self, load: str, keys: Iterable[str]) -> None:
        """A load here waits for nothing but these models' memory, which other replicas
        serve. Sent at most once per batch per model, without holding the admission pass;
        models it wanted before and no load here wants now are withdrawn."""
        before = self._all_wanted()
        self._wants_of[load] = keys = set(keys)
        self._withdraw(before - self._all_wanted())
        now = asyncio.get_running_loop().time()
        due = sorted(k for k in keys if self._wanting.get(k, 0.0) <= now)
        if not due or not self.replica.ok:
            return
        for key in due:
            self._wanting[key] = now + self.replica.lease_ttl_s / 3
        self._tell_state(self.replica.store.want_unload, self.name, due,
                         self.replica.lease_ttl_s)

    def unwant(self, load: str) -> None:
        """That load waits for no other replica's model now (it was admitted)."""
        before = self._all_wanted()
        self._wants_of.pop(load, None)
        self._withdraw(before - self._all_wanted())

    def waits(self, load: str) -> None:
        """A load requests wait for waits for room here: noted once per batch while it does."""
        now = asyncio.get_running_loop().time()
        if self._waits.get(load, 0.0) > now or not self.replica.ok:
            return
        self._waits[load] = now + self.replica.lease_ttl_s / 3
        self._tell_state(self.replica.store.note_waiting, self.name, load,
                         self.replica.lease_ttl_s)

    def room_reserved(self, load: str) -> None:
        """That load holds its room now (engine/shared_load.py): it waits no more."""
        if self._waits.pop(load, None) is not None:
            self._tell_state(self.replica.store.end_waiting, self.name, load)

    def left(self, load: str) -> None:
        """That load left the queue (loaded, refused, failed, or nobody waits any more)."""
        self.unwant(load)
        self.room_reserved(load)
        self._giving_way.discard(load)

    async def demand_elsewhere(self, preload: str) -> bool:
        """Loads other replicas' requests wait for wait for room here: the preload gives way
        (none known while the state is away: its reservation decides)."""
        try:
            waiting = await self.replica.store.waiting_loads(self.name)
        except StateUnavailable:
            return False
        waiting = {(r, m) for r, m in waiting if r != self.replica.id}
        if waiting and preload not in self._giving_way:     # said once, not at every pass
            self._giving_way.add(preload)
            log.debug("preload of %s waits: %s", preload, ", ".join(
                f"{m} waits for room on replica {r}" for r, m in sorted(waiting)))
        return bool(waiting)

    def _all_wanted(self) -> set[str]:
        return set().union(*self._wants_of.values())

    def _withdraw(self, keys: set[str]) -> None:
        if not keys:
            return
        for key in keys:
            self._wanting.pop(key, None)      # wanted again, it is sent at once
        self._tell_state(self.replica.store.withdraw_wants, self.name, sorted(keys))

    def _tell_state(self, call: Callable[..., Awaitable[None]], *args: Any) -> None:
        task = asyncio.ensure_future(self._in_order(call, *args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _in_order(self, call: Callable[..., Awaitable[None]], *args: Any) -> None:
        async with self._telling:
            with contextlib.suppress(StateUnavailable):   # a want lapses; a wait is noted again
                await call(*args)

    def withhold(self, keys: Iterable[str]) -> None:
        """Leases a renewal on its way may give up: until it answers, a request for one of
        them waits for the answer (lease_now) instead of taking it unasked."""
        loop = asyncio.get_running_loop()
        for key in keys:
            self.renewed.discard(key)
            self._settling.setdefault(key, loop.create_future())

    def settle(self, keys: Iterable[str], renewal: Renewal | None) -> list[str]:
        """The renewal's answer for the withheld `keys` (None: it never came, so none of them
        counts as leased: the next request asks). Returns those given up."""
        gone: list[str] = []
        for key in keys:
            if renewal is not None and (self.name, key) not in renewal.given_up:
                self.renewed.add(key)
            else:
                gone.append(key)
            fut = self._settling.pop(key, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        if renewal is not None:
            self.wanted = {m for h, m in renewal.wanted if h == self.name}
            for key in gone:
                self._given_up(key, renewal.given_up.get((self.name, key)))
        return gone

    async def settling(self, key: str) -> bool:
        """Waits for a renewal that may give `key`'s lease up; True if the lease is still held."""
        fut = self._settling.get(key)
        if fut is None:
            return False
        await asyncio.shield(fut)
        return key in self.renewed

    def idle_now(self, key: str) -> None:
        """The last request on `key` here has ended: if a load elsewhere wants its memory,
        the lease goes now rather than at the next batch."""
        if key not in self.wanted or key not in self.renewed or not self.replica.ok or \
                key in self.leases_of():        # still serving, or pinned here
            return
        self.wanted.discard(key)
        self.withhold([key])
        task = asyncio.ensure_future(self._give_up_now(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _give_up_now(self, key: str) -> None:
        renewal = None
        try:
            renewal = await self.replica.store.renew_leases(
                [(self.name, key)], self.replica.lease_ttl_s, idle=[(self.name, key)])
        except StateUnavailable as exc:
            self.replica.unreachable(exc)
        finally:
            self.settle([key], renewal)

    def _given_up(self, key: str, wanter: str | None) -> None:
        self.given_up += 1
        by = f"replica {wanter}" if wanter else "another replica"
        log.debug("gave up the lease on %s: a load on %s waits for its memory", key, by)
        # Its unload is that replica's: a reconcile here that finds the model gone before
        # the stream tells says so, and counts no eviction by the server. Taking the lease
        # again while the model is resident forgets it.
        self.unloaded_by[key] = by
        self._promised[key] = asyncio.get_running_loop().time() + self.replica.lease_ttl_s / 3
        task = asyncio.ensure_future(self._tell(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tell(self, key: str) -> None:
        with contextlib.suppress(StateUnavailable):
            await self.replica.store.append_event(GIVEN_UP_EVENT, {
                "host": self.name, "model": key, "replica": self.replica.id})

    def promised(self) -> set[str]:
        """Models given up here for another replica's load that has not claimed them yet: a
        request waiting for that claim holds no lease the batch should renew."""
        now = asyncio.get_running_loop().time()
        return {k for k, until in self._promised.items() if until > now}

    async def keep_promise(self, key: str) -> None:
        """A request for a model given up for another replica's load waits, a batch at most,
        for that replica's claim (which ends its want) before it takes the lease again."""
        until = self._promised.get(key)
        if until is None:
            return
        loop = asyncio.get_running_loop()
        try:
            while loop.time() < until:
                if await self.replica.store.wanted_by(self.name, key) in (None, self.replica.id):
                    return                  # claimed (or lapsed): the lease decides what follows
                await asyncio.sleep(POLL_S / 5)
        finally:
            self._promised.pop(key, None)

    def lease_given_up(self, model: str) -> None:
        """Another replica gave up its lease on `model` here: a load waiting for its memory
        asks again now, not when the refusal's hold lapses."""
        if self.remote_busy.pop(model, None) is not None:
            self.wake()
