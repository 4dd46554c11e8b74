"""`RedisState`: the fleet's shared facts in one Redis server, through redis.asyncio.

Keys live under a prefix (`lmproxy:` by default), one family per fact:

    replicas                 zset  replica → heartbeat expiry (ms, Redis's clock)
    host:<host>, hosts       string (JSON, PX) and a zset index of live hosts
    lock:<host>:<model>      string "token:replica" (SET NX PX), fence: the token counter
    res:<host>               hash  "replica|key" → "bytes:expires_at_ms"
    lease:<host>:<model>     zset  replica → lease expiry
    unloading:<host>:<model> string replica (PX): the claim of the replica unloading it
    want:<host>:<model>      string replica (PX): a load there waits for the model's memory
    waiting:<host>           zset  "replica|model" → expiry: a load there waits for room
    owned:<host>             hash  instance id → model (a long TTL, refreshed on every use)
    leader                   string replica (PX)
    events                   stream, MAXLEN-trimmed
    learned:<host>           hash  "<model>|footprint" / "<model>|load" → "<at_ms> <value> <replica>"
    patterns:<host>          hash  model → its usage pattern (JSON)   (both: redis_learned.py)

Every key carries a TTL, so keys of replicas and hosts that are gone disappear and Redis's key
count stays flat. Any failure to reach Redis raises `StateUnavailable` naming the redacted URL.
"""
from __future__ import annotations

import urllib.parse
from typing import Any, Iterable

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..urls import redact_url
from . import lua
from .base import (HostRecord, LeaseKey, LoadLock, Renewal, Reserved, StoredEvent,
                   UNREADABLE, Whereabouts, parse_event_id)
from .redis_calls import _guarded, _ms
from .redis_learned import LearnedFacts

PREFIX = "lmproxy:"
EVENTS_MAXLEN = 10_000
MAX_CONNECTIONS = 8              # per replica; the hot path does not use Redis
EVENTS_TTL_S = 86_400.0          # the stream outlives a fleet that went quiet for a day
OWNED_TTL_S = 7 * 86_400.0       # ownership survives replica restarts, not a host gone a week
FENCE_TTL_S = 86_400.0           # the counter re-seeds from the clock, so expiry is safe


def _part(name: str) -> str:
    """A key component: ':' and '|' (the separators) escaped, the rest readable."""
    return urllib.parse.quote(name, safe="/@._-")


