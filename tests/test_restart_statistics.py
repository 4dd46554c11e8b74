"""A restart keeps statistics: a model's last use (on the new process's clock), the per-minute
counts its requests per hour and trend come from (minutes the proxy was down count as none),
and its evictions by reason; after a graceful stop, after a kill that follows a flush, and from
a history file an earlier version wrote."""
from __future__ import annotations

import pytest

from proxy.engine.clock import ManualClock
from proxy.engine.usage import BOUNDS_S
from proxy.store import UsageStore

from .test_engine_promises import A, B, engine, lab  # noqa: F401 (fixtures)

SMALL = {"budget_gb": 10}      # A and B (6 GB each) do not fit together: one evicts the other
KEPT = ("last_used_s_ago", "usage_frequency_per_h", "trend", "evictions", "loads", "requests")


def next_process(before: ManualClock, down_s: float, start_s: float = 500.0) -> ManualClock:
    """The clock of a process started down_s after `before` stopped: its monotonic clock
    starts elsewhere (here below the minutes it restores), the wall clock goes on."""
    return ManualClock(start_s=start_s, wall_at_zero_s=before.wall() + down_s - start_s)


async def use(mgr, key: str, n: int = 1) -> None:
    for _ in range(n):
        (await mgr.acquire(key)).release()
        mgr.record_model_usage(key, 0.05)


def kept(mgr) -> dict:
    stats = mgr.get_memory_stats()
    rows = {k: {f: row[f] for f in KEPT} for k, row in stats["models"].items() if k in (A, B)}
    return {"rows": rows, "top": stats["top_models_by_usage"]}


async def test_a_graceful_restart_keeps_last_use_rates_and_evictions(lab, engine, tmp_path):
    path = tmp_path / "history.sqlite3"
    clock = ManualClock(start_s=50_000.0)
    first = await engine(lab.url, store=UsageStore(path), clock=clock, memory=SMALL)
    for _ in range(20):                              # A: one request a minute for 20 minutes
        await use(first, A)
        clock.advance(60)
    await use(first, B, 5)                           # A is evicted to make room for B
    await first.unload_model(B)                      # and B by hand
    clock.advance(32)
    before = kept(first)
    assert before["rows"][A]["evictions"] == {"admission": 1}
    assert before["rows"][B]["evictions"] == {"manual": 1}
    assert before["rows"][A]["usage_frequency_per_h"] == 20.0
    await first.cleanup()                            # SIGTERM: everything is written

    clock = next_process(clock, down_s=300)
    second = await engine(lab.url, store=UsageStore(path), clock=clock, memory=SMALL)
    after = kept(second)
    for key in (A, B):
        assert after["rows"][key]["last_used_s_ago"] == pytest.approx(
            before["rows"][key]["last_used_s_ago"] + 300)
        after["rows"][key]["last_used_s_ago"] = before["rows"][key]["last_used_s_ago"]
    assert after == before                           # rates, trend, evictions, order alike


async def test_a_kill_after_a_flush_keeps_what_was_flushed_and_the_downtime_counts(
        lab, engine, tmp_path):
    path = tmp_path / "history.sqlite3"
    clock = ManualClock(start_s=100_000.0)
    first = await engine(lab.url, store=UsageStore(path), clock=clock, memory=SMALL)
    await use(first, A, 12)
    await first.flush()
    clock.advance(50 * 60)
    await use(first, B)                              # evicts A, which serves nothing since
    await first.flush()                              # the last periodic flush
    await use(first, B, 3)                           # lost with the kill below
    first.store.close()                              # kill -9: nothing more is written
    assert kept(first)["rows"][A]["usage_frequency_per_h"] == 12.0

    clock = next_process(clock, down_s=20 * 60)
    second = await engine(lab.url, store=UsageStore(path), clock=clock, memory=SMALL)
    rows = kept(second)["rows"]
    # A's requests are 70 minutes old now: the hour before the last one.
    assert rows[A]["usage_frequency_per_h"] == 0.0 and rows[A]["trend"] == "falling"
    assert rows[A]["last_used_s_ago"] == pytest.approx(70 * 60)
    assert rows[A]["evictions"] == {"admission": 1} and rows[A]["requests"] == 12
    assert rows[B]["usage_frequency_per_h"] == 1.0 and rows[B]["requests"] == 1
    assert rows[B]["last_used_s_ago"] == pytest.approx(20 * 60)
    assert second.entry(B).owner == "proxy"          # still loaded and adopted...
    # ...as if just loaded: the restored last use is shown, not made its eviction recency.
    assert second.entry(B).last_used_at_s == clock.now()


async def test_a_wall_clock_set_back_puts_no_use_in_the_future(lab, engine, tmp_path):
    path = tmp_path / "history.sqlite3"
    clock = ManualClock(start_s=100_000.0)
    first = await engine(lab.url, store=UsageStore(path), clock=clock, memory=SMALL)
    await use(first, A, 4)
    await first.cleanup()
    clock = next_process(clock, down_s=-600)         # NTP stepped the clock back 10 minutes
    second = await engine(lab.url, store=UsageStore(path), clock=clock, memory=SMALL)
    row = kept(second)["rows"][A]
    assert row["last_used_s_ago"] == 0.0 and row["usage_frequency_per_h"] == 4.0


