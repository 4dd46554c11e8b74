"""The per-request path, written for speed, keeps every figure exact: what a lease, a record and
an arrival change, checked against the plain definitions."""
from __future__ import annotations

import asyncio
import math

import time

import pytest

from proxy.configload import load_config
from proxy.engine.clock import ManualClock, SystemClock
from proxy.engine.core import EngineCore
from proxy.engine.gaps import GAP_BOUNDS_S, GapHistogram
from proxy.engine.learning import ModelPattern, hour_of_week
from proxy.engine.lifecycle import HOLD, Lease, ModelEntry, ModelStatus
from proxy.engine.usage import BOUNDS_S, WINDOW_MINUTES, ModelUsage, RequestRecord
from proxy.upstream.base import Capabilities

from .fakes import ScriptedBackend


def _record(**kw) -> RequestRecord:
    base = dict(model="m", ok=True, latency_s=0.25, at_s=600.0, ttft_s=0.05,
                prompt_tokens=20, completion_tokens=40)
    return RequestRecord(**{**base, **kw})


def test_a_record_counts_every_figure_exactly():
    u = ModelUsage()
    u.record(_record())
    u.record(_record(ok=False, latency_s=2.0, ttft_s=None, at_s=661.0, completion_tokens=0))
    u.record(_record(latency_s=0.01, ttft_s=0.02, at_s=662.0))   # TTFT above latency
    assert (u.requests, u.failures, u.prompt_tokens, u.completion_tokens) == (3, 1, 60, 80)
    assert u.generation_s == pytest.approx(0.20 + 1e-6)           # floored at 1 µs
    assert (u.latency.count, u.latency.total) == (3, pytest.approx(2.26))
    assert (u.ttft.count, u.ttft.total) == (2, pytest.approx(0.07))
    assert u.latency.counts[BOUNDS_S.index(next(b for b in BOUNDS_S if b >= 0.25))] == 1
    assert sum(u.latency.counts) == 3 and sum(u.ttft.counts) == 2
    # minute 10 had one request, minute 11 two; one failure in minute 11
    assert u.per_minute.slots[10 % WINDOW_MINUTES] == 1
    assert u.per_minute.slots[11 % WINDOW_MINUTES] == 2
    assert u.failures_per_minute.total(662.0, 0, 60) == 1 and u.last_used_at_s == 662.0


def test_a_minute_slot_is_reused_after_the_window():
    u = ModelUsage()
    u.record(_record(at_s=0.0))
    u.record(_record(at_s=WINDOW_MINUTES * 60.0))   # the same slot, two hours on
    assert u.per_minute.slots[0] == 1 and u.per_minute.minutes[0] == WINDOW_MINUTES


def test_gaps_are_binned_and_a_request_at_the_same_moment_is_a_gap_of_none():
    p = ModelPattern()
    p.observe(100.0, 1.7e9)
    p.observe(100.0, 1.7e9)
    assert p.last_gap_s == 0.0
    p.observe(105.0, 1.7e9)
    assert p.gaps.counts[0] == 1 and p.gaps.total == 2
    assert p.gaps.counts[next(i for i, b in enumerate(GAP_BOUNDS_S) if b >= 5.0)] == 1
    assert p.after_short.total == 1 and p.last_gap_s == 5.0


def test_a_gap_on_a_bound_is_counted_in_the_bin_that_bound_closes():
    h = GapHistogram()
    for bound_s in GAP_BOUNDS_S:
        h.add(bound_s)
    assert h.counts == [1] * len(GAP_BOUNDS_S) + [0]


def test_the_system_clock_reads_monotonic_time_and_the_epoch():
    before_mono, before_wall = time.monotonic(), time.time()
    now, wall = SystemClock().now(), SystemClock().wall()
    assert before_mono <= now <= time.monotonic() and before_wall <= wall <= time.time()


