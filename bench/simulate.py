"""Replay a workload through the real engine (EngineCore) on virtual time."""
from __future__ import annotations

import asyncio
import bisect
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from proxy.config import POLICIES, Config
from proxy.configload import load_config
from proxy.errors import ProxyError
from proxy.engine import policy as policy_module
from proxy.engine.core import EngineCore
from proxy.engine.lifecycle import ModelStatus
from proxy.upstream.base import ApiLevel, Capabilities, LoadResult, UpstreamModel

from .vtime import LoopClock, VirtualTimeLoop
from .workload import GB, Workload

REGRET_WINDOW_S = 300.0



async def replay(loop: asyncio.AbstractEventLoop, requests: Any,
                 one: Callable[[Any], Any]) -> None:
    """Start `one(req)` for each request at its arrival time on the (virtual) loop; return
    when all are done."""
    tasks = []
    for req in requests:
        wait = req.t_s - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one(req)))
        if len(tasks) > 512:
            tasks = [t for t in tasks if not t.done()]
    await asyncio.gather(*tasks)


class SimBackend:
    """A ModelBackend whose loads take the catalogue's load time (× load_factor) on the virtual
    clock. Subclasses hear of loads and unloads through the three hooks."""
    load_factor = 1.0

    def __init__(self, workload: Workload) -> None:
        self.models = workload.models
        self.loaded: set[str] = set()
        self.load_seconds = 0.0
        self.loads = 0
        self.peak_resident_gb = 0.0

    capabilities = Capabilities(manages_loading=True, reports_memory=False, self_evicts=False,
                                multi_instance=False, native_clients=False)

    async def detect(self) -> ApiLevel:
        return ApiLevel.MANAGED

    async def list_models(self) -> list[UpstreamModel]:
        return [UpstreamModel(key=k, size_bytes=int(m.size_gb * GB),
                              instance_ids=(k,) if k in self.loaded else ())
                for k, m in self.models.items()]

    async def load(self, key: str, options: Mapping[str, Any]) -> LoadResult:
        load_s = self.models[key].load_s * self.load_factor
        self.load_started(key)
        await asyncio.sleep(load_s)
        self.loaded.add(key)
        self.load_done(key)
        self.peak_resident_gb = max(self.peak_resident_gb,
                                    sum(self.models[k].size_gb for k in self.loaded))
        self.loads += 1
        self.load_seconds += load_s
        return LoadResult(key, load_s)

    async def unload(self, instance_id: str) -> None:
        self.loaded.discard(instance_id)
        self.unloaded(instance_id)

    def load_started(self, key: str) -> None:
        pass

    def load_done(self, key: str) -> None:
        pass

    def unloaded(self, key: str) -> None:
        pass


@dataclass
class RunResult:
    policy: str
    cold_loads: int | None
    load_seconds: float
    delayed_requests: int | None
    delay_p50_s: float | None
    delay_p99_s: float | None
    regretted_evictions: int | None
    failed_requests: int = 0
    peak_resident_gb: float | None = None
    failures_by_code: dict[str, int] | None = None
    prediction: str = "off"      # off | on (the engine's preloader) | oracle | oracle-seen
    preloads: int = 0
    useful_preloads: int = 0
    wasted_preloads: int = 0
    wasted_preload_gb: float = 0.0
    delay_total_s: float | None = None   # over the evaluated requests
    delayed_by_model: dict[str, int] | None = None   # delayed requests per model
    delay_p99_all_s: float | None = None  # p99 over every evaluated request, not only delayed
    # The mean delay of the slowest 1 % of every evaluated request: a tail that, unlike the
    # p99 over delayed requests, fewer short delays elsewhere cannot raise.
    delay_tail_mean_s: float | None = None