async def test_a_history_written_by_the_previous_version_still_loads(lab, engine, tmp_path):
    path = tmp_path / "history.sqlite3"
    wall_s = 1_800_000_000.0
    old = UsageStore(path)
    assert old.open()
    latency = [0] * (len(BOUNDS_S) + 1)
    latency[60] = 3
    # The snapshot as the version before wrote it: no last use, no evictions.
    snapshot = {"requests": 3, "failures": 1, "prompt_tokens": 30, "completion_tokens": 9,
                "estimated_tokens": 0, "generation_s": 0.3, "tasks": {"code": [3, 1, 0.3]},
                "latency": {"counts": latency, "count": 3, "total": 0.3},
                "ttft": {"counts": [0] * (len(BOUNDS_S) + 1), "count": 0, "total": 0.0}}
    minute = int(wall_s // 60)
    assert old.write({(A, minute - 10): [3, 1, 30, 9, 0.3]}, {A: snapshot}, {}, minute)
    old.close()

    clock = ManualClock(start_s=500.0, wall_at_zero_s=wall_s - 500.0)
    mgr = await engine(lab.url, store=UsageStore(path), clock=clock, memory=SMALL)
    row = mgr.get_memory_stats()["models"][A]
    assert (row["requests"], row["failures"], row["evictions"]) == (3, 1, {})
    assert row["last_used_s_ago"] is None            # not kept then
    assert row["usage_frequency_per_h"] == 3.0       # the minutes were kept even then
    assert mgr.core.accounting.usage_of(A).failures_per_minute.total(clock.now(), 0, 60) == 1
    await use(mgr, A)
    await mgr.flush()                                # written again in the new form
    again = UsageStore(path)
    assert again.open()
    assert again.load()["stats"][A]["last_used_wall_s"] == clock.wall()
    again.close()


def test_a_restored_minute_before_the_clocks_zero_is_merged_too():
    """History replayed onto a monotonic clock started moments ago lands at negative minutes:
    a fleet's merged view adds them like any other (only an empty slot is skipped)."""
    from proxy.engine.usage import ModelUsage, merged
    u = ModelUsage()
    u.per_minute.add(-30.0, 3)                       # minute -1
    u.per_minute.add(-600.0, 2)                      # minute -10
    assert u.per_minute.total(0.0, 0, 60) == 5
    assert merged([u, ModelUsage()]).per_minute.total(0.0, 0, 60) == 5


async def test_evictions_of_a_model_not_listed_since_the_restart_are_written_back_as_kept(
        lab, engine, make_emulator, tmp_path):
    """A's evictions are restored while A is not listed (another upstream's catalogue, a model
    removed for a while); its statistics written again in the meantime keep them."""
    from proxy.emulator import CatalogModel
    from .fakes import GB
    path = tmp_path / "history.sqlite3"
    clock = ManualClock(start_s=50_000.0)
    first = await engine(lab.url, store=UsageStore(path), clock=clock, memory=SMALL)
    await use(first, A)
    await use(first, B)                              # A is evicted to make room for B
    assert kept(first)["rows"][A]["evictions"] == {"admission": 1}
    await first.cleanup()

    without_a = await make_emulator(catalog=[CatalogModel(key=B, size_bytes=6 * GB,
                                                          memory_bytes=6 * GB)])
    clock = next_process(clock, down_s=60)
    second = await engine(without_a.url, store=UsageStore(path), clock=clock, memory=SMALL)
    assert second.entry(A) is None
    second.record_model_usage(A, 0.05)               # its statistics change: written again
    await second.cleanup()

    clock = next_process(clock, down_s=60)
    third = await engine(lab.url, store=UsageStore(path), clock=clock, memory=SMALL)
    assert kept(third)["rows"][A]["evictions"] == {"admission": 1}


async def test_a_bound_set_aside_by_hand_stays_aside_after_a_restart(lab, engine, tmp_path):
    """U is refused for lack of memory (a bound is learned); a load asked for by hand sets the
    bound aside and fails for another reason, learning nothing: the next process must not
    bring the bound back and refuse U again without trying."""
    from proxy.errors import ModelLoadFailed
    from .fakes import GB
    from .test_engine_promises import U
    path = tmp_path / "history.sqlite3"
    clock = ManualClock(start_s=50_000.0)
    lab.state.capacity_bytes = 6 * GB                # memory held by a program not counted
    first = await engine(lab.url, store=UsageStore(path), clock=clock)
    with pytest.raises(ModelLoadFailed, match="more than the 16.0 GB"):
        await first.acquire(U)
    await first.flush()
    lab.state.capacity_bytes = 16 * GB               # that program exits
    lab.state.faults.load_fail[U] = "a file being copied"
    clock.advance(120)                               # past the failed load's back-off
    with pytest.raises(ModelLoadFailed, match="a file being copied"):
        await first.load_model(U)
    assert first.entry(U).footprint_floor_bytes is None
    await first.cleanup()

    del lab.state.faults.load_fail[U]
    second = await engine(lab.url, store=UsageStore(path), clock=next_process(clock, 60))
    (await second.acquire(U)).release()              # tried, and loaded
    assert lab.state.instances_of(U)


async def test_the_history_is_filed_under_the_upstream_without_its_credentials(
        lab, engine, tmp_path):
    path = tmp_path / "history.sqlite3"
    url = lab.url.replace("http://", "http://lab:s3cret@")
    first = await engine(url, store=UsageStore(path), memory=SMALL)
    await use(first, A, 3)
    await first.cleanup()
    assert b"s3cret" not in path.read_bytes()
    second = await engine(url, store=UsageStore(path), memory=SMALL)
    assert kept(second)["rows"][A]["requests"] == 3      # found again under the same name