async def test_a_use_counts_from_its_start_to_its_end_and_a_hold_not_at_all():
    clock = ManualClock()
    backend = ScriptedBackend({"m": 4}, Capabilities(
        manages_loading=True, reports_memory=False, self_evicts=False, multi_instance=False,
        native_clients=False))
    core = EngineCore(load_config({"memory": {"sampler": "budget", "budget_gb": 20,
                                              "min_free_memory_gb": 0},
                                   "storage": {"enabled": False}}), backend, clock=clock)
    await core.start()
    try:
        (await core.acquire("m")).release()
        e = core.registry.entries["m"]
        clock.advance(10)
        started_s = clock.now()
        lease = await core.acquire("m")        # the hot path
        assert (e.last_used_at_s, e.heat_at_s, e.leases) == (started_s, started_s, 1)
        clock.advance(5)
        lease.release()
        assert e.last_used_at_s == started_s + 5 and e.leases == 0
        clock.advance(5)
        hold = core.hold("m")
        assert (e.holds, e.leases, len(core.leases.in_use())) == (1, 0, 0)
        clock.advance(5)
        hold.release()
        assert e.last_used_at_s == started_s + 5 and e.holds == 0
    finally:
        await core.cleanup()


@pytest.mark.parametrize("wall_s", [0.0, 3599.999, 3600.0, 1.7e9, 1.7e9 + 0.5, 1e12, -3600.5])
def test_hour_of_week_is_the_floor_arithmetic(wall_s):
    assert hour_of_week(wall_s) == int((math.floor(wall_s / 3600) + 72) % 168)


async def test_an_unload_waiting_for_the_drain_wakes_when_the_last_lease_goes():
    entry = ModelEntry("m", status=ModelStatus.LOADED)
    use, hold = Lease(entry, lambda lease: None), Lease(entry, lambda lease: None, kind=HOLD)
    waiter = asyncio.ensure_future(entry.drained.wait())
    await asyncio.sleep(0)
    use.release()
    await asyncio.sleep(0)
    assert not waiter.done() and not entry.drained.is_set()   # a hold still keeps it
    hold.release()
    assert await asyncio.wait_for(waiter, 1.0) is True
    assert entry.drained.is_set() and entry.drained.waiters == []


async def test_a_drain_wait_that_is_cancelled_leaves_no_waiter_behind():
    entry = ModelEntry("m", status=ModelStatus.LOADED)
    lease = Lease(entry, lambda lease: None)
    waiter = asyncio.ensure_future(entry.drained.wait())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert entry.drained.waiters == []
    lease.release()
    assert entry.drained.is_set()


def test_usage_on_several_hosts_merges_into_what_one_host_would_have_counted():
    from proxy.engine.usage import merged
    records = [_record(at_s=60.0 * m + 1, latency_s=0.01 * (m + 1), ok=m not in (2, 3),
                       completion_tokens=m, ttft_s=0.005, task="code" if m % 2 else None,
                       status=200 if m not in (2, 3) else 500, error=f"code-{m}")
               for m in range(6)]            # failures on both hosts: the later one is latest
    records.append(_record(at_s=60.0 * (WINDOW_MINUTES + 1), latency_s=2.0))   # a reused slot
    one, a, b = ModelUsage(), ModelUsage(), ModelUsage()
    for i, r in enumerate(records):
        one.record(r)
        (a if i % 2 else b).record(r)
    both = merged([a, b])
    for f in ("requests", "failures", "prompt_tokens", "completion_tokens", "generation_s",
              "last_used_at_s", "last_failure"):
        assert getattr(both, f) == pytest.approx(getattr(one, f)), f
    assert both.tasks.keys() == one.tasks.keys() == {"code"}
    assert both.tasks["code"] == pytest.approx(one.tasks["code"])
    for h in ("latency", "ttft"):
        assert getattr(both, h).counts == getattr(one, h).counts
        assert getattr(both, h).total == pytest.approx(getattr(one, h).total)
    for ring in ("per_minute", "failures_per_minute"):
        assert getattr(both, ring).minutes == getattr(one, ring).minutes
        assert getattr(both, ring).slots == getattr(one, ring).slots
    assert merged([]).requests == 0
