"""A circuit breaker for one upstream: after repeated connection failures, fail fast.

closed ──(failures_to_open connection failures in a row)──▶ open
open ──(cooldown_s passed)──▶ half-open: one trial request goes through
half-open ──trial succeeds──▶ closed;  ──trial fails──▶ open again

While open, requests are refused at once with 502 `upstream_unreachable` instead of each
waiting for its own connect timeout, and `/readyz` says not ready. Only failures to reach the
upstream count; an answer of any status is a success.
"""
from __future__ import annotations

import time
from typing import Callable

from ..errors import UpstreamUnreachable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    def __init__(self, failures_to_open: int = 5, cooldown_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures_to_open = failures_to_open
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._trial = False
        self._trial_at = 0.0
        self.last_error = ""

    @property
    def open(self) -> bool:
        return self.state != CLOSED

    def before(self) -> None:
        """Raise at once while open; let one trial through once the cool-down has passed."""
        if self.state == CLOSED:
            return
        now = self.clock()
        wait_s = self.opened_at + self.cooldown_s - now
        # One trial at a time; a trial that never reported (cancelled) frees the slot after
        # a cool-down of its own.
        if wait_s <= 0 and (not self._trial or now - self._trial_at > self.cooldown_s):
            self.state, self._trial, self._trial_at = HALF_OPEN, True, now
            return
        raise UpstreamUnreachable(
            f"{self.last_error} (failing fast: {self.failures} connection failures in a row; "
            f"next try in {max(0.0, wait_s):.1f}s)", retry_after_s=max(1.0, wait_s))

    def success(self) -> None:
        self.state, self.failures, self._trial = CLOSED, 0, False

    def failure(self, message: str) -> None:
        self.failures += 1
        self.last_error = message
        self._trial = False
        if self.state == HALF_OPEN or self.failures >= self.failures_to_open:
            self.state, self.opened_at = OPEN, self.clock()
