"""Among replicas (state.backend: redis), a cold model is placed by one replica at a time.

`turn()` takes the model's placing lock in the shared state; `hand_over()` releases it once the
chosen host's load lock is held, so the next replica sees the load (`elsewhere()`: the hosts
where another replica holds a load lock) and joins it instead of starting a second copy
elsewhere — or, once that load has ended, sees the fleet's copy resident there and is served
by it. Without shared state, or while it is away, a replica places alone.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..engine.lifecycle import ModelEntry
from ..engine.replica import Replica
from ..errors import StateUnavailable
from ..state import LoadLock

if TYPE_CHECKING:
    from .hosts import Host

PLACING = "*placing*"          # the placing lock's host part (no host name has a '*')
PLACING_POLL_S = 0.1


class ReplicaTurns:
    def __init__(self, replica: Replica | None, by_name: dict[str, "Host"]) -> None:
        self.replica = replica
        self.by_name = by_name
        self._tasks: set[asyncio.Task] = set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def turn(self, key: str, listed: list[tuple["Host", ModelEntry]]
                    ) -> LoadLock | None:
        """Among replicas, one places a cold model at a time: its placing lock (held until its
        host's load lock is taken), or None once another replica has placed it (its load shows)
        or coordination is not possible (no shared state, Redis away: placed alone)."""
        if self.replica is None:
            return None
        store, ttl_s = self.replica.store, self.replica.lock_ttl_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * ttl_s
        try:
            while True:
                lock = await store.acquire_lock(PLACING, key, ttl_s)
                if lock is not None:
                    return lock
                loading, loaded = await self.elsewhere(key, listed)
                if loading or loaded or any(h.resident(key) for h, _ in listed) or \
                        loop.time() >= deadline:
                    return None
                await asyncio.sleep(PLACING_POLL_S)
        except StateUnavailable:
            return None

    def hand_over(self, turn: LoadLock, host: str | None, key: str) -> None:
        """Release the placing lock once the chosen host's load lock is held (the next replica
        then sees the load and joins it), or at once when the request joined a load."""
        async def hand_over() -> None:
            store = turn.store
            loop = asyncio.get_running_loop()
            deadline = loop.time() + (self.replica.lock_ttl_s if self.replica else 0.0)
            try:
                while host is not None and loop.time() < deadline:
                    if await store.lock_holder(host, key) is not None or \
                            self.by_name[host].resident(key):
                        break
                    await asyncio.sleep(PLACING_POLL_S / 2)
                await turn.release()
            except StateUnavailable:
                pass   # the lock lapses by itself
        task = asyncio.ensure_future(hand_over())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def elsewhere(self, key: str, listed: list[tuple["Host", ModelEntry]]
                        ) -> tuple[set[str], set[str]]:
        """(hosts where another replica is loading the model now (their load locks), hosts
        where a copy the fleet loaded is resident), in one round trip: the request joins that
        load, or is served by that copy, rather than start a second one elsewhere."""
        if self.replica is None:
            return set(), set()
        me = self.replica.id
        try:
            found = await self.replica.store.whereabouts(key, [h.name for h, _ in listed])
        except StateUnavailable:
            return set(), set()
        return ({n for n, w in found.items() if w.loading_by not in (None, me)},
                {n for n, w in found.items() if w.fleet_loaded})
