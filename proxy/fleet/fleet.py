"""Fleet: several servers behind one proxy, one engine per host and the placer above them.

The fleet is the Engine (engine/face.py) the rest of the proxy holds when `upstreams:` lists
hosts. Each host keeps an EngineCore of its own — registry, monitor, eviction, loader,
scheduler, reconcile, history — exactly as a single-server proxy runs it; the fleet only chooses
the host (fleet/placer.py) and joins the hosts' views. A request for a model resident somewhere
takes the quick path: a look at each host's entry, no memory arithmetic and no await before the
host's own acquire.

Single flight across hosts: a request placed on a host starts or joins that host's load before
the next request is placed (no await between placing and the host's acquire), so racing requests
see the load and join it (placer rule 2) rather than start a second copy elsewhere.

Among replicas (state.backend: redis) one places a cold model at a time (fleet/turns.py), so
replicas join one load too.

A host a request could not reach is `suspect`: it takes no new requests until its engine has
reconciled with it again (`_recover`). The views (the union, the sums) are fleet/aggregate.py;
the refusals when no host takes a model, fleet/refusal.py.
"""
from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from typing import Any, Awaitable

from ..config import Config
from ..engine import hostlog
from ..engine.hostlog import run_for, working_for
from ..engine.lifecycle import Lease, ModelEntry, ModelStatus
from ..engine.replica import Replica
from ..engine.unlisted import Unlisted
from ..engine.usage import RequestRecord
from ..errors import InvalidRequest, ModelNotFound, ProxyError, UpstreamUnreachable
from ..liveconfig import LiveConfig
from ..state import LoadLock
from ..upstream.base import Upstream
from . import refusal
from .aggregate import FleetViews
from .hosts import Host, HostTagged, host_config
from .operations import FleetOperations
from .placer import Placement, pick_resident, place
from .turns import ReplicaTurns
from .views import full_view

log = logging.getLogger("proxy.fleet")
S = ModelStatus
LOADED = S.LOADED   # read per request: a module constant is quicker than an Enum member
RECOVER_POLL_S = 1.0           # a suspect host is asked again this often until it answers
CATALOG_REFRESH_MIN_S = 2.0


