"""This process among the proxy's replicas (`state.backend: redis`): its heartbeat, the
leader's lease (only the leader runs idle unloading, preloading and pressure relief), and the
batch that renews its in-flight leases, all in one loop; each host's share of it is a
`SharedHost` (engine/shared.py)."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Awaitable, Callable

from ..config import StateConfig
from ..errors import ConfigError, StateUnavailable
from ..state import StateStore, create_state
from .memory import GB
from .shared import POLL_S, SINGLE_HOST, SharedHost, log
from .shared_heard import heard_on


def create_replica(config: StateConfig) -> "Replica":
    """This process as one of the replicas sharing `state.url` (state.backend: redis)."""
    import os
    url = config.url if config.url is not None else os.environ.get(config.url_env or "")
    if not url:
        raise ConfigError([f"state.url_env: the environment variable {config.url_env} is "
                           "not set"])
    store = create_state(url, replica_id=config.replica_id, prefix=config.key_prefix,
                         timeout_s=config.timeout_s)
    return Replica(store, lease_ttl_s=config.lease_ttl_s, lock_ttl_s=config.lock_ttl_s,
                   unavailable_wait_s=config.unavailable_wait_s)


class Replica:
    def __init__(self, store: StateStore, *, lease_ttl_s: float, lock_ttl_s: float,
                 unavailable_wait_s: float) -> None:
        self.store = store
        self.lease_ttl_s = lease_ttl_s
        self.lock_ttl_s = lock_ttl_s
        self.unavailable_wait_s = unavailable_wait_s
        self.leader = False
        self.ok = True
        self.error: str | None = None
        self.hosts: list[SharedHost] = []
        self._task: asyncio.Task | None = None
        self._beaten = False
        # Until then (loop s) no eviction is claimed: the state lost its data, and the other
        # replicas put their leases back within a batch (engine/shared.py's may_unload).
        self.leases_back_at_s = 0.0
        # Until then (loop s) no new reservation is asked: the state lost its data, and the
        # other replicas put back their loads' reservations at their next heartbeat, within a
        # batch (engine/shared_load.py).
        self.reservations_back_at_s = 0.0

    @property
    def id(self) -> str:
        return self.store.replica_id

    def host(self, name: str) -> "SharedHost":
        h = SharedHost(self, name)
        self.hosts.append(h)
        return h

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.ensure_future(self._loop())
        await self._introduce()

    async def _introduce(self) -> None:
        """Said once at start: where the state is shared, as whom, and with whom (a replica
        on another key_prefix or Redis coordinates with nobody; this line shows it)."""
        said = f"shared state {self.store.where}, as replica {self.id}"
        try:
            others = [r for r in await self.store.replicas() if r != self.id]
            leader = await self.store.leader()
        except StateUnavailable:
            log.info("%s (not reachable yet)", said)
            return
        log.info("%s; other live replicas: %s; leader: %s", said,
                 ", ".join(others) or "none", leader or "none yet")

    async def close(self) -> None:
        tasks = [t for h in self.hosts for t in h._tasks]
        if self._task is not None:
            tasks.append(self._task)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(StateUnavailable):
            if self.leader:
                for h in self.hosts:     # what it learned since its last write
                    await h.write_patterns(now=True)
                await self.store.resign()
            await self.store.retire()     # its leases and reservations void at once
        await self.store.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl_s / 3)
            await self.beat()

    def heard(self, event_type: str, data: dict) -> None:
        """Another replica's event, as the replicas' stream brings it (observe/relayed.py)."""
        heard_on(self.hosts, event_type, data, SINGLE_HOST)

    async def view(self) -> dict:
        """The replicas and the hosts as the shared state holds them (GET /proxy/stats)."""
        try:
            replicas = await self.store.replicas()
            leader = await self.store.leader()
            hosts = await self.store.hosts()
        except StateUnavailable as exc:   # its own counts still: what the outage leaves untold
            return {"ok": False, "replica": self.id, "error": exc.message, **self._counts()}
        return {"ok": True, "replica": self.id, "leader": leader, "replicas": replicas,
                **self._counts(),
                "hosts": {name: {"url": r.url or None,
                                 "resident": sorted(set(r.resident.values())),
                                 "used_gb": round(r.used_bytes / GB, 2),
                                 "budget_gb": round(r.budget_bytes / GB, 2),
                                 "reported_by": r.reported_by}
                          for name, r in hosts.items()}}

    def _counts(self) -> dict[str, Any]:
        # leases this replica gave up for other replicas' waiting loads; requests it told the
        # others of, heard from them (and of those, did not learn), and left untold
        return {"leases_given_up": sum(h.given_up for h in self.hosts),
                "arrivals": {"told": sum(h.arrivals_told for h in self.hosts),
                             "heard": sum(h.arrivals_heard for h in self.hosts),
                             "untold": sum(h.arrivals_untold for h in self.hosts),
                             "unlearned": sum(h.arrivals_unlearned for h in self.hosts)}}

    def name_conflicts(self) -> dict[str, str]:
        """host → how another replica names it otherwise (engine/shared_names.py)."""
        return {h.name: found for h in self.hosts if (found := h.names.conflict())}

    async def beat(self) -> None:
        """Heartbeat, the leader's lease, and every in-flight lease, renewed (or dropped)."""
        try:
            if await self.store.heartbeat(self.lease_ttl_s) is False and self._beaten:
                self._lost()
                for h in self.hosts:
                    await h.put_reservations_back()
            self._beaten = True
            self.leader = await self.store.campaign(self.lease_ttl_s)
            leases, ended, idle = [], [], []
            for h in self.hosts:
                now, gone, quiet = h.serving_now()
                leases += [(h.name, key) for key in now]
                ended += [(h, key) for key in gone]
                idle.append((h, quiet))
            renewal = None
            try:
                renewal = await self.store.renew_leases(
                    leases, self.lease_ttl_s, idle=[(h.name, k) for h, keys in idle for k in keys])
            finally:
                for h, quiet in idle:
                    h.settle(quiet, renewal)
            # A request may have taken one of them again meanwhile: its lease stays.
            ended = [(h.name, key) for h, key in ended if not h.leasing(key)]
            if ended:
                await self.store.drop_leases(ended)
            for h in self.hosts:
                await h.tell_arrivals()
                if self.leader:
                    await h.write_patterns()
        except StateUnavailable as exc:
            self.unreachable(exc)
            return
        if not self.ok:
            log.info("shared state reachable again")
            for h in self.hosts:       # what Redis lost meanwhile is written back now
                h.catch_up.soon()
        self.ok, self.error = True, None

    def _lost(self) -> None:
        """The state no longer counted this replica alive: Redis restarted empty (or this
        replica was out of reach for over lease_ttl_s). Its leases go back in this batch; the
        other replicas' in theirs, so for a lease TTL a model with no lease in the state may
        still be serving elsewhere, and no eviction is claimed."""
        self.leases_back_at_s = asyncio.get_running_loop().time() + self.lease_ttl_s
        self.lost_reservations()
        log.warning("the shared state had lost this replica (Redis restarted empty, or it was "
                    "out of reach for over %g s): no evictions for %g s, nor new reservations "
                    "for %g s, while every replica puts its leases and reservations back",
                    self.lease_ttl_s, self.lease_ttl_s, self.lease_ttl_s / 3 + POLL_S)

    def lost_reservations(self) -> None:
        """The state lost its data (this replica's heartbeat found so, or a reservation asked
        `if_live` was refused): the reservations of the other replicas' loads under way are
        back at their next heartbeat, within a batch of the loss; none is asked until then
        (a batch from now, and a poll's margin for a heartbeat under way)."""
        back_s = asyncio.get_running_loop().time() + self.lease_ttl_s / 3 + POLL_S
        self.reservations_back_at_s = max(self.reservations_back_at_s, back_s)

    async def reservations_back(self) -> None:
        """Returns once the other replicas may have put their reservations back."""
        loop = asyncio.get_running_loop()
        while (wait_s := self.reservations_back_at_s - loop.time()) > 0:
            await asyncio.sleep(wait_s)

    def leases_back(self) -> bool:
        """False while the other replicas may not have put their leases back yet."""
        return asyncio.get_running_loop().time() >= self.leases_back_at_s

    def unreachable(self, exc: StateUnavailable) -> None:
        """The state cannot be reached: degraded (and not leading) until the next heartbeat
        that reaches it."""
        if self.ok:
            log.warning("%s", exc.message)     # "shared state unavailable: Redis at ..."
        self.ok, self.error, self.leader = False, exc.message, False

    async def patiently(self, call: Callable[[], Awaitable]):  # noqa: ANN201
        """A call to the store, retried while it is unreachable, up to unavailable_wait_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.unavailable_wait_s
        while True:
            try:
                return await call()
            except StateUnavailable:
                if loop.time() >= deadline:
                    raise
            await asyncio.sleep(POLL_S)
