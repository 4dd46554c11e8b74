"""The circuit breaker: repeated connection failures fail fast, a trial closes it again."""
from __future__ import annotations

import time

from proxy.emulator import start_emulator
from proxy.server.keys import UPSTREAM
from proxy.upstream.breaker import CLOSED, OPEN, CircuitBreaker

MODEL = "qwen/qwen3-4b"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_the_state_machine():
    clock = Clock()
    b = CircuitBreaker(failures_to_open=3, cooldown_s=5.0, clock=clock)
    for _ in range(2):
        b.before()
        b.failure("refused")
    assert b.state == CLOSED
    b.failure("refused")
    assert b.state == OPEN
    try:
        b.before()
        raise AssertionError("an open breaker let a request through")
    except Exception as exc:
        assert getattr(exc, "code", None) == "upstream_unreachable"
        assert "failing fast" in exc.message and exc.retry_after_s >= 1
    clock.t += 5.0
    b.before()                          # the trial
    try:
        b.before()                      # only one at a time
        raise AssertionError("a second trial went through")
    except Exception as exc:
        assert getattr(exc, "code", None) == "upstream_unreachable"
    b.failure("still refused")          # the trial failed: open again
    assert b.state == OPEN
    clock.t += 5.0
    b.before()
    b.success()
    assert b.state == CLOSED and b.failures == 0


async def test_a_dead_upstream_trips_it_and_readyz_turns_at_once(make_emulator, make_proxy,
                                                                 http):
    emu = await make_emulator()
    port = emu.served.port
    proxy = await make_proxy(emu.url, **{"upstream.breaker_failures": 3})
    (await proxy.engine.acquire(MODEL)).release()
    await emu.close()                   # LM Studio dies
    statuses = []
    for _ in range(4):
        async with http.post(f"{proxy.url}/v1/chat/completions", json={
                "model": MODEL, "messages": []}) as r:
            body = await r.json()
            statuses.append((r.status, body["error"]["code"]))
    assert statuses == [(502, "upstream_unreachable")] * 4
    assert "failing fast" in body["error"]["message"]          # the 4th never tried to connect
    async with http.get(f"{proxy.url}/readyz") as r:
        ready = await r.json()
    assert r.status == 503 and ready["circuit"] == "open"
    breaker = proxy.app[UPSTREAM].breaker
    breaker.opened_at = time.monotonic() - breaker.cooldown_s   # the cool-down has passed
    again = await start_emulator(port=port)
    try:
        async with http.get(f"{proxy.url}/readyz") as r:         # readyz is the trial
            assert r.status == 200 and (await r.json())["circuit"] == "closed"
        async with http.post(f"{proxy.url}/v1/chat/completions", json={
                "model": MODEL, "max_tokens": 1, "messages": []}) as r:
            assert r.status == 200
    finally:
        await again.close()
