"""What a replica shares with the other replicas of the proxy (`state.backend: redis`).

`Replica` (engine/replica.py) is this process among the replicas. `SharedHost` is one host's
share of it, handed to that host's engine, which asks it at the moments something changes — never on a request's hot path:

    load_slot(e, need, room)   the (host, model) single-flight lock and a reservation of its
                               memory (engine/shared_load.py)
    owned                      instances any replica loaded: the proxy's (evictable), and
                               written back where Redis lost them (engine/shared_owned.py)
    may_unload(key)            False while another replica serves the model; True is a claim
                               to unload it, which holds off other replicas' new leases
                               until the unload ends
    leased(key)                this replica's lease on the model is in the shared state: a
                               request takes it with no round trip (the hot path); otherwise
    lease_now(key)             puts it there before the request goes on (False: another
                               replica is unloading the model, or has unloaded the fleet's
                               copy this replica still counts resident; the engine reconciles
                               first, and loads it itself if it is gone)
    heard(model, by)           another replica's load or unload (`by`: "replica <id>") of it
                               here has ended (the replicas' event stream): the engine
                               reconciles now (engine/shared_heard.py), not at its next tick
    unloaded_by                model → who was heard (or seen, by its claim) unloading it: the
                               reconcile that finds it gone says so, and counts no eviction
                               by the server
    touch(key)                 a request took a lease: renewed in the next batch, and in the
                               one after (a lease outlives its model's last request by a batch)
    arrived(key, wall_s)       a request arrived: told to the others with the batch, who learn
                               it as if asked (engine/shared_usage.py; heard_arrival)
    want(keys)                 a load here waits for nothing but these models, which other
                               replicas serve: they give their lease up at the model's next
                               idle moment there (a batch, or its last request's end), as a
                               single proxy would evict it between two requests
                               (engine/shared_wants.py)
    publish_soon()             the host's record, and the footprints and load times this
                               replica measured (engine/shared_learned.py), for the others;
                               first compared with theirs: does every replica name this
                               server alike (engine/shared_names.py)

The host's own model list stays the source of truth: a waiting replica learns that the load is
done from the host, and every replica reconciles against it. With `state.backend: memory`
there is no Replica and the engine does none of this.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Callable

from ..errors import StateUnavailable
from ..state import HostRecord
from .lifecycle import OWNER_PROXY, ModelStatus
from .shared_heard import CatchUp
from .shared_load import POLL_S, LoadSlots
from .shared_learned import LearnedShare
from .shared_names import HostNames
from .shared_owned import FleetOwned
from .shared_usage import UsageShare
from .shared_wants import LeaseWants

if TYPE_CHECKING:
    from .registry import Registry
    from .replica import Replica

log = logging.getLogger("proxy.shared")
SINGLE_HOST = "default"        # the host's name in the shared state when there is one
RECORD_TTL_S = 60.0            # a host record not refreshed (reconcile, load) for this long goes


class SharedHost(LoadSlots, LeaseWants, UsageShare):
    def __init__(self, replica: Replica, name: str) -> None:
        self.replica = replica
        self.name = name
        self.store = replica.store
        self.leases_of: Callable[[], list[str]] = lambda: []   # the engine's busy models
        self.record_of: Callable[[], HostRecord] = HostRecord  # the engine's view of its host
        self.record_ttl_s = RECORD_TTL_S
        self._tasks: set[asyncio.Task] = set()
        self.renewed: set[str] = set()
        self.owned = FleetOwned(self.store, name)  # instances the fleet loaded here
        self.remote_busy: dict[str, float] = {}   # model → until (monotonic): leased elsewhere
        self.reserved: dict[str, int] = {}        # model → bytes this replica holds reserved
        self._releasing: dict[str, asyncio.Task] = {}   # model → its last load's release
        self._reserved_s: dict[str, float] = {}          # model → its reservation's TTL
        self.registry: Registry | None = None     # the engine's models (learned facts)
        self.learned = LearnedShare(self.store, name)
        self.names = HostNames(self.store, name)
        self.claims: set[str] = set()             # models this replica has claimed to unload
        self._taking: dict[str, asyncio.Future[bool]] = {}   # model → its lease on the way
        self._lingering: set[str] = set()   # leased here, by no request since the last batch
        self._gone: set[str] = set()        # its fleet copy was unloaded: the host was asked
        self.unloaded_by: dict[str, str] = {}   # model → "replica <id>" heard unloading it
        self.catch_up = CatchUp(self._tasks)     # the engine's reconcile, when others acted
        self._init_wants()
        self._init_usage()

    def serving_now(self) -> tuple[list[str], list[str], list[str]]:
        """(leases to renew, leases to drop, of the renewed those no request holds now). A
        lease outlives the model's last request here by one batch: a model with a request
        every few seconds keeps it, and its requests take the hot path instead of a round trip
        each. The idle ones are withheld until the renewal answers: it gives up those another
        replica's load wants (engine/shared_wants.py)."""
        now = set(self.leases_of()) - self.promised()
        keep = now | (self.renewed - self._lingering)
        gone = [k for k in self.renewed if k not in keep]
        self._lingering = keep - now
        self.renewed = set(keep)
        idle = list(keep - now)
        self.withhold(idle)
        return list(keep), gone, idle

    def publish_soon(self, *_: object) -> None:
        """This replica has just seen the host as it is (its model list, a load or unload of
        its own): that is the host's record now, for every replica to read."""
        task = asyncio.ensure_future(self._publish())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self) -> None:
        with contextlib.suppress(StateUnavailable):
            record = self.record_of()
            await self.names.check(record, self.record_ttl_s)   # before it overwrites one
            await self.store.put_host(self.name, record, self.record_ttl_s)
            if self.registry is not None:
                await self.learned.sync(self.registry.entries)

    on_load = on_unload = publish_soon     # as an engine listener

    def touch(self, key: str) -> None:
        # Its lease is in the state already (leased) or on its way (lease_now): no batch is
        # woken for it, so batches keep their period and a lease its one batch of grace.
        self._lingering.discard(key)

    def leasing(self, key: str) -> bool:
        return key in self.renewed or key in self._taking

    def leased(self, key: str) -> bool:
        """This replica's lease on `key` is in the shared state (taken, or renewed by the last
        batch while a request held it): a request may take it without asking."""
        return key in self.renewed

    async def lease_now(self, key: str) -> bool:
        """A request took the model's first lease here: it is in the shared state before the
        request goes on, for another replica may be about to evict it. False when another
        replica's unload of it has begun: returned once that unload has ended (the engine
        then learns from the host what is left). Concurrent first requests share one call."""
        if not self.replica.ok:
            return True    # no eviction waits on a lease while the state is away (not asked)
        if await self.settling(key):
            return True          # the batch on its way renewed it
        taking = self._taking.get(key)
        if taking is None:
            taking = self._taking[key] = asyncio.ensure_future(self._take(key))
            taking.add_done_callback(lambda _: self._taking.pop(key, None))
        return await asyncio.shield(taking)

    def heard(self, model: str, unloaded_by: str | None = None) -> None:
        if unloaded_by is not None:
            self.unloaded_by[model] = unloaded_by
        else:                                      # resident again since
            self.unloaded_by.pop(model, None)
        self.catch_up.soon()

    def _fleet_loaded(self, key: str) -> tuple[str, ...]:
        """The instances of `key` this replica counts as the fleet's copy here: its first lease
        is refused if a replica has unloaded them since (the stream may not have told yet)."""
        e = self.registry.entries.get(key) if self.registry is not None else None
        if e is None or e.owner != OWNER_PROXY or key in self._gone:
            return ()
        return e.instance_ids

    async def _take(self, key: str) -> bool:
        r = self.replica
        loop = asyncio.get_running_loop()
        deadline = loop.time() + r.lock_ttl_s + POLL_S
        waited = False
        try:
            await self.keep_promise(key)
            while not (taken := await self.store.take_lease(
                    self.name, key, r.lease_ttl_s, self._fleet_loaded(key))):
                if taken is None:
                    # Unloaded by another replica, as the fleet's record says: the engine
                    # asks the host, and if it still lists the model it is leased unasked.
                    self._gone.add(key)
                    return False
                if not waited:
                    # Who unloads it: the reconcile that follows may find the model gone
                    # before that replica's unload event arrives, and must not take it for
                    # the server's own eviction (a claim released meanwhile was another's).
                    claimant = await self.store.unload_claimant(self.name, key)
                    if claimant != r.id:
                        self.unloaded_by[key] = \
                            f"replica {claimant}" if claimant else "another replica"
                waited = True                 # wait out the unload (its claim ends with it)
                if loop.time() >= deadline:
                    return False              # not leased: the next request asks again
                await asyncio.sleep(POLL_S / 5)
            self.renewed.add(key)
            if not waited:              # resident, and no unload stood: nobody unloads it
                self.unloaded_by.pop(key, None)
            if key in self._gone:
                await self._still_ours(key)
        except StateUnavailable as exc:
            # Evictions wait for the state too; the requests after this one do not ask
            # again until the heartbeat reaches it.
            r.unreachable(exc)
        return not waited

    async def _still_ours(self, key: str) -> None:
        """The fleet's record had lost a copy the host still lists (Redis lost its data, or
        the load's lock lapsed before it was recorded): recorded again, as this replica
        counts it, so that the next first lease is not refused for it."""
        self._gone.discard(key)
        e = self.registry.entries.get(key) if self.registry is not None else None
        if e is not None and e.status is ModelStatus.LOADED and e.owner == OWNER_PROXY:
            await self.owned.record(key, e.instance_ids)

    async def fleet_copy(self, key: str, instance_id: str) -> bool:
        """An instance this replica adopted (its load found the host listing the model): is it
        the fleet's copy, another replica's load? That replica records it before it lets the
        load lock go, so while it holds the lock the record is read again. Without this the
        copy would count as loaded outside the proxy until the next reconcile, and a load
        needing its memory would be refused meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.replica.lock_ttl_s
        try:
            while True:
                holder = await self.store.lock_holder(self.name, key)
                if await self.owned.refresh() and self.owned.has(key, (instance_id,)):
                    return True
                if holder in (None, self.replica.id) or loop.time() >= deadline:
                    return False
                await asyncio.sleep(POLL_S / 5)
        except StateUnavailable:
            return False              # the next reconcile after Redis returns decides

    async def may_unload(self, key: str, now_s: float, hold_s: float) -> bool:
        """No other replica holds a live lease on it (asked at the moment of eviction), and
        this replica's claim to unload it stands: no other takes a new lease until the unload
        ends (or is given up; the claim lapses after lock_ttl_s at worst). If another serves
        it, it is not a victim for `hold_s`. Unreachable state: nothing is evicted, nor while
        the state has just lost its data (Redis restarted empty) and the replicas serving a
        model may not have put their leases back: the claim itself is refused until this
        replica's heartbeat finds so, then for a lease TTL."""
        if not self.replica.leases_back():
            self.remote_busy[key] = now_s + hold_s
            return False
        try:
            others = await self.store.claim_unload(self.name, key, self.replica.lock_ttl_s,
                                                   if_live=True)
        except StateUnavailable as exc:
            self.remote_busy[key] = now_s + POLL_S
            self.replica.unreachable(exc)   # said, and shown: the heartbeat may still pass
            return False
        if others:
            self.remote_busy[key] = now_s + hold_s
            return False
        self.claims.add(key)
        # The unload begins in this same step (the model turns UNLOADING) or is given up;
        # once the evicting task yields, a claim whose unload did not begin is released.
        asyncio.get_running_loop().call_soon(self._unload_begun, key)
        return True

    def _unload_begun(self, key: str) -> None:
        e = self.registry.entries.get(key) if self.registry is not None else None
        if e is None or e.status is not ModelStatus.UNLOADING:
            self._end_claim(key)

    def on_state(self, model: str, old: str, new: str) -> None:
        if old == ModelStatus.UNLOADING.value:     # the unload ended, either way
            self._end_claim(model)
        if new in (ModelStatus.LOADED.value, ModelStatus.UNLOADED.value):
            self._gone.discard(model)              # the host has been asked
        if new == ModelStatus.LOADED.value:
            self.unloaded_by.pop(model, None)

    def _end_claim(self, key: str) -> None:
        if key in self.claims:
            self.claims.discard(key)
            task = asyncio.ensure_future(self._release_claim(key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _release_claim(self, key: str) -> None:
        with contextlib.suppress(StateUnavailable):
            await self.store.release_unload(self.name, key)

    def busy_elsewhere(self, key: str, now_s: float) -> bool:
        until = self.remote_busy.get(key)
        return until is not None and until > now_s
