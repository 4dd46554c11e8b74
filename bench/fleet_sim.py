"""Replay a workload through the real fleet (proxy/fleet: one EngineCore per host, the placer
above them) on virtual time, with simulated hosts of unequal memory and load speed; or through
the same Fleet machinery with a baseline's choice of host in place of the placer.

Each host's backend loads a model in the catalogue's load time × the host's load factor (a
slower disk, a slower machine); its engine learns that time, as a real host's would. Every
strategy runs the same engines with the same configuration (eviction policy, hold, footprints):
only the choice of host differs.
"""
from __future__ import annotations

import asyncio
import random
import zlib
from dataclasses import dataclass, field, replace
from typing import Callable

from proxy.config import Config
from proxy.configload import load_config
from proxy.engine.core import EngineCore
from proxy.engine.lifecycle import Lease, ModelEntry
from proxy.engine.policy import VALUE_FUNCTIONS
from proxy.errors import ProxyError
from proxy.fleet import Fleet, Host, host_config
from proxy.liveconfig import LiveConfig

from .fleet_oracle import ORACLE_POLICY, OracleFleet, oracle_values
from .simulate import SimBackend, quantile, replay
from .vtime import LoopClock, VirtualTimeLoop
from .workload import Workload

QUEUE_TIMEOUT_S = 86_400.0   # as bench/simulate.py: a replay measures delays, nothing times out
# The placer's own; the baselines choose a host by their rule alone.
STRATEGIES = ("placer", "round-robin", "least-busy", "hash", "static", "single-host")
# References, not baselines: the fleet with future knowledge (bench/fleet_oracle.py; placing
# only, or placing and evicting), one host
# with the summed memory evicting by Belady too, and one host loading at the fleet's mean or
# slowest speed instead of its fastest (what the fastest speed alone is worth to the bound).
REFERENCES = ("oracle", "oracle-place", "single-oracle", "single-mean", "single-slowest")
BELADY = ("oracle", "single-oracle")   # hosts evict by Belady (oracle-place: by the engine's)
# Single hosts: the load factor of the summed host, from the fleet's.
SINGLE = {"single-host": min, "single-oracle": min, "single-slowest": max,
          "single-mean": lambda fs: sum(fs) / len(fs)}
RANDOM = ("placer", "least-busy")   # strategies that break ties at random: run over seeds


@dataclass(frozen=True)
class HostSpec:
    name: str
    budget_gb: float
    load_factor: float = 1.0     # this host's load time ÷ the catalogue's
    parallel: int = 4


class Copies:
    """Where each model is resident or loading, over virtual time: duplicate residents (a model
    loaded on two hosts at once), their maximum and time-integral, and the loads that made
    them."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.now = clock
        self.loaded: dict[str, set[str]] = {}     # model → hosts where it is loaded
        self.loading: dict[str, set[str]] = {}
        self.duplicate_loads = 0
        self.max_duplicated = 0                   # models resident on ≥2 hosts at once
        self.extra_copy_s = 0.0                   # ∫ Σ_models (copies − 1)+ dt
        self._extra = 0
        self._since_s = 0.0

    def _tick(self) -> None:
        now = self.now()
        self.extra_copy_s += self._extra * (now - self._since_s)
        self._since_s = now

    def _recount(self) -> None:
        self._extra = sum(len(h) - 1 for h in self.loaded.values() if len(h) > 1)
        self.max_duplicated = max(self.max_duplicated,
                                  sum(1 for h in self.loaded.values() if len(h) > 1))

    def load_started(self, host: str, key: str) -> None:
        if self.loaded.get(key) or self.loading.get(key):
            self.duplicate_loads += 1
        self.loading.setdefault(key, set()).add(host)

    def load_done(self, host: str, key: str) -> None:
        self._tick()
        self.loading[key].discard(host)
        self.loaded.setdefault(key, set()).add(host)
        self._recount()

    def unloaded(self, host: str, key: str) -> None:
        self._tick()
        self.loaded.get(key, set()).discard(host)
        self._recount()

    def close(self) -> None:
        self._tick()


class HostBackend(SimBackend):
    """A simulated host: the catalogue's load time × its load factor; reports to Copies."""

    def __init__(self, workload: Workload, spec: HostSpec, copies: Copies) -> None:
        super().__init__(workload)
        self.spec = spec
        self.copies = copies
        self.load_factor = spec.load_factor

    def load_started(self, key: str) -> None:
        self.copies.load_started(self.spec.name, key)

    def load_done(self, key: str) -> None:
        self.copies.load_done(self.spec.name, key)

    def unloaded(self, key: str) -> None:
        self.copies.unloaded(self.spec.name, key)


