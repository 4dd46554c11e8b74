"""`MemoryState`: the shared facts of one process (the default; no network, cheap).

Every method runs without awaiting, so each is atomic on the event loop, as a Lua script is in
Redis. `view(replica_id)` gives another replica's handle on the same facts: in-process fleets
and the tests of the contract see several replicas without a server.
"""
from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol

import orjson

from .base import (HostRecord, LeaseKey, Learned, LoadLock, Measured, Renewal, Reserved,
                   StoredEvent, Whereabouts, parse_event_id, readable_patterns)

EVENTS_MAXLEN = 10_000


class Now(Protocol):
    def now(self) -> float: ...         # monotonic seconds (the engine's Clock fits)


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()


@dataclass
class _Facts:
    clock: Now
    events_maxlen: int
    replicas: dict[str, float] = field(default_factory=dict)          # replica → expires at
    hosts: dict[str, tuple[HostRecord, float]] = field(default_factory=dict)
    locks: dict[LeaseKey, tuple[int, str, float]] = field(default_factory=dict)  # token, by, exp
    fence: int = 0
    # host → (replica, key) → (bytes, expires at)
    reservations: dict[str, dict[tuple[str, str], tuple[int, float]]] = field(
        default_factory=dict)
    leases: dict[LeaseKey, dict[str, float]] = field(default_factory=dict)  # replica → exp
    unloading: dict[LeaseKey, tuple[str, float]] = field(default_factory=dict)  # by, expires
    wants: dict[LeaseKey, tuple[str, float]] = field(default_factory=dict)      # by, expires
    # host → (replica, model) → expires: loads waiting for room there
    waiting: dict[str, dict[tuple[str, str], float]] = field(default_factory=dict)
    # host → model → (learned, expires at)
    learned: dict[str, dict[str, tuple[Learned, float]]] = field(default_factory=dict)
    # host → (model → its usage pattern as JSON, the host's expiry)
    patterns: dict[str, tuple[dict[str, bytes], float]] = field(default_factory=dict)
    owned: dict[str, dict[str, str]] = field(default_factory=dict)
    leader: tuple[str, float] | None = None
    events: collections.deque = field(default_factory=collections.deque)
    event_n: int = 0
    appended: asyncio.Event = field(default_factory=asyncio.Event)

    def alive(self, replica: str, now_s: float) -> bool:
        return self.replicas.get(replica, 0.0) > now_s


