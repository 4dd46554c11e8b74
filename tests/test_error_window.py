"""The error_rate alert over a sliding window: steady failure keeps one alert open across minute
boundaries, and an open alert closes on a judged good rate or on no failures, not on a thin
window."""
from __future__ import annotations

from proxy.engine.clock import ManualClock
from proxy.engine.usage import RequestRecord
from proxy.observe.health import ModelHealthMonitor

from .test_observability import MODEL, monitored

ALERT = f"error_rate:{MODEL}"


class Transitions:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_alert(self, status: str, alert: dict) -> None:
        if alert["id"] == ALERT:
            self.seen.append(status)


async def run(mgr, mon: ModelHealthMonitor, clock: ManualClock, seconds: int, *,
              every_s: int | None, ok: bool, check_every_s: int = 15) -> None:
    """Traffic (one request every `every_s`, or none) and a check every `check_every_s`,
    second by second on the settable clock."""
    for second in range(1, seconds + 1):
        clock.advance(1)
        if every_s is not None and second % every_s == 0:
            mgr.record(RequestRecord(model=MODEL, ok=ok, latency_s=0.1, at_s=clock.now(),
                                     status=200 if ok else 500))
        if second % check_every_s == 0:
            await mon.check()


async def test_steady_failure_keeps_one_alert_open_across_minute_boundaries(emulator):
    # The operator's case: error_window_s 60, every request failing at 20 a minute. Counted in
    # whole minutes, each new minute held fewer than min_requests, so the alert closed.
    clock = ManualClock(start_s=1_000.0)        # minutes begin at 1020, 1080, ...
    mgr, mon = await monitored(emulator.url, clock, error_window_s=60, min_requests=5)
    seen = Transitions()
    mon.listeners.append(seen)
    await run(mgr, mon, clock, 5 * 60, every_s=3, ok=False)
    assert seen.seen == ["firing"]              # opened once, no resolve/reopen cycle
    assert ALERT in {a.id for a in mon.alerts.values()}
    assert "20/20 requests failed in the last 60s" in mon.alerts[ALERT].message
    await mgr.cleanup()


async def test_an_open_alert_stays_open_on_too_few_requests_and_closes_when_judged(emulator):
    clock = ManualClock(start_s=1_000.0)
    mgr, mon = await monitored(emulator.url, clock, error_window_s=60, min_requests=5)
    seen = Transitions()
    mon.listeners.append(seen)
    await run(mgr, mon, clock, 120, every_s=3, ok=False)
    assert seen.seen == ["firing"]
    await run(mgr, mon, clock, 180, every_s=40, ok=False)   # 1-2 a window: too few to judge
    assert seen.seen == ["firing"]
    assert "too few to judge" in mon.alerts[ALERT].message
    await run(mgr, mon, clock, 120, every_s=3, ok=True)     # enough requests, all fine
    assert seen.seen == ["firing", "resolved"]
    await mgr.cleanup()


async def test_an_open_alert_closes_when_no_request_in_the_window_failed(emulator):
    clock = ManualClock(start_s=1_000.0)
    mgr, mon = await monitored(emulator.url, clock, error_window_s=60, min_requests=5)
    seen = Transitions()
    mon.listeners.append(seen)
    await run(mgr, mon, clock, 90, every_s=3, ok=False)
    await run(mgr, mon, clock, 45, every_s=None, ok=False)   # traffic stops
    assert seen.seen == ["firing"]              # the last failures are < 60 s old
    await run(mgr, mon, clock, 15, every_s=None, ok=False)   # none left in the window
    assert seen.seen == ["firing", "resolved"]
    await mgr.cleanup()


async def test_the_window_is_never_shorter_than_error_window_s(emulator):
    # Failures late in a minute still count early in the next: the window slides.
    clock = ManualClock(start_s=1_040.0)
    mgr, mon = await monitored(emulator.url, clock, error_window_s=60, min_requests=5,
                               interval_s=5)
    for _ in range(6):
        clock.advance(5)           # 1045 ... 1070: all in the minute 1020-1080
        mgr.record(RequestRecord(model=MODEL, ok=False, latency_s=0.1, at_s=clock.now(),
                                 status=500))
        await mon.check()
    assert ALERT in mon.alerts
    clock.advance(30)              # 1100: a new minute, the failures 30-55 s old
    await mon.check()
    assert ALERT in mon.alerts and "6/6" in mon.alerts[ALERT].message
    await mgr.cleanup()
