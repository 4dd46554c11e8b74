"""Background loops: run a tick every interval (or at once when woken), log and survive its
failures, stop on demand."""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable


class Periodic:
    def __init__(self, prefix: str, log: logging.Logger) -> None:
        self.prefix = prefix
        self.log = log
        self._tasks: list[asyncio.Task] = []
        self._wake: dict[str, asyncio.Event] = {}

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    def start(self, name: str, interval_s: float | Callable[[], float],
              tick: Callable[[], Awaitable[object]]) -> None:
        """interval_s may be a callable, read before each wait (config can change live)."""
        wake = self._wake[name] = asyncio.Event()
        self._tasks.append(asyncio.create_task(self._loop(name, interval_s, tick, wake),
                                               name=f"{self.prefix}-{name}"))

    def run_now(self, name: str) -> None:
        """End the wait of the loop `name` (if it runs): its tick runs at once, then it waits
        its interval again. A tick running now is followed by another."""
        wake = self._wake.get(name)
        if wake is not None:
            wake.set()

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        self._wake.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self, name: str, interval_s: float | Callable[[], float],
                    tick: Callable[[], Awaitable[object]], wake: asyncio.Event) -> None:
        while True:
            try:
                async with asyncio.timeout(interval_s() if callable(interval_s) else interval_s):
                    await wake.wait()
            except TimeoutError:
                pass
            wake.clear()
            try:
                await tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("%s %s loop failed; continuing", self.prefix, name)