Chooser = Callable[[str, list[tuple[Host, ModelEntry]]], Host]


class BaselineFleet(Fleet):
    """The fleet with a baseline's choice of host instead of the placer: no look at residency,
    loads or memory beyond what the baseline itself reads. The host's engine then does what it
    does for any request (load, evict, queue)."""

    def __init__(self, live: LiveConfig, hosts: list[Host], choose: Chooser) -> None:
        super().__init__(live, hosts)
        self.choose = choose

    async def acquire(self, name: str, *, avoid: str | None = None) -> Lease:
        key = self._key_of(name) or await self.resolve(name)
        return await self._on(self.choose(key, self._listed(key, avoid)), key)


def fits(workload: Workload, spec: HostSpec, key: str) -> bool:
    return workload.models[key].size_gb <= spec.budget_gb


def static_assignment(workload: Workload, specs: list[HostSpec]) -> dict[str, str]:
    """What an operator writes by hand: the largest model first, each to the host with the
    most memory left unassigned among those it fits (balancing memory; popularity unknown)."""
    left = {s.name: s.budget_gb for s in specs}
    out: dict[str, str] = {}
    for m in sorted(workload.models.values(), key=lambda m: (-m.size_gb, m.key)):
        able = [s.name for s in specs if m.size_gb <= s.budget_gb]
        host = max(able, key=lambda n: (left[n], -[s.name for s in specs].index(n)))
        out[m.key] = host
        left[host] -= m.size_gb
    return out


def chooser(strategy: str, workload: Workload, specs: list[HostSpec], rng: random.Random
            ) -> Chooser:
    """A baseline's choice among the hosts that list the model and can hold it (the
    deployments an operator would list for it: no baseline sends a model to a host too small)."""
    spec = {s.name: s for s in specs}

    def able(key: str, listed: list[tuple[Host, ModelEntry]]) -> list[tuple[Host, ModelEntry]]:
        return [(h, e) for h, e in listed if h.up and fits(workload, spec[h.name], key)]

    if strategy == "round-robin":         # one rotation over all requests, as a load balancer
        turn = [0]

        def rr(key: str, listed: list[tuple[Host, ModelEntry]]) -> Host:
            hosts = able(key, listed)
            turn[0] += 1
            return hosts[turn[0] % len(hosts)][0]
        return rr
    if strategy == "least-busy":          # LiteLLM: fewest in flight for this model's deployment
        def least(key: str, listed: list[tuple[Host, ModelEntry]]) -> Host:
            hosts = able(key, listed)
            fewest = min(e.leases for _, e in hosts)
            return rng.choice([h for h, e in hosts if e.leases == fewest])
        return least
    if strategy == "hash":                # sticky: model → host by a stable hash
        def sticky(key: str, listed: list[tuple[Host, ModelEntry]]) -> Host:
            hosts = able(key, listed)
            return hosts[zlib.crc32(key.encode()) % len(hosts)][0]
        return sticky
    if strategy == "static":
        bound = static_assignment(workload, specs)

        def static(key: str, listed: list[tuple[Host, ModelEntry]]) -> Host:
            return next(h for h, _ in listed if h.name == bound[key])
        return static
    raise ValueError(f"unknown strategy {strategy!r}")


def fleet_config(workload: Workload, specs: list[HostSpec], policy: str | None = None
                 ) -> Config:
    config = load_config({
        "upstreams": [{"name": s.name, "url": f"http://{s.name}.invalid:1234",
                       "budget_gb": s.budget_gb, "parallel": s.parallel} for s in specs],
        "memory": {"min_free_memory_gb": 0, "max_memory_usage_percent": 100},
        "eviction": {"queue_timeout_s": QUEUE_TIMEOUT_S},
        "storage": {"enabled": False},
        "models": {k: {"footprint_gb": m.size_gb} for k, m in workload.models.items()}})
    if policy is None:
        return config
    # A benchmark-only policy (registered for the run) is set after the file's validation.
    return replace(config, eviction=replace(config.eviction, policy=policy, hold="off"))


def single_host(specs: list[HostSpec], speed: Callable[[list[float]], float] = min
                ) -> list[HostSpec]:
    """The bound: one host with the fleet's memory summed, loading at its fastest host's speed
    (or, to see what that speed is worth, at the mean or the slowest)."""
    return [HostSpec("single", sum(s.budget_gb for s in specs),
                     round(speed([s.load_factor for s in specs]), 3),
                     max(s.parallel for s in specs))]