class MemoryState:
    def __init__(self, replica_id: str = "local", *, clock: Now | None = None,
                 events_maxlen: int = EVENTS_MAXLEN, _facts: _Facts | None = None) -> None:
        self.replica_id = replica_id
        self.where = "in this process"
        self._f = _facts or _Facts(clock or MonotonicClock(), events_maxlen)

    def view(self, replica_id: str) -> "MemoryState":
        """Another replica's handle on these same facts."""
        return MemoryState(replica_id, _facts=self._f)

    def _now(self) -> float:
        return self._f.clock.now()

    # -- replicas ---------------------------------------------------------------------------
    async def heartbeat(self, ttl_s: float) -> bool:
        now_s = self._now()
        was = self._f.replicas.get(self.replica_id, 0.0) > now_s
        self._f.replicas[self.replica_id] = now_s + ttl_s
        return was

    async def retire(self) -> None:
        self._f.replicas.pop(self.replica_id, None)

    async def replicas(self) -> list[str]:
        now_s = self._now()
        return sorted(r for r, exp in self._f.replicas.items() if exp > now_s)

    # -- host records -----------------------------------------------------------------------
    async def put_host(self, host: str, record: HostRecord, ttl_s: float) -> None:
        self._f.hosts[host] = (record, self._now() + ttl_s)

    async def get_host(self, host: str) -> HostRecord | None:
        got = self._f.hosts.get(host)
        return got[0] if got and got[1] > self._now() else None

    async def hosts(self) -> dict[str, HostRecord]:
        now_s = self._now()
        return {h: rec for h, (rec, exp) in sorted(self._f.hosts.items()) if exp > now_s}

    # -- single-flight load lock ------------------------------------------------------------
    def _held(self, host: str, model: str) -> tuple[int, str, float] | None:
        held = self._f.locks.get((host, model))
        return held if held and held[2] > self._now() else None

    async def acquire_lock(self, host: str, model: str, ttl_s: float) -> LoadLock | None:
        if self._held(host, model) is not None:
            return None
        self._f.fence += 1
        self._f.locks[(host, model)] = (self._f.fence, self.replica_id, self._now() + ttl_s)
        return LoadLock(self, host, model, self._f.fence)

    def _mine(self, lock: LoadLock) -> bool:
        held = self._held(lock.host, lock.model)
        return held is not None and held[:2] == (lock.token, self.replica_id)

    async def renew_lock(self, lock: LoadLock, ttl_s: float) -> bool:
        if not self._mine(lock):
            return False
        self._f.locks[(lock.host, lock.model)] = (lock.token, self.replica_id,
                                                  self._now() + ttl_s)
        return True

    async def release_lock(self, lock: LoadLock) -> bool:
        if not self._mine(lock):
            return False
        del self._f.locks[(lock.host, lock.model)]
        return True

    async def check_fence(self, host: str, model: str, token: int) -> bool:
        held = self._held(host, model)
        return held is not None and held[0] == token

    async def lock_holder(self, host: str, model: str) -> str | None:
        held = self._held(host, model)
        return None if held is None else held[1]

    # -- memory reservations ----------------------------------------------------------------
    def _live_reservations(self, host: str) -> dict[tuple[str, str], tuple[int, float]]:
        now_s = self._now()
        table = self._f.reservations.get(host, {})
        for k in [k for k, (_, exp) in table.items()
                  if exp <= now_s or not self._f.alive(k[0], now_s)]:
            del table[k]
        return table

    async def reserve(self, host: str, key: str, size_bytes: int, budget_bytes: int,
                      ttl_s: float, *, if_live: bool = False) -> Reserved:
        if if_live and not self._f.alive(self.replica_id, self._now()):
            return Reserved(False, 0, lost=True)
        table = self._live_reservations(host)
        mine = (self.replica_id, key)
        others = sum(b for k, (b, _) in table.items() if k != mine)
        if others + size_bytes > budget_bytes:
            return Reserved(False, others + table.get(mine, (0, 0.0))[0])
        self._f.reservations.setdefault(host, table)[mine] = (size_bytes, self._now() + ttl_s)
        return Reserved(True, others + size_bytes)

    async def release_reservation(self, host: str, key: str) -> None:
        self._f.reservations.get(host, {}).pop((self.replica_id, key), None)

    async def reserved_bytes(self, host: str) -> int:
        return sum(b for b, _ in self._live_reservations(host).values())

    # -- in-flight leases -------------------------------------------------------------------
    async def renew_leases(self, leases: Iterable[LeaseKey], ttl_s: float,
                           idle: Iterable[LeaseKey] = ()) -> Renewal:
        exp, idle = self._now() + ttl_s, set(idle)
        given_up, wanted = {}, set()
        for key in leases:
            if (wanter := self._wanter(key)) not in (None, self.replica_id):
                if key in idle:
                    given_up[key] = wanter
                    await self.drop_leases([key])
                    continue
                wanted.add(key)
            self._f.leases.setdefault(key, {})[self.replica_id] = exp
        return Renewal(given_up, frozenset(wanted))

    def _wanter(self, key: LeaseKey) -> str | None:
        want, now_s = self._f.wants.get(key), self._now()
        return want[0] if want is not None and want[1] > now_s and \
            self._f.alive(want[0], now_s) else None

    async def drop_leases(self, leases: Iterable[LeaseKey]) -> None:
        for key in leases:
            holders = self._f.leases.get(key)
            if holders is not None:
                holders.pop(self.replica_id, None)
                if not holders:
                    del self._f.leases[key]

    async def leased_by(self, host: str, model: str) -> set[str]:
        now_s = self._now()
        holders = self._f.leases.get((host, model), {})
        return {r for r, exp in holders.items() if exp > now_s and self._f.alive(r, now_s)}

    def _claimant(self, key: LeaseKey) -> str | None:
        claim = self._f.unloading.get(key)
        return claim[0] if claim is not None and claim[1] > self._now() else None

    async def take_lease(self, host: str, model: str, ttl_s: float,
                         fleet_loaded: Iterable[str] = ()) -> bool | None:
        if self._claimant((host, model)) not in (None, self.replica_id):
            return False
        fleet_loaded = list(fleet_loaded)
        owned = self._f.owned.get(host, {})
        if fleet_loaded and not any(owned.get(i) == model for i in fleet_loaded):
            return None
        await self.renew_leases([(host, model)], ttl_s)
        return True

    async def unload_claimant(self, host: str, model: str) -> str | None:
        return self._claimant((host, model))

    async def claim_unload(self, host: str, model: str, ttl_s: float, *,
                           if_live: bool = False) -> set[str]:
        if if_live and self._f.replicas.get(self.replica_id, 0.0) <= self._now():
            return {self.replica_id}
        others = await self.leased_by(host, model) - {self.replica_id}
        if not others:
            self._f.unloading[(host, model)] = (self.replica_id, self._now() + ttl_s)
            self._f.wants.pop((host, model), None)
            table = self._f.reservations.get(host, {})
            for held in [k for k in table if k[1] == model]:   # a resident model's: its grace
                del table[held]
        return others

    async def want_unload(self, host: str, models: Iterable[str], ttl_s: float) -> None:
        for model in models:
            self._f.wants[(host, model)] = (self.replica_id, self._now() + ttl_s)

    async def wanted_by(self, host: str, model: str) -> str | None:
        return self._wanter((host, model))

    async def withdraw_wants(self, host: str, models: Iterable[str]) -> None:
        for model in models:
            if self._wanter((host, model)) == self.replica_id:
                del self._f.wants[(host, model)]

    async def note_waiting(self, host: str, model: str, ttl_s: float) -> None:
        self._f.waiting.setdefault(host, {})[(self.replica_id, model)] = self._now() + ttl_s

    async def end_waiting(self, host: str, model: str) -> None:
        self._f.waiting.get(host, {}).pop((self.replica_id, model), None)

    async def waiting_loads(self, host: str) -> set[tuple[str, str]]:
        now_s = self._now()
        return {k for k, exp in self._f.waiting.get(host, {}).items()
                if exp > now_s and self._f.alive(k[0], now_s)}

    async def release_unload(self, host: str, model: str) -> None:
        if self._claimant((host, model)) == self.replica_id:
            del self._f.unloading[(host, model)]

    # -- ownership --------------------------------------------------------------------------
    async def add_owned(self, host: str, instance_id: str, model: str,
                        fence: int | None = None) -> bool:
        if fence is not None and not await self.check_fence(host, model, fence):
            return False
        self._f.owned.setdefault(host, {})[instance_id] = model
        return True

    async def remove_owned(self, host: str, instance_id: str) -> None:
        self._f.owned.get(host, {}).pop(instance_id, None)

    async def owned(self, host: str) -> dict[str, str]:
        return dict(self._f.owned.get(host, {}))

    async def whereabouts(self, model: str, hosts: Iterable[str]) -> dict[str, Whereabouts]:
        out = {}
        for h in hosts:
            held = self._held(h, model)
            out[h] = Whereabouts(None if held is None else held[1],
                                 model in self._f.owned.get(h, {}).values())
        return out

    # -- leader -----------------------------------------------------------------------------
    async def campaign(self, ttl_s: float) -> bool:
        current = await self.leader()
        if current is None or current == self.replica_id:
            self._f.leader = (self.replica_id, self._now() + ttl_s)
            return True
        return False

    async def is_leader(self) -> bool:
        return await self.leader() == self.replica_id

    async def leader(self) -> str | None:
        lead = self._f.leader
        return lead[0] if lead is not None and lead[1] > self._now() else None

    async def resign(self) -> None:
        if await self.is_leader():
            self._f.leader = None

    # -- events -----------------------------------------------------------------------------
    async def append_event(self, type: str, data: dict[str, Any]) -> str:
        f = self._f
        f.event_n += 1
        event = StoredEvent(f"0-{f.event_n}", type, data)
        f.events.append(event)
        while len(f.events) > f.events_maxlen:
            f.events.popleft()
        f.appended.set()
        f.appended = asyncio.Event()
        return event.id

    async def events_after(self, after_id: str | None, *, count: int = 100,
                           wait_s: float = 0.0) -> list[StoredEvent]:
        after = parse_event_id(after_id) if after_id is not None else (0, 0)
        got = self._after(after, count)
        if not got and wait_s > 0:
            try:
                # Not wait_for: on 3.11 it loses a cancel that meets an append (a reader
                # being closed then reads on forever).
                async with asyncio.timeout(wait_s):
                    await self._f.appended.wait()
            except TimeoutError:
                return []
            got = self._after(after, count)
        return got

    def _after(self, after: tuple[int, int], count: int) -> list[StoredEvent]:
        events = self._f.events
        if not events or after[0] > 0:     # ids here are all "0-n": nothing comes after
            return []
        first_n = self._f.event_n - len(events) + 1     # n runs without gaps
        start = max(0, after[1] - first_n + 1)
        return [events[i] for i in range(start, min(len(events), start + count))]

    async def last_event_id(self) -> str:
        events = self._f.events
        return events[-1].id if events else "0-0"

    # -- learned facts ----------------------------------------------------------------------
    async def put_learned(self, host: str, model: str, *, footprint_bytes: float | None = None,
                          load_s: float | None = None, ttl_s: float) -> int:
        at_ms = int(self._now() * 1000)
        table = self._f.learned.setdefault(host, {})
        had = table.get(model)
        old = had[0] if had is not None and had[1] > self._now() else Learned()
        new = Learned(
            old.footprint if footprint_bytes is None else
            Measured(float(footprint_bytes), at_ms, self.replica_id),
            old.load if load_s is None else Measured(float(load_s), at_ms, self.replica_id))
        table[model] = (new, self._now() + ttl_s)
        return at_ms

    async def learned(self, host: str) -> dict[str, Learned]:
        now_s = self._now()
        return {m: rec for m, (rec, exp) in self._f.learned.get(host, {}).items() if exp > now_s}

    async def put_patterns(self, host: str, patterns: Mapping[str, dict[str, Any]],
                           ttl_s: float) -> None:
        kept = self._f.patterns.get(host)
        table = dict(kept[0]) if kept is not None and kept[1] > self._now() else {}
        table.update((model, orjson.dumps(p)) for model, p in patterns.items())   # as Redis
        self._f.patterns[host] = (table, self._now() + ttl_s)

    async def patterns(self, host: str) -> dict[str, dict[str, Any]]:
        kept = self._f.patterns.get(host)
        if kept is None or kept[1] <= self._now():
            return {}
        return readable_patterns(kept[0])

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
