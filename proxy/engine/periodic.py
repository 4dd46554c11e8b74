"""Background loops: run a tick every interval, log and survive its failures, stop on demand."""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable


class Periodic:
    def __init__(self, prefix: str, log: logging.Logger) -> None:
        self.prefix = prefix
        self.log = log
        self._tasks: list[asyncio.Task] = []

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    def start(self, name: str, interval_s: float | Callable[[], float],
              tick: Callable[[], Awaitable[object]]) -> None:
        """interval_s may be a callable, read before each wait (config can change live)."""
        self._tasks.append(asyncio.create_task(self._loop(name, interval_s, tick),
                                               name=f"{self.prefix}-{name}"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self, name: str, interval_s: float | Callable[[], float],
                    tick: Callable[[], Awaitable[object]]) -> None:
        while True:
            await asyncio.sleep(interval_s() if callable(interval_s) else interval_s)
            try:
                await tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("%s %s loop failed; continuing", self.prefix, name)