@dataclass(frozen=True)
class Variant:
    """How one compared policy maps onto the engine's configuration."""
    name: str
    policy: str
    count_limit: int | None = None      # manage a model count instead of bytes
    hold: float | str = 0.0               # eviction.hold
    pinned: tuple[str, ...] = ()          # models pinned in the config
    idle_ttl_s: float | None = None     # an idle timeout (LM Studio's JIT TTL)
    prediction: str = "off"             # on: preload.enabled; oracle: see _oracle
    queue_timeout_s: float = 86_400.0   # a replay measures delays, so nothing times out


def quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


def engine_config(workload: Workload, budget_gb: float, v: Variant) -> Config:
    if v.count_limit is not None:     # every model weighs 1 and the "budget" is the count
        footprints = {k: {"footprint_gb": 1.0} for k in workload.models}
        budget = float(v.count_limit)
    else:
        footprints = {k: {"footprint_gb": m.size_gb, "pinned": k in v.pinned}
                      for k, m in workload.models.items()}
        budget = budget_gb
    # The policy may be a benchmark-only one (the offline schedule), registered in the policy
    # table for the run (see run_variant): the file's validation knows only the proxy's own,
    # so it is set after validation.
    config = load_config({
        "memory": {"sampler": "budget", "budget_gb": max(budget, 1.0),
                   "min_free_memory_gb": 0, "max_memory_usage_percent": 100},
        "eviction": {"policy": v.policy if v.policy in POLICIES else "lru", "hold": v.hold,
                     "queue_timeout_s": v.queue_timeout_s,
                     "model_timeout_hours": (v.idle_ttl_s or 0.0) / 3600.0},
        "preload": {"enabled": v.prediction == "on"},
        "storage": {"enabled": False},     # a simulation keeps no history
        "models": footprints})
    return replace(config, eviction=replace(config.eviction, policy=v.policy))


def run_variant(workload: Workload, budget_gb: float, v: Variant,
                extra_policies: Mapping[str, Callable] | None = None,
                set_choosers: Mapping[str, Callable] | None = None) -> RunResult:
    """extra_policies: value functions of policies the engine does not have, by name;
    set_choosers: their victim-set choosers, where they choose a set as a whole."""
    loop = VirtualTimeLoop()
    try:
        for name, fn in (extra_policies or {}).items():
            policy_module.VALUE_FUNCTIONS[name] = fn
        for name, fn in (set_choosers or {}).items():
            policy_module.SET_CHOOSERS[name] = fn
        return loop.run_until_complete(_replay(loop, workload, budget_gb, v))
    finally:
        for name in extra_policies or {}:
            policy_module.VALUE_FUNCTIONS.pop(name, None)
        for name in set_choosers or {}:
            policy_module.SET_CHOOSERS.pop(name, None)
        loop.close()