class Fleet(FleetOperations, FleetViews):
    def __init__(self, live: LiveConfig, hosts: list[Host], *, rng: random.Random | None = None,
                 replica: Replica | None = None) -> None:
        self.live = live
        self.replica = replica
        self.hosts = hosts
        self.by_name = {h.name: h for h in hosts}
        self.rng = rng or random.Random()
        first = hosts[0].core
        self.clock = first.clock
        self.store = first.store
        self._recovering: dict[str, asyncio.Task] = {}
        self._placing: dict[str, asyncio.Future] = {}   # model → a request placing it now
        self.turns = ReplicaTurns(replica, self.by_name)
        # model → the hosts where it is loaded (and its entry there), kept by state changes
        self._loaded: dict[str, dict[Host, ModelEntry]] = {}
        # Configured names no host lists, judged after each host's reconcile (engine/unlisted.py).
        self._unlisted = Unlisted("any host")
        for h in hosts:
            h.core.ctx.elsewhere = lambda key, h=h: self._held_elsewhere(key, h)
            h.core.add_listener(_StateIndex(self, h))
            h.core.after_reconcile = self._warn_unlisted
        self._refreshed_s = float("-inf")
        self.placements: Counter[str] = Counter()   # rule → requests (GET /proxy/stats)
        live.on_swap(self._swapped)

    def _swapped(self, old: Config, new: Config) -> None:
        for h in self.hosts:
            spec = next((c for c in new.upstreams if c.name == h.name), h.config)
            h.reconfigure(spec)
            h.live.swap(host_config(new, spec))

    @property
    def config(self) -> Config:
        return self.live.current

    def host(self, name: str) -> Host:
        h = self.by_name.get(name)
        if h is None:
            raise InvalidRequest(f"No host '{name[:64]}' in this fleet (hosts: "
                                 f"{', '.join(self.by_name)})", param="host")
        return h

    # -- the request path --------------------------------------------------------------------
    def acquire(self, name: str, *, avoid: str | None = None) -> Awaitable[Lease]:
        """A USE lease on the model on the host the placer chooses (never `avoid`)."""
        holders = self._loaded.get(name)
        if holders:   # the hot path: resident somewhere, no memory arithmetic, no extra frame
            if len(holders) == 1:   # one copy: rule 1 has nothing to choose
                for h, e in holders.items():
                    if e.status is LOADED and h.name != avoid and h.up and h.allows(name):
                        self.placements["resident"] += 1
                        return h.core.acquire(name)
            else:
                copies = self._copies(name, avoid)
                if copies:
                    self.placements["resident"] += 1
                    return self.by_name[pick_resident(copies, self.rng)].core.acquire(name)
        return self._acquire_cold(name, avoid)

    async def _acquire_cold(self, name: str, avoid: str | None) -> Lease:
        key = self._key_of(name) or await self.resolve(name)
        while True:
            listed = self._listed(key, avoid)
            copies = self._copies(key, avoid)
            if copies:
                self.placements["resident"] += 1
                return await self._on(self.by_name[pick_resident(copies, self.rng)], key)
            placing = self._placing.get(key)
            if placing is None:
                break
            await asyncio.shield(placing)   # another request is placing it: look once it has
        placed = self._placing[key] = asyncio.get_running_loop().create_future()
        turn: LoadLock | None = None
        p: Placement | None = None
        try:
            turn = await self.turns.turn(key, listed)
            await asyncio.gather(*(run_for(h.name, h.core.sample_memory)
                                   for h, _ in listed if h.up), return_exceptions=True)
            elsewhere, fleet_loaded = await self.turns.elsewhere(key, listed)
            # Another replica's copy, loaded since this replica's engines last looked: they
            # look now, and the request is served there (rule 1), not loaded a second time.
            await asyncio.gather(*(run_for(h.name, h.core.reconcile) for h, e in listed
                                   if h.name in fleet_loaded and e.status is not LOADED))
            listed = self._listed(key, avoid)
            preferred = self.config.preferred_host(key)
            ceilings = {h.name: h.core.ceiling_bytes() for h in self.hosts if h.up}
            p = place([full_view(h, e, h.name == preferred, h.name in elsewhere,
                                 elsewhere_ceiling_bytes=max(
                                     (c for n, c in ceilings.items() if n != h.name),
                                     default=0.0))
                       for h, e in listed], self.rng,
                      replicate_after_waiters=self.config.placement.replicate_after_waiters)
        finally:
            # Those waiting look again after this request has started or joined its host's
            # load (the host's acquire runs to its first wait before they wake).
            del self._placing[key]
            placed.set_result(None)
            if turn is not None:
                starts = p is not None and p.rule in ("free", "evict", "replicate", "queue")
                self.turns.hand_over(turn, p.host if starts else None, key)   # type: ignore[union-attr]
        host = self._count(p, key, listed, avoid)
        try:
            return await self._on(host, key)
        except UpstreamUnreachable as exc:
            # Its load could not reach the host, which nothing had shown down yet.
            self.host_failed(host.name)
            if avoid is not None:   # placed once elsewhere already: each host tried is named
                exc.message = (f"No host that serves '{key}' is reachable: '{avoid}' did not "
                               f"answer this request, then {exc.message}")
                raise
            return await self._acquire_cold(name, host.name)   # once more, elsewhere

    def _listed(self, key: str, avoid: str | None) -> list[tuple[Host, ModelEntry]]:
        return [(h, e) for h in self.hosts if h.name != avoid
                for e in (h.entry(key),) if e is not None]

    def _held_elsewhere(self, key: str, here: Host) -> bool:
        """Resident, loading or queued to load on a host other than `here`."""
        for h in self.hosts:
            if h is not here:
                e = h.core.registry.entries.get(key)
                if e is not None and (e.status in (S.LOADED, S.LOADING) or
                                      key in h.core.scheduler.pending):
                    return True
        return False

    def _copies(self, key: str, avoid: str | None) -> list[tuple[str, int, int]]:
        """The hosts that hold `key` loaded and take requests: (name, in flight, parallel).
        From the index of loaded copies (kept by each host's state changes): the hot path
        looks at the hosts that hold the model, not at every host."""
        holders = self._loaded.get(key)
        if not holders:
            return []
        out = []
        for h, e in holders.items():
            if e.status is LOADED and h.name != avoid and h.up and h.allows(key):
                out.append((h.name, e.leases, h.config.parallel))
        return out

    def _state_changed(self, h: Host, key: str, old: str, new: str) -> None:
        if new == S.LOADED.value:
            e = h.core.registry.entries.get(key)
            if e is not None:
                self._loaded.setdefault(key, {})[h] = e
        elif old == S.LOADED.value:
            holders = self._loaded.get(key)
            if holders is not None:
                holders.pop(h, None)
                if not holders:
                    del self._loaded[key]

    def _count(self, p: Placement, key: str, listed: list[tuple[Host, ModelEntry]],
               avoid: str | None) -> Host:
        self.placements[p.rule] += 1
        if p.host is None:
            raise self._nowhere(key, listed, p, avoid)
        return self.by_name[p.host]

    async def _on(self, h: Host, key: str) -> Lease:
        try:
            with working_for(h.name):      # the loads it starts there log the host
                return await h.core.acquire(key)
        except ProxyError as exc:
            exc.message = f"{exc.message} (host '{h.name}')"
            raise

    def _nowhere(self, key: str, listed: list[tuple[Host, ModelEntry]], p: Placement,
                 avoid: str | None = None) -> ProxyError:
        if p.rule == "too_large":
            return refusal.too_large(key, self.hosts)
        return refusal.unreachable(key, listed, avoid, retry_after_s=RECOVER_POLL_S * 5)

    def upstream_for(self, lease: Lease) -> Upstream:
        return self.by_name[lease.host].backend   # type: ignore[index]

    def host_lost(self, name: str) -> asyncio.Future[None] | None:
        """Done when host `name` is counted down; None when no other host could take over."""
        return self.by_name[name].lost() if len(self.hosts) > 1 else None

    def host_failed(self, name: str) -> None:
        """A request could not reach host `name`: it takes no new requests until it answers
        its engine's reconcile again."""
        h = self.by_name.get(name)
        if h is None or name in self._recovering:
            return
        h.suspect = True
        log.warning("host %s is not answering; its requests go to other hosts", name)
        with working_for(name):
            self._recovering[name] = asyncio.ensure_future(self._recover(h))

    async def _recover(self, h: Host) -> None:
        try:
            while True:
                try:
                    await h.core.reconcile()
                except Exception:    # a bug of one reconcile must not leave it out for good
                    log.exception("reconciling host %s failed; trying again", h.name)
                if h.core.upstream_ok:
                    h.suspect = False
                    log.info("host %s answers again (reconciled)", h.name)
                    return
                await asyncio.sleep(RECOVER_POLL_S)
        finally:
            self._recovering.pop(h.name, None)

    def _warn_unlisted(self) -> list[str]:
        return self._unlisted.check(self.config, self._lists)

    def _lists(self, name: str, host: str | None) -> bool | None:
        """Is the model listed by the host named (by any host that may hold it, for None);
        None until each of those has answered with its list once."""
        if host is None:
            key = self.live.aliases.get(name, name)
            hosts = [h for h in self.hosts if h.allows(key)]
        else:
            hosts = [self.by_name[host]] if host in self.by_name else []
        for h in hosts:
            listed = h.core.registry.key_of(name)
            if listed is not None and h.allows(listed):
                return True
        answered = hosts and all(h.core.reconciler.listed_once for h in hosts)
        return False if answered else None

    def hold(self, name: str) -> Lease | None:
        for h in self.hosts:
            lease = h.core.hold(name) if h.up else None
            if lease is not None:
                return lease
        return None

    def record(self, r: RequestRecord) -> None:
        h = self.by_name.get(r.host) if r.host is not None else None
        if h is None:   # refused before a host held it: counted where the model is listed
            h = next((h for h in self.hosts if h.entry(r.model) is not None), self.hosts[0])
            r.host = h.name
        h.core.accounting.record(r)   # what its core's record does, a frame less per request

    # -- names ---------------------------------------------------------------------------------
    async def resolve(self, name: str) -> str:
        key = self._key_of(name)
        if key is not None:
            return key
        if self.clock.now() - self._refreshed_s >= CATALOG_REFRESH_MIN_S:
            self._refreshed_s = self.clock.now()
            await self.reconcile()
            key = self._key_of(name)
            if key is not None:
                return key
        if not any(len(h.core.registry) for h in self.hosts) and not self.upstream_ok:
            raise self.hosts[0].core.reconciler.failure()
        close: list[str] = []
        for h in self.hosts:
            close += [c for c in h.core.registry.suggestions(name) if c not in close]
        hint = f" Did you mean: {', '.join(repr(c) for c in close[:3])}?" if close else ""
        raise ModelNotFound(f"The model '{name[:80]}' does not exist on any host.{hint}",
                            param="model")

    # -- native clients: one host ------------------------------------------------------------
    @property
    def native(self) -> Host:
        name = self.config.placement.native_host
        return self.by_name[name] if name in self.by_name else self.hosts[0]

    async def admit_load(self, name: str, *, owner: str):  # noqa: ANN201
        with working_for(self.native.name):
            return await self.native.core.admit_load(name, owner=owner)

    def client_connection(self, client: str, delta: int) -> None:
        self.native.core.client_connection(client, delta)

    def owner_of(self, name: str) -> tuple[str | None, str | None]:
        return self.native.core.owner_of(name)

    async def reconcile(self) -> None:
        await asyncio.gather(*(run_for(h.name, h.core.reconcile) for h in self.hosts))

    def apply_config(self, config: Config) -> None:
        self.live.swap(config)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        hostlog.install()
        await asyncio.gather(*(run_for(h.name, h.core.start) for h in self.hosts))

    async def start_monitoring(self) -> None:
        for h in self.hosts:
            await run_for(h.name, h.core.start_monitoring)   # its loops log the host

    async def cleanup(self) -> None:
        for task in self._recovering.values():
            task.cancel()
        await asyncio.gather(*self._recovering.values(), return_exceptions=True)
        await self.turns.close()
        for h in self.hosts:
            await run_for(h.name, h.core.cleanup)

    def add_listener(self, listener: Any) -> None:
        for h in self.hosts:
            h.core.add_listener(HostTagged(listener, h.name))


class _StateIndex:
    """One host's state changes, kept in the fleet's index of loaded copies."""

    def __init__(self, fleet: Fleet, host: Host) -> None:
        self.fleet, self.host = fleet, host

    def on_state(self, model: str, old: str, new: str) -> None:
        self.fleet._state_changed(self.host, model, old, new)