@dataclass
class FleetRun:
    strategy: str
    seed: int
    requests: int = 0
    delay_total_s: float = 0.0
    delay_p99_s: float | None = None     # over the delayed requests, as bench/simulate.py
    delayed_requests: int = 0
    load_seconds: float = 0.0
    loads: int = 0
    refused: int = 0
    refused_by_code: dict[str, int] = field(default_factory=dict)
    duplicate_loads: int = 0
    duplicates_max: int = 0
    duplicate_copy_s: float = 0.0        # time-integral of extra copies (model-seconds)
    served_while_duplicated: int = 0
    served_by_extra_capacity: int = 0    # ... while every other copy had `parallel` in flight
    waited_though_resident_elsewhere: int = 0
    placements: dict[str, int] = field(default_factory=dict)
    per_host_loads: dict[str, int] = field(default_factory=dict)
    per_host_delay_s: dict[str, float] = field(default_factory=dict)


def run_strategy(workload: Workload, specs: list[HostSpec], strategy: str, seed: int
                 ) -> FleetRun:
    loop = VirtualTimeLoop()
    values = oracle_values(workload) if strategy in BELADY else {}
    try:
        VALUE_FUNCTIONS.update(values)
        return loop.run_until_complete(_replay(loop, workload, specs, strategy, seed))
    finally:
        for name in values:
            VALUE_FUNCTIONS.pop(name, None)
        loop.close()


async def _replay(loop: VirtualTimeLoop, workload: Workload, specs: list[HostSpec],
                  strategy: str, seed: int) -> FleetRun:
    fleet_specs = specs
    if strategy in SINGLE:
        specs = single_host(specs, SINGLE[strategy])
    config = fleet_config(workload, specs, ORACLE_POLICY if strategy in BELADY else None)
    live = LiveConfig(config)
    clock = LoopClock(loop)
    copies = Copies(clock.now)
    hosts = []
    for hc, spec in zip(config.upstreams, specs):
        narrowed = LiveConfig(host_config(config, hc))
        backend = HostBackend(workload, spec, copies)
        hosts.append(Host(hc, EngineCore(narrowed, backend, clock=clock, host_name=hc.name), backend, narrowed))
    rng = random.Random(seed)
    if strategy in ("oracle", "oracle-place"):
        fleet: Fleet = OracleFleet(live, hosts, workload,
                                   {s.name: s.load_factor for s in specs})
    elif strategy == "placer" or strategy in SINGLE:
        fleet = Fleet(live, hosts, rng=rng)
    else:
        fleet = BaselineFleet(live, hosts, chooser(strategy, workload, fleet_specs, rng))
    await fleet.start()
    run = FleetRun(strategy, seed, requests=len(workload.requests))
    delays: list[float] = []
    parallel = {s.name: s.parallel for s in specs}
    by_host: dict[str, float] = {}

    async def one(req) -> None:  # noqa: ANN001
        elsewhere = bool(copies.loaded.get(req.model))
        try:
            lease = await fleet.acquire(req.model)
        except ProxyError as exc:
            run.refused += 1
            run.refused_by_code[exc.code or "error"] = run.refused_by_code.get(
                exc.code or "error", 0) + 1
            return
        delay = loop.time() - req.t_s
        if req.t_s >= workload.evaluate_from_s:   # before it: the engines are learning
            delays.append(delay)
            by_host[lease.host] = by_host.get(lease.host, 0.0) + delay
            if delay > 1e-9 and elsewhere:
                run.waited_though_resident_elsewhere += 1
        others = copies.loaded.get(req.model, set()) - {lease.host}
        if others:
            run.served_while_duplicated += 1
            if all(fleet.by_name[o].core.registry.entries[req.model].leases >= parallel[o]
                   for o in others):
                run.served_by_extra_capacity += 1
        await asyncio.sleep(req.service_s)
        lease.release()

    await replay(loop, workload.requests, one)
    copies.close()
    await fleet.cleanup()
    delayed = sorted(d for d in delays if d > 1e-9)
    backends = [h.backend for h in hosts]
    run.delay_total_s = round(sum(delayed), 1)
    run.delay_p99_s = None if not delayed else round(quantile(delayed, 0.99) or 0.0, 2)
    run.delayed_requests = len(delayed)
    run.load_seconds = round(sum(b.load_seconds for b in backends), 1)   # type: ignore[attr-defined]
    run.loads = sum(b.loads for b in backends)                           # type: ignore[attr-defined]
    run.per_host_loads = {h.name: h.backend.loads for h in hosts}        # type: ignore[attr-defined]
    run.per_host_delay_s = {h: round(d, 1) for h, d in by_host.items()}
    run.duplicate_loads = copies.duplicate_loads
    run.duplicates_max = copies.max_duplicated
    run.duplicate_copy_s = round(copies.extra_copy_s, 1)
    run.placements = dict(fleet.placements)
    return run