async def _replay(loop: VirtualTimeLoop, workload: Workload, budget_gb: float, v: Variant
                  ) -> RunResult:
    backend = SimBackend(workload)
    config = engine_config(workload, budget_gb, v)
    mgr = EngineCore(config, backend, clock=LoopClock(loop))
    evictions: list[tuple[str, float]] = []

    class Listener:
        def on_unload(self, key: str, reason: str) -> None:
            evictions.append((key, loop.time()))
    mgr.add_listener(Listener())
    await mgr.start()
    delays: list[float] = []
    delayed_by_model: dict[str, int] = {}
    failed = 0
    failures: dict[str, int] = {}

    async def one(req) -> None:
        nonlocal failed
        try:
            lease = await mgr.acquire(req.model)
        except ProxyError as exc:
            failed += 1     # e.g. insufficient_memory after the queue timeout
            failures[exc.code or "error"] = failures.get(exc.code or "error", 0) + 1
            return
        if req.t_s >= workload.evaluate_from_s:   # before it: the engine is learning
            delays.append(loop.time() - req.t_s)
            if delays[-1] > 1e-9:
                delayed_by_model[req.model] = delayed_by_model.get(req.model, 0) + 1
        await asyncio.sleep(req.service_s)
        lease.release()

    background = []
    if v.idle_ttl_s is not None:
        async def expire() -> None:
            while True:
                await asyncio.sleep(30.0)
                await mgr.unload_idle_models()
        background.append(asyncio.create_task(expire()))
    if v.prediction in ("oracle", "oracle-seen"):
        background.append(asyncio.create_task(
            _oracle(loop, mgr, workload, seen_only=v.prediction == "oracle-seen")))
    if v.prediction == "on":
        async def rhythm() -> None:
            while True:
                await asyncio.sleep(mgr.preload_wait_s())     # the engine's own timing
                await mgr.sample_memory()
                await mgr.preloader.tick()
        background.append(asyncio.create_task(rhythm()))
    await replay(loop, workload.requests, one)
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await mgr.cleanup()        # a preload still loading ends here, not on a closed loop
    pre = mgr.preloads
    delayed = sorted(d for d in delays if d > 1e-9)
    return RunResult(
        policy=v.name, cold_loads=backend.loads, load_seconds=round(backend.load_seconds, 1),
        delayed_requests=len(delayed), delay_p50_s=_r(quantile(delayed, 0.5)),
        delay_p99_s=_r(quantile(delayed, 0.99)),
        regretted_evictions=regretted(workload, evictions), failed_requests=failed,
        failures_by_code=failures, peak_resident_gb=round(backend.peak_resident_gb, 1),
        prediction=v.prediction, preloads=pre.preloads, useful_preloads=pre.useful,
        wasted_preloads=pre.wasted, wasted_preload_gb=round(pre.wasted_bytes / GB, 1),
        delay_total_s=round(sum(delayed), 1), delayed_by_model=delayed_by_model,
        delay_p99_all_s=_r(quantile(sorted(delays), 0.99)),
        delay_tail_mean_s=_r(tail_mean(delays)))


ORACLE_LEAD_S = 1.0   # an oracle preload is due this long before its load must be done


async def _oracle(loop: VirtualTimeLoop, mgr: EngineCore, workload: Workload, *,
                  seen_only: bool = False) -> None:
    """Preloading with perfect knowledge: every request's model, if not resident, is queued as
    a preload (expected to save its whole reload) its load time plus ORACLE_LEAD_S before the
    request arrives. Admission and eviction are the engine's own: into free memory, or by the
    rule that lets a preload evict, and giving way to any load a request waits for. What the
    engine's predictor could reach at best, with the same rules. seen_only: only once a
    model has been asked for (no predictor that learns from what it has seen can foresee a
    model's first request, nor preload it before then)."""
    first_s: dict[str, float] = {}
    due = []
    for r in workload.requests:
        first_s.setdefault(r.model, r.t_s)
        t_s = max(0.0, r.t_s - workload.models[r.model].load_s - ORACLE_LEAD_S)
        if not seen_only or t_s >= first_s[r.model] and r.t_s > first_s[r.model]:
            due.append((t_s, r.model))
    due.sort()
    registry, scheduler = mgr.registry, mgr.scheduler
    for t_s, key in due:
        wait = t_s - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        e = registry.entries[key]
        if e.status is ModelStatus.UNLOADED:
            scheduler.preload(e, registry.reload_s(e), why="asked for next (the oracle)")


TAIL_SHARE = 0.01


def tail_mean(delays: list[float]) -> float | None:
    """The mean of the largest TAIL_SHARE of delays (at least one)."""
    if not delays:
        return None
    n = max(1, math.ceil(TAIL_SHARE * len(delays)))
    return sum(sorted(delays)[-n:]) / n


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def arrivals_by_model(workload: Workload) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in workload.models}
    for r in workload.requests:
        out[r.model].append(r.t_s)
    return out


def regretted(workload: Workload, evictions: list[tuple[str, float]]) -> int:
    """Evictions of a model that is requested again within REGRET_WINDOW_S."""
    arrivals = arrivals_by_model(workload)
    n = 0
    for key, t in evictions:
        times = arrivals[key]
        i = bisect.bisect_right(times, t)
        if i < len(times) and times[i] - t <= REGRET_WINDOW_S:
            n += 1
    return n
