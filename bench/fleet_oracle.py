"""A reference for placement with knowledge of the future, on the same fleet and engines.

Every host evicts by Belady's rule (bench/offline.py: the model whose next request is farthest,
per GB and per reload second, goes first). A request for a model resident or loading somewhere
goes there, as with the placer; a cold model goes to the host where its load time plus the
victims' cost is least: each victim Belady would evict there costs its load time on that host if
it is requested again within `horizon_s` (else nothing: it would be gone anyway). A host with
free room has no victims. So a fast host whose idle models are never used again beats a slow
host with room, and a host whose victims come back soon is avoided.

It is a feasible schedule, not the optimum: how far it stays above a single host with the summed
memory (also with Belady) shows what partitioning the memory costs even with the future known.
"""
from __future__ import annotations

import bisect
from typing import Callable

from proxy.engine.lifecycle import Lease, ModelStatus
from proxy.engine.policy import GB
from proxy.fleet import Fleet, Host
from proxy.fleet.placer import pick_resident
from proxy.liveconfig import LiveConfig

from .simulate import arrivals_by_model
from .workload import Workload

S = ModelStatus
ORACLE_POLICY = "offline-belady"
# A victim back within this long is a reload the choice causes; a later one would likely have
# gone anyway. Of 0, 60, 150, 300, 600, 1800, 3600 s and no limit (and smooth weights
# exp(-gap/H), H/(H+gap)), 300 s gave the least delay on six rows (Azure and pipeline seed 1,
# two/three/four hosts): 15,496 s against 16,154 at 600 s, 19,159 with no limit.
ORACLE_HORIZON_S = 300.0


class OracleFleet(Fleet):
    def __init__(self, live: LiveConfig, hosts: list[Host], workload: Workload,
                 load_factor: dict[str, float], horizon_s: float | None = None) -> None:
        super().__init__(live, hosts)
        self.workload = workload
        self.load_factor = load_factor
        self.horizon_s = ORACLE_HORIZON_S if horizon_s is None else horizon_s
        self.arrivals = arrivals_by_model(workload)

    def next_use_s(self, key: str, now_s: float) -> float:
        times = self.arrivals[key]
        i = bisect.bisect_right(times, now_s)
        return times[i] if i < len(times) else float("inf")

    def load_s(self, h: Host, key: str) -> float:
        return self.workload.models[key].load_s * self.load_factor[h.name]

    async def acquire(self, name: str, *, avoid: str | None = None) -> Lease:
        # No await between the choice and the host's acquire: racing requests see the load.
        key = self._key_of(name) or await self.resolve(name)
        copies = self._copies(key, avoid)
        if copies:
            self.placements["resident"] += 1
            return await self._on(self.by_name[pick_resident(copies, self.rng)], key)
        listed = [(h, e) for h, e in self._listed(key, avoid) if h.up]
        loading = [h for h, e in listed if e.status is S.LOADING
                   or key in h.core.scheduler.pending]
        if loading:
            self.placements["loading"] += 1
            return await self._on(loading[0], key)
        host, rule = self.choose(key, listed)
        self.placements[rule] += 1
        return await self._on(host, key)

    def choose(self, key: str, listed: list) -> tuple[Host, str]:
        now = self.clock.now()
        best: tuple[float, str, Host] | None = None
        for h, e in listed:
            core = h.core
            need = core.registry.footprint_bytes(e)
            if need > core.ceiling_bytes():
                continue
            free = budget_bytes(h) - core.registry.charged_bytes()
            cost, rule = self.load_s(h, key), "free"
            if free < need:
                victims = core.evictor.choose(need - free, exclude=key, critical=False)
                if not victims:
                    cost, rule = cost + 1e9, "queue"   # nothing may go now: last resort
                else:
                    rule = "evict"
                    for v in victims:
                        if self.next_use_s(v, now) - now <= self.horizon_s:
                            cost += self.load_s(h, v)
            if best is None or cost < best[0]:
                best = (cost, rule, h)
        if best is None:
            return listed[0][0], "too_large"
        return best[2], best[1]


def budget_bytes(h: Host) -> float:
    return (h.core.config.memory.budget_gb or 0.0) * GB


def oracle_values(workload: Workload) -> dict[str, Callable]:
    """The value function the hosts' evictors use under ORACLE_POLICY (registered per run)."""
    from .offline import belady_value
    return {ORACLE_POLICY: belady_value(workload)}
