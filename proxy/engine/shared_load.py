"""One load among replicas: the (host, model) single-flight lock, renewed while the load runs,
and a reservation of its memory; a replica that finds another loading the model waits and
adopts it rather than load it twice. A load refused its reservation goes back to admission
(RoomTaken), which counts the memory other replicas' loads hold reserved (engine/scheduler.py).
A part of SharedHost (engine/shared.py)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable

from ..errors import InsufficientMemory, StateUnavailable
from ..state import LoadLock, StateStore
from .memory import GB

if TYPE_CHECKING:
    from .lifecycle import ModelEntry
    from .replica import Replica

log = logging.getLogger("proxy.shared")
POLL_S = 0.25                  # a replica waiting for another's load asks the host this often
RESERVATION_GRACE_S = 2.0      # a loaded model's reservation outlives its load this long
ADOPT = object()               # the host lists the model a load waited for: adopt it
FORCE_BYTES = 2 ** 62          # a budget no reservation exceeds: one put back as it was


class RoomTaken(InsufficientMemory):
    """Other replicas' loads took the room this load was admitted for. Not the answer to a
    request: the load goes back to admission (engine/scheduler.py), which by then sees their
    models resident and makes room as for any load, or waits for them to stop serving."""


class LoadSlots:
    """The load side of SharedHost (a mixin: the attributes below are SharedHost's)."""
    replica: "Replica"
    name: str
    store: StateStore
    _tasks: set[asyncio.Task]
    reserved: dict[str, int]      # model → bytes this replica holds reserved
    _releasing: dict[str, asyncio.Task]   # model → its last load's release, after the grace
    _reserved_s: dict[str, float]         # model → its reservation's TTL
    room_reserved: Callable[[str], None]  # the load no longer waits (engine/shared_wants.py)

    @contextlib.asynccontextmanager
    async def load_slot(self, e: "ModelEntry", need_bytes: float,
                        room: Callable[[], Awaitable[float]],
                        loaded: Callable[[], Awaitable[bool]], timeout_s: float
                        ) -> AsyncIterator[int | None]:
        """Hold the (host, model) load lock and its memory while the block loads e; yields the
        fencing token. When another replica is loading it, waits until `loaded()` (the host
        lists it: the block then adopts it, token None) or the lock is free; also while Redis
        is away (`_acquire`). `room()` is the memory the host has for loads as its own list
        says now; other replicas' loads in flight hold theirs as reservations, and a refused
        reservation is asked again (with the room read again) until a loaded model's
        reservation has lapsed; then RoomTaken sends the load back to admission."""
        r = self.replica
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            lock = await self._acquire(e.key, loaded)
            if isinstance(lock, LoadLock):
                break
            if lock is ADOPT or await loaded():
                yield None
                return
            if loop.time() >= deadline:
                holder = await self.store.lock_holder(self.name, e.key)
                raise StateUnavailable(
                    f"'{e.key}' is being loaded on host '{self.name}' by replica "
                    f"{holder or 'another'}, which has not finished within {timeout_s:g} s")
            await asyncio.sleep(POLL_S)
        renewer = asyncio.ensure_future(self._renew(lock))
        reserved = done = False
        try:
            if await loaded():  # another replica's load finished as this one took the lock
                yield None
                return
            # The last load's reservation of this model is this replica's same entry: its
            # release, still to come after its grace, would take this load's with it.
            await self._superseded(e.key)
            patience = loop.time() + RESERVATION_GRACE_S + 2 * POLL_S
            while True:
                await r.reservations_back()     # after Redis lost its data (engine/replica.py)
                room_bytes = await room()
                granted = await r.patiently(lambda: self.store.reserve(
                    self.name, e.key, int(need_bytes), max(0, int(room_bytes)),
                    timeout_s + r.lock_ttl_s, if_live=True))
                if granted.lost and loop.time() < deadline:
                    r.lost_reservations()       # before this replica's heartbeat found so
                    continue
                # Refused, it holds no memory: not charged meanwhile (registry.charged_bytes),
                # and a request that times out is told why (engine/queue.py).
                e.room_refused = None if granted.granted else (
                    f"Not enough memory on host '{self.name}' for '{e.key}': it needs "
                    f"{need_bytes / GB:.1f} GB of the {room_bytes / GB:.1f} GB not "
                    f"resident" + (f", and other replicas' loads hold "
                                   f"{granted.reserved_bytes / GB:.1f} GB of it"
                                   if granted.reserved_bytes else ""))
                # Asked again only while reservations, which lapse, hold the room: a model this
                # replica has not seen resident yet is for admission to make room from.
                if granted.granted or not granted.reserved_bytes or loop.time() >= patience:
                    break
                await asyncio.sleep(POLL_S)
            if e.room_refused is not None:
                raise RoomTaken(e.room_refused, retry_after_s=r.lock_ttl_s)
            reserved = True
            self.room_reserved(e.key)       # preloads elsewhere need not wait for it now
            self.reserved[e.key] = int(need_bytes)
            self._reserved_s[e.key] = timeout_s + r.lock_ttl_s
            yield lock.token
            done = True
        finally:
            e.room_refused = None
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
            with contextlib.suppress(StateUnavailable):
                await self.store.release_lock(lock)
            if reserved:
                # A loaded model keeps its reservation a moment: a replica that read the
                # host's list just before the load finished still sees its memory taken.
                task = asyncio.ensure_future(self._release_after(
                    e.key, RESERVATION_GRACE_S if done else 0.0, timeout_s + r.lock_ttl_s))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                self._releasing[e.key] = task
                task.add_done_callback(
                    lambda t, key=e.key: self._releasing.pop(key, None)
                    if self._releasing.get(key) is t else None)

    async def put_reservations_back(self) -> None:
        """Redis lost its data: this replica's reservations (its loads in flight, and their
        grace) are written again, unconditionally: the memory is theirs already."""
        for key, size in list(self.reserved.items()):
            with contextlib.suppress(StateUnavailable):
                await self.store.reserve(self.name, key, size, FORCE_BYTES,
                                         self._reserved_s.get(key, self.replica.lock_ttl_s))

    async def _superseded(self, key: str) -> None:
        """A new load of `key` reserves it again: the last load's release, pending after its
        grace, would run later against the new reservation. It runs now instead (the model
        is being loaded again, so the grace has nothing left to cover)."""
        task = self._releasing.pop(key, None)
        if task is not None and task.cancel():
            await asyncio.gather(task, return_exceptions=True)
            with contextlib.suppress(StateUnavailable):   # the reservation overwrites it
                await self.store.release_reservation(self.name, key)

    async def _acquire(self, key: str, loaded: Callable[[], Awaitable[bool]]
                       ) -> LoadLock | object | None:
        """The (host, model) load lock, or None while another replica holds it. While Redis
        cannot be reached it is asked again for up to unavailable_wait_s, and the host is
        asked each time too: ADOPT once it lists the model (another replica's load ended
        meanwhile), for the host's list is the truth a waiting load needs, not Redis."""
        r = self.replica
        loop = asyncio.get_running_loop()
        deadline = loop.time() + r.unavailable_wait_s
        while True:
            try:
                return await self.store.acquire_lock(self.name, key, r.lock_ttl_s)
            except StateUnavailable as exc:
                r.unreachable(exc)
                if await loaded():
                    return ADOPT
                if loop.time() >= deadline:
                    raise
            await asyncio.sleep(POLL_S)

    async def _release_after(self, key: str, delay_s: float, lapses_s: float) -> None:
        """Released after delay_s, and asked again while Redis does not answer: a release
        lost to a blip would hold the memory for every replica until the reservation lapses
        (lapses_s, the load's whole timeout)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + lapses_s
        try:
            await asyncio.sleep(delay_s)
            while True:
                try:
                    await self.store.release_reservation(self.name, key)
                    return
                except StateUnavailable:
                    if loop.time() >= give_up:
                        return
                await asyncio.sleep(POLL_S)
        finally:
            self.reserved.pop(key, None)

    async def loading_elsewhere(self, key: str) -> bool:
        """Another replica holds the model's load lock: joining that load needs no room."""
        try:
            holder = await self.store.lock_holder(self.name, key)
        except StateUnavailable:
            return False
        return holder not in (None, self.replica.id)

    async def others_reserved_bytes(self) -> int:
        """Memory of this host that other replicas' loads in flight hold reserved (a model
        just loaded for the 2 s its reservation outlives it, too); 0 while Redis is away (the
        load's own reservation then waits for it)."""
        try:
            total = await self.store.reserved_bytes(self.name)
        except StateUnavailable:
            return 0
        return max(0, total - sum(self.reserved.values()))

    async def _renew(self, lock) -> None:  # noqa: ANN001 - LoadLock
        while True:
            await asyncio.sleep(self.replica.lock_ttl_s / 3)
            with contextlib.suppress(StateUnavailable):
                if not await lock.renew(self.replica.lock_ttl_s):
                    log.warning("lost the load lock of %s on %s", lock.model, self.name)
                    return