class RedisState(LearnedFacts):
    def __init__(self, url: str, replica_id: str, *, prefix: str = PREFIX,
                 events_maxlen: int = EVENTS_MAXLEN, events_ttl_s: float = EVENTS_TTL_S,
                 owned_ttl_s: float = OWNED_TTL_S, timeout_s: float = 2.0) -> None:
        self.replica_id = replica_id
        self.url_shown = redact_url(url)
        self.prefix = prefix
        self.where = f"in Redis at {self.url_shown}, key prefix {prefix!r}"
        self.events_maxlen = events_maxlen
        self.events_ttl_ms = _ms(events_ttl_s)
        self.owned_ttl_ms = _ms(owned_ttl_s)
        self.timeout_s = timeout_s
        # No retries, said explicitly: a hung Redis fails within one timeout, and a command
        # whose reply was lost may have run (a lock taken, an event appended), so the caller
        # decides. Connections that a restart closed are replaced at checkout.
        # A bounded pool: a burst of cold requests waits for a connection (within the
        # timeout) rather than open one each and keep them all after the burst.
        self.pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=timeout_s, decode_responses=True,
            encoding_errors="replace",    # bytes another writer left that are not UTF-8
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0))
        self.client = aioredis.Redis(connection_pool=self.pool)
        self._s = {name: self.client.register_script(getattr(lua, name)) for name in (
            "TOUCH", "LIVE", "PUT_HOST", "ACQUIRE_LOCK", "RENEW_LOCK", "RELEASE_LOCK",
            "RESERVE", "RESERVED", "RENEW_LEASES", "LEASED_BY", "ADD_OWNED", "CAMPAIGN",
            "TAKE_LEASE", "CLAIM_UNLOAD", "PUT_LEARNED", "WHEREABOUTS", "WITHDRAW_WANTS",
            "WANTED_BY", "LIVE_OF_LIVE")}
        self._k_replicas = prefix + "replicas"
        self._k_hosts = prefix + "hosts"
        self._k_fence = prefix + "fence"
        self._k_leader = prefix + "leader"
        self._k_events = prefix + "events"

    def _key(self, family: str, *parts: str) -> str:
        return self.prefix + family + ":" + ":".join(_part(p) for p in parts)

    # -- replicas ---------------------------------------------------------------------------
    @_guarded
    async def heartbeat(self, ttl_s: float) -> bool:
        return bool(await self._s["TOUCH"](keys=[self._k_replicas],
                                           args=[self.replica_id, _ms(ttl_s)]))

    @_guarded
    async def retire(self) -> None:
        await self.client.zrem(self._k_replicas, self.replica_id)

    @_guarded
    async def replicas(self) -> list[str]:
        return sorted(await self._s["LIVE"](keys=[self._k_replicas]))

    # -- host records -----------------------------------------------------------------------
    @_guarded
    async def put_host(self, host: str, record: HostRecord, ttl_s: float) -> None:
        await self._s["PUT_HOST"](keys=[self._key("host", host), self._k_hosts],
                                  args=[host, record.encode(), _ms(ttl_s)])

    @_guarded
    async def get_host(self, host: str) -> HostRecord | None:
        raw = await self.client.get(self._key("host", host))
        return HostRecord.decode(raw) if raw is not None else None

    @_guarded
    async def hosts(self) -> dict[str, HostRecord]:
        names = sorted(await self._s["LIVE"](keys=[self._k_hosts]))
        if not names:
            return {}
        raws = await self.client.mget([self._key("host", h) for h in names])
        return {h: HostRecord.decode(raw) for h, raw in zip(names, raws) if raw is not None}

    # -- single-flight load lock ------------------------------------------------------------
    @_guarded
    async def acquire_lock(self, host: str, model: str, ttl_s: float) -> LoadLock | None:
        token = await self._s["ACQUIRE_LOCK"](
            keys=[self._key("lock", host, model), self._k_fence],
            args=[self.replica_id, _ms(ttl_s), _ms(FENCE_TTL_S)])
        return None if token is None else LoadLock(self, host, model, int(token))

    def _holder(self, lock: LoadLock) -> str:
        return f"{lock.token}:{self.replica_id}"

    @_guarded
    async def renew_lock(self, lock: LoadLock, ttl_s: float) -> bool:
        return bool(await self._s["RENEW_LOCK"](keys=[self._key("lock", lock.host, lock.model)],
                                                args=[self._holder(lock), _ms(ttl_s)]))

    @_guarded
    async def release_lock(self, lock: LoadLock) -> bool:
        return bool(await self._s["RELEASE_LOCK"](
            keys=[self._key("lock", lock.host, lock.model)], args=[self._holder(lock)]))

    @_guarded
    async def check_fence(self, host: str, model: str, token: int) -> bool:
        holder = await self.client.get(self._key("lock", host, model))
        return holder is not None and holder.partition(":")[0] == str(token)

    @_guarded
    async def lock_holder(self, host: str, model: str) -> str | None:
        holder = await self.client.get(self._key("lock", host, model))
        return None if holder is None else holder.partition(":")[2] or None

    # -- memory reservations ----------------------------------------------------------------
    def _field(self, key: str) -> str:
        return _part(self.replica_id) + "|" + key

    @_guarded
    async def reserve(self, host: str, key: str, size_bytes: int, budget_bytes: int,
                      ttl_s: float, *, if_live: bool = False) -> Reserved:
        granted, total = await self._s["RESERVE"](
            keys=[self._key("res", host), self._k_replicas],
            args=[self._field(key), int(size_bytes), int(budget_bytes), _ms(ttl_s),
                  self.replica_id if if_live else ""])
        if int(granted) < 0:
            return Reserved(False, 0, lost=True)
        return Reserved(bool(granted), int(total))

    @_guarded
    async def release_reservation(self, host: str, key: str) -> None:
        await self.client.hdel(self._key("res", host), self._field(key))

    @_guarded
    async def reserved_bytes(self, host: str) -> int:
        return int(await self._s["RESERVED"](keys=[self._key("res", host), self._k_replicas]))

    # -- in-flight leases -------------------------------------------------------------------
    @_guarded
    async def renew_leases(self, leases: Iterable[LeaseKey], ttl_s: float,
                           idle: Iterable[LeaseKey] = ()) -> Renewal:
        leases, idle = list(leases), set(idle)
        if not leases:
            return Renewal()
        given, by, wanted = await self._s["RENEW_LEASES"](
            keys=[self._key("lease", h, m) for h, m in leases] +
                 [self._key("want", h, m) for h, m in leases] + [self._k_replicas],
            args=[self.replica_id, _ms(ttl_s), *("1" if k in idle else "0" for k in leases)])
        return Renewal({leases[int(i) - 1]: str(w) for i, w in zip(given, by)},
                       frozenset(leases[int(i) - 1] for i in wanted))

    @_guarded
    async def drop_leases(self, leases: Iterable[LeaseKey]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for h, m in leases:
            pipe.zrem(self._key("lease", h, m), self.replica_id)
        await pipe.execute()

    @_guarded
    async def leased_by(self, host: str, model: str) -> set[str]:
        return set(await self._s["LEASED_BY"](keys=[self._key("lease", host, model),
                                                    self._k_replicas]))

    @_guarded
    async def take_lease(self, host: str, model: str, ttl_s: float,
                         fleet_loaded: Iterable[str] = ()) -> bool | None:
        taken = int(await self._s["TAKE_LEASE"](
            keys=[self._key("lease", host, model), self._key("unloading", host, model),
                  self._key("owned", host)],
            args=[self.replica_id, _ms(ttl_s), model, *fleet_loaded]))
        return None if taken < 0 else bool(taken)

    @_guarded
    async def claim_unload(self, host: str, model: str, ttl_s: float, *,
                           if_live: bool = False) -> set[str]:
        return set(await self._s["CLAIM_UNLOAD"](
            keys=[self._key("lease", host, model), self._k_replicas,
                  self._key("unloading", host, model), self._key("want", host, model),
                  self._key("res", host)],
            args=[self.replica_id, _ms(ttl_s), "1" if if_live else "0", model]))

    @_guarded
    async def want_unload(self, host: str, models: Iterable[str], ttl_s: float) -> None:
        pipe = self.client.pipeline(transaction=False)
        for model in models:
            pipe.set(self._key("want", host, model), self.replica_id, px=_ms(ttl_s))
        await pipe.execute()

    @_guarded
    async def wanted_by(self, host: str, model: str) -> str | None:
        return await self._s["WANTED_BY"](keys=[self._key("want", host, model),
                                                self._k_replicas])

    @_guarded
    async def withdraw_wants(self, host: str, models: Iterable[str]) -> None:
        keys = [self._key("want", host, model) for model in models]
        if keys:
            await self._s["WITHDRAW_WANTS"](keys=keys, args=[self.replica_id])

    @_guarded
    async def note_waiting(self, host: str, model: str, ttl_s: float) -> None:
        await self._s["TOUCH"](keys=[self._key("waiting", host)],
                               args=[self._field(model), _ms(ttl_s)])

    @_guarded
    async def end_waiting(self, host: str, model: str) -> None:
        await self.client.zrem(self._key("waiting", host), self._field(model))

    @_guarded
    async def waiting_loads(self, host: str) -> set[tuple[str, str]]:
        members = await self._s["LIVE_OF_LIVE"](keys=[self._key("waiting", host),
                                                      self._k_replicas])
        return {(urllib.parse.unquote(r), m) for r, _, m in (x.partition("|") for x in members)}

    @_guarded
    async def unload_claimant(self, host: str, model: str) -> str | None:
        return await self.client.get(self._key("unloading", host, model))

    @_guarded
    async def release_unload(self, host: str, model: str) -> None:
        await self._s["RELEASE_LOCK"](keys=[self._key("unloading", host, model)],
                                      args=[self.replica_id])

    # -- ownership --------------------------------------------------------------------------
    @_guarded
    async def add_owned(self, host: str, instance_id: str, model: str,
                        fence: int | None = None) -> bool:
        return bool(await self._s["ADD_OWNED"](
            keys=[self._key("owned", host), self._key("lock", host, model)],
            args=[instance_id, model, self.owned_ttl_ms, "" if fence is None else str(fence)]))

    @_guarded
    async def remove_owned(self, host: str, instance_id: str) -> None:
        await self.client.hdel(self._key("owned", host), instance_id)

    @_guarded
    async def owned(self, host: str) -> dict[str, str]:
        key = self._key("owned", host)
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(key)
        pipe.pexpire(key, self.owned_ttl_ms)    # in use: keep it
        found, _ = await pipe.execute()
        return dict(found)

    @_guarded
    async def whereabouts(self, model: str, hosts: Iterable[str]) -> dict[str, Whereabouts]:
        hosts = list(hosts)
        if not hosts:
            return {}
        keys = [k for h in hosts for k in (self._key("lock", h, model), self._key("owned", h))]
        found = await self._s["WHEREABOUTS"](keys=keys, args=[model])
        return {h: Whereabouts(by or None, bool(int(loaded)))
                for h, (by, loaded) in zip(hosts, found)}

    # -- leader -----------------------------------------------------------------------------
    @_guarded
    async def campaign(self, ttl_s: float) -> bool:
        return bool(await self._s["CAMPAIGN"](keys=[self._k_leader],
                                              args=[self.replica_id, _ms(ttl_s)]))

    @_guarded
    async def is_leader(self) -> bool:
        return await self.client.get(self._k_leader) == self.replica_id

    @_guarded
    async def leader(self) -> str | None:
        return await self.client.get(self._k_leader)

    @_guarded
    async def resign(self) -> None:
        await self._s["RELEASE_LOCK"](keys=[self._k_leader], args=[self.replica_id])

    # -- events -----------------------------------------------------------------------------
    @_guarded
    async def append_event(self, type: str, data: dict[str, Any]) -> str:
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(self._k_events, {"type": type, "data": orjson.dumps(data)},
                  maxlen=self.events_maxlen, approximate=False)
        pipe.pexpire(self._k_events, self.events_ttl_ms)
        event_id, _ = await pipe.execute()
        return event_id

    @_guarded
    async def events_after(self, after_id: str | None, *, count: int = 100,
                           wait_s: float = 0.0) -> list[StoredEvent]:
        if after_id is not None:
            parse_event_id(after_id)      # a clear ValueError, not Redis's
        start = "-" if after_id is None else "(" + after_id
        got = await self.client.xrange(self._k_events, start, "+", count=count)
        if not got and wait_s > 0:
            # Blocking stays under the socket timeout; callers loop to wait longer.
            block_ms = _ms(min(wait_s, self.timeout_s / 2))
            streams = await self.client.xread({self._k_events: after_id or "0-0"},
                                              count=count, block=block_ms)
            got = streams[0][1] if streams else []
        return [_stored(i, f) for i, f in got]

    @_guarded
    async def last_event_id(self) -> str:
        newest = await self.client.xrevrange(self._k_events, "+", "-", count=1)
        return newest[0][0] if newest else "0-0"

    @_guarded
    async def ping(self) -> None:
        await self.client.ping()

    async def close(self) -> None:
        await self.client.aclose()
        await self.pool.disconnect()


def _stored(event_id: str, fields: dict[str, str]) -> StoredEvent:
    """One stream entry; one that anything else wrote there (no type, or data not a JSON
    object) comes back as UNREADABLE with no data, so a reader goes past it instead of
    failing on it for good."""
    kind, raw = fields.get("type"), fields.get("data")
    try:
        data = orjson.loads(raw) if raw is not None else None
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(kind, str) or not kind or not isinstance(data, dict):
        return StoredEvent(event_id, UNREADABLE, {})
    return StoredEvent(event_id, kind, data)
