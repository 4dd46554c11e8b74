"""The fleet's shared facts behind one small interface: `StateStore`.

Two implementations keep the same semantics: `MemoryState` (one process, no network) and
`RedisState` (replicas sharing one Redis). Everything held here is a coordination fact that
expires; the hosts' own model lists stay the source of truth, and replicas reconcile against
them.

    replica heartbeat   a replica's leases and reservations count only while its heartbeat lives
    host records        resident instances, used and budget bytes, as last reported (with a TTL)
    load locks          one per (host, model): single flight across replicas, a fencing token
    reservations        check-and-reserve against a budget, atomically; released or expired
    leases              per (host, model, replica): "serving through some replica, do not evict"
    wants               per (host, model): "a load on this replica waits for its memory, and
                        for nothing else": a replica leasing it gives its lease up at the
                        model's next idle moment there; withdrawn when that load no longer
                        waits
    waiting loads       per host: "a load a request waits for on this replica waits for room
                        here": other replicas' preloads there give way to it
    unload claims       per (host, model): "this replica is unloading it"; taken only while no
                        other replica holds a lease, and no lease is taken while one stands
    ownership           which instances the fleet loaded (kept across replica restarts): also
                        where the fleet's loads are resident now, since an unload removes them
    leader              one replica at a time runs the fleet-wide background jobs
    events              an append-only log, resumable by id, trimmed to a maximum length
    learned             per (host, model): the latest footprint and load time some replica
                        measured, each stamped with when (the store's clock) and by whom

Times given to the store are durations (`ttl_s`); the store measures expiry on its own clock
(the injected one for memory, Redis's for redis), so replicas' clocks never have to agree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol

import orjson

LeaseKey = tuple[str, str]          # (host, model)
_EVENT_ID = re.compile(r"(\d+)-(\d+)")


def parse_event_id(event_id: str) -> tuple[int, int]:
    """An event id (`<ms>-<seq>`, as Redis Streams have them) as a comparable pair."""
    m = _EVENT_ID.fullmatch(event_id)
    if m is None:
        raise ValueError(f"not an event id: {event_id!r} (expected <number>-<number>)")
    return int(m[1]), int(m[2])


@dataclass(frozen=True)
class HostRecord:
    """One host as some replica last saw it: `resident` maps instance id → model key; `url`
    the server the replica reaches under that name (urls.normal_url; "" from a replica that
    did not say)."""
    resident: dict[str, str] = field(default_factory=dict)
    used_bytes: int = 0
    budget_bytes: int = 0
    reported_by: str = ""
    url: str = ""

    def encode(self) -> bytes:
        return orjson.dumps({"resident": self.resident, "used_bytes": self.used_bytes,
                             "budget_bytes": self.budget_bytes,
                             "reported_by": self.reported_by, "url": self.url})

    @classmethod
    def decode(cls, raw: bytes | str) -> "HostRecord":
        d = orjson.loads(raw)
        return cls(resident=dict(d["resident"]), used_bytes=int(d["used_bytes"]),
                   budget_bytes=int(d["budget_bytes"]), reported_by=str(d["reported_by"]),
                   url=str(d.get("url", "")))


@dataclass(frozen=True)
class Reserved:
    """The answer of a check-and-reserve: granted or not, and the host's live reservations
    (bytes, this one included when granted) so that a refusal can say what holds memory."""
    granted: bool
    reserved_bytes: int
    # Asked `if_live` by a replica the state does not count alive (it lost its data since
    # that replica's last heartbeat): nothing reserved, whatever the room.
    lost: bool = False


@dataclass(frozen=True)
class Measured:
    """One replica's measurement of a model on a host: `value` (bytes or seconds), `at_ms` when
    it reached the store (the store's clock: comparable across replicas), `by` which replica."""
    value: float
    at_ms: int
    by: str


@dataclass(frozen=True)
class Learned:
    """What the replicas last measured of one model on one host (None: nobody has)."""
    footprint: Measured | None = None
    load: Measured | None = None


@dataclass(frozen=True)
class Whereabouts:
    """One model on one host as the replicas' own acts left it: the replica loading it now
    (its load lock), and whether an instance the fleet loaded is resident there."""
    loading_by: str | None = None
    fleet_loaded: bool = False


@dataclass(frozen=True)
class Renewal:
    """What a batch of lease renewals found: the leases given up (no request held them, and
    another replica's load wants the model's memory), each with the replica that wants it,
    and the renewed ones such a load wants."""
    given_up: Mapping[LeaseKey, str] = field(default_factory=dict)
    wanted: frozenset[LeaseKey] = frozenset()


PATTERN_MAX_BYTES = 65_536   # a snapshot is a few KB; a field past this was not written by one


def readable_patterns(raw: Mapping[str, bytes | str]) -> dict[str, dict[str, Any]]:
    """The kept snapshots that are JSON objects; another writer's (a hand with redis-cli, a
    version that wrote them otherwise) are left out, not raised: a replica that starts must
    not fail on them."""
    out = {}
    for model, value in raw.items():
        if len(value) > PATTERN_MAX_BYTES:
            continue
        try:
            snapshot = orjson.loads(value)
        except orjson.JSONDecodeError:
            continue
        if isinstance(snapshot, dict):
            out[model] = snapshot
    return out


UNREADABLE = ""     # the type of a stream entry not as append_event writes it (no data)


@dataclass(frozen=True)
class StoredEvent:
    id: str
    type: str
    data: dict[str, Any]


@dataclass(eq=False)
class LoadLock:
    """A held single-flight lock on one (host, model) load. `token` is a fencing token: it
    increases with every acquisition in the store, and a load's result is written only while
    `valid()` (the lock still holds this very token)."""
    store: "StateStore"
    host: str
    model: str
    token: int

    async def renew(self, ttl_s: float) -> bool:
        return await self.store.renew_lock(self, ttl_s)

    async def release(self) -> bool:
        return await self.store.release_lock(self)

    async def valid(self) -> bool:
        return await self.store.check_fence(self.host, self.model, self.token)


class StateStore(Protocol):
    replica_id: str
    where: str      # where the facts are kept, for the log (never a credential)

    # -- replicas ---------------------------------------------------------------------------
    async def heartbeat(self, ttl_s: float) -> bool:
        """This replica is alive for `ttl_s` more seconds (its leases and reservations count).
        True if the state counted it alive already; False at its first beat, or when the state
        lost it (Redis restarted empty, or the replica was out of reach for over `ttl_s`):
        then the other replicas' leases may be missing until their next batch too."""
    async def retire(self) -> None:
        """This replica leaves now: its leases and reservations stop counting at once."""
    async def replicas(self) -> list[str]:
        """Replicas whose heartbeat is alive, sorted."""

    # -- host records -----------------------------------------------------------------------
    async def put_host(self, host: str, record: HostRecord, ttl_s: float) -> None: ...
    async def get_host(self, host: str) -> HostRecord | None: ...
    async def hosts(self) -> dict[str, HostRecord]: ...

    # -- single-flight load lock ------------------------------------------------------------
    async def acquire_lock(self, host: str, model: str, ttl_s: float) -> LoadLock | None:
        """The lock with a fresh fencing token, or None when another holder has it."""
    async def renew_lock(self, lock: LoadLock, ttl_s: float) -> bool:
        """Extends the lock if this holder (this token) still has it."""
    async def release_lock(self, lock: LoadLock) -> bool:
        """Releases the lock only if this holder still has it."""
    async def check_fence(self, host: str, model: str, token: int) -> bool:
        """Does the (host, model) lock currently hold `token`?"""
    async def lock_holder(self, host: str, model: str) -> str | None:
        """The replica holding the (host, model) lock now, if any."""

    # -- memory reservations ----------------------------------------------------------------
    async def reserve(self, host: str, key: str, size_bytes: int, budget_bytes: int,
                      ttl_s: float, *, if_live: bool = False) -> Reserved:
        """Atomically: grant `size_bytes` for `key` if the host's live reservations (this
        replica's earlier one for `key` excluded) plus it stay within `budget_bytes`. With
        `if_live`, a replica the state does not count alive is refused (`lost`)."""
    async def release_reservation(self, host: str, key: str) -> None: ...
    async def reserved_bytes(self, host: str) -> int: ...

    # -- in-flight leases -------------------------------------------------------------------
    async def renew_leases(self, leases: Iterable[LeaseKey], ttl_s: float,
                           idle: Iterable[LeaseKey] = ()) -> Renewal:
        """Takes or extends this replica's lease on each (host, model), in one round trip. One
        of `idle` (leases no request here holds now) whose model another replica wants
        (want_unload) is given up instead."""
    async def drop_leases(self, leases: Iterable[LeaseKey]) -> None: ...
    async def leased_by(self, host: str, model: str) -> set[str]:
        """Replicas holding a live lease on (host, model)."""
    async def take_lease(self, host: str, model: str, ttl_s: float,
                         fleet_loaded: Iterable[str] = ()) -> bool | None:
        """Takes or extends this replica's lease on (host, model) unless another replica's
        unload claim on it stands (False: no lease taken; the model is going). With
        `fleet_loaded` (the instances this replica believes the fleet loaded), also unless
        none of them is still in the ownership record as the model's (None: a replica has
        unloaded it since)."""
    async def claim_unload(self, host: str, model: str, ttl_s: float, *,
                           if_live: bool = False) -> set[str]:
        """Atomically: the other replicas holding a live lease on (host, model); when there are
        none, this replica's claim to unload it, for `ttl_s` or until released (and the
        model's want ends, and so do its loads' reservations: the model is resident, so
        theirs is only the grace after the load, and its memory is coming free). Between the
        two, a lease and an unload never both go ahead. With
        `if_live`, a replica the state does not count alive (it lost its data since this
        replica's last heartbeat) is refused: {this replica}."""
    async def want_unload(self, host: str, models: Iterable[str], ttl_s: float) -> None:
        """This replica's want of each model's memory on `host`, for `ttl_s` (a renewal gives
        up the idle leases on them)."""
    async def wanted_by(self, host: str, model: str) -> str | None:
        """The replica whose want of (host, model) stands, if any (a claim ends it). A want
        counts only while its replica's heartbeat lives."""
    async def withdraw_wants(self, host: str, models: Iterable[str]) -> None:
        """Ends this replica's want of each model on `host` (the load that wanted it no longer
        waits); another replica's want of the same model is left alone, in the same step."""
    async def note_waiting(self, host: str, model: str, ttl_s: float) -> None:
        """A load of `model` that requests wait for on this replica waits for room on `host`,
        for `ttl_s` (noted again while it waits): preloads there give way to it."""
    async def end_waiting(self, host: str, model: str) -> None:
        """That load no longer waits (it reserved its room, or left the queue)."""
    async def waiting_loads(self, host: str) -> set[tuple[str, str]]:
        """(replica, model) of the loads waiting for room on `host`, of live replicas."""
    async def release_unload(self, host: str, model: str) -> None:
        """Ends this replica's unload claim (another's is left alone)."""
    async def unload_claimant(self, host: str, model: str) -> str | None:
        """The replica whose unload claim on (host, model) stands, if any."""

    # -- ownership --------------------------------------------------------------------------
    async def add_owned(self, host: str, instance_id: str, model: str,
                        fence: int | None = None) -> bool:
        """Records that the fleet loaded `instance_id`. With `fence`, only while the
        (host, model) lock holds that token (False otherwise: the load lost its lock)."""
    async def remove_owned(self, host: str, instance_id: str) -> None: ...
    async def owned(self, host: str) -> dict[str, str]:
        """instance id → model key, for the instances the fleet loaded on `host`."""
    async def whereabouts(self, model: str, hosts: Iterable[str]) -> dict[str, Whereabouts]:
        """The model on each host, in one step: who is loading it, whether the fleet's copy
        is resident (placing a cold model reads it, to join or use another replica's load)."""

    # -- leader -----------------------------------------------------------------------------
    async def campaign(self, ttl_s: float) -> bool:
        """Takes the leader lease if free, extends it if held; True while this replica leads."""
    async def is_leader(self) -> bool: ...
    async def leader(self) -> str | None: ...
    async def resign(self) -> None: ...

    # -- events -----------------------------------------------------------------------------
    async def append_event(self, type: str, data: dict[str, Any]) -> str:
        """Appends an event; returns its id (ids increase)."""
    async def events_after(self, after_id: str | None, *, count: int = 100,
                           wait_s: float = 0.0) -> list[StoredEvent]:
        """Events after `after_id` (from the oldest kept when None), waiting up to `wait_s`
        for one when there are none yet."""

    async def last_event_id(self) -> str:
        """The id of the newest event kept ("0-0" when there is none): where a reader that
        starts now begins, by the store's own ids, so no replica's clock is involved."""

    # -- learned facts ----------------------------------------------------------------------
    async def put_learned(self, host: str, model: str, *, footprint_bytes: float | None = None,
                          load_s: float | None = None, ttl_s: float) -> int:
        """Records this replica's measurement (either or both), stamped now on the store's
        clock; returns the stamp (ms). The record lives `ttl_s` past its last write."""
    async def learned(self, host: str) -> dict[str, Learned]:
        """model → the latest measurements of it on `host`."""

    async def put_patterns(self, host: str, patterns: Mapping[str, dict[str, Any]],
                           ttl_s: float) -> None:
        """The usage patterns learned of these models on `host` (engine/learning.py's
        snapshots), each replacing the one kept; all of the host's live `ttl_s` past this."""
    async def patterns(self, host: str) -> dict[str, dict[str, Any]]:
        """model → the usage pattern kept of it on `host` (see readable_patterns)."""

    async def ping(self) -> None:
        """Raises StateUnavailable when the store cannot be reached."""
    async def close(self) -> None: ...
