"""Alert delivery to a webhook: queued, retried with backoff, never blocking a request.

Where to, how long to wait and how often to try are read from `health.*` at each delivery, so
a reload that sets, changes or removes `health.webhook_url` takes effect with the next alert.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import aiohttp

from ..config import HealthConfig

log = logging.getLogger("proxy.webhook")
QUEUE_LIMIT = 1000


class WebhookSink:
    def __init__(self, settings: Callable[[], HealthConfig], *,
                 first_backoff_s: float = 0.5) -> None:
        self.settings = settings
        self.first_backoff_s = first_backoff_s
        self.delivered = 0
        self.dropped = 0
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_LIMIT)
        self._task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None

    def send(self, event: dict[str, Any]) -> None:
        if self.settings().webhook_url is None:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("alert webhook queue full; dropped %s", event.get("id"))

    async def start(self) -> None:
        if self._task is None:
            self._session = aiohttp.ClientSession()
            self._task = asyncio.create_task(self._run(), name="alert-webhook")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def drain(self) -> None:
        """Wait until every queued alert was delivered or given up on."""
        await self._queue.join()

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._deliver(event)
            finally:
                self._queue.task_done()

    async def _deliver(self, event: dict[str, Any]) -> None:
        assert self._session is not None
        backoff_s = self.first_backoff_s
        settings = self.settings()
        url, max_attempts = settings.webhook_url, settings.webhook_max_attempts
        if url is None:
            return   # removed by a reload while this alert waited
        timeout = aiohttp.ClientTimeout(total=settings.webhook_timeout_s)
        for attempt in range(1, max_attempts + 1):
            try:
                async with self._session.post(url, json=event, timeout=timeout) as resp:
                    if resp.status < 300:
                        self.delivered += 1
                        return
                    problem = f"HTTP {resp.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                problem = repr(exc)
            if attempt < max_attempts:
                log.info("alert webhook attempt %d failed (%s); retrying in %.1fs", attempt,
                         problem, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s *= 2
        self.dropped += 1
        log.warning("alert webhook gave up on %s after %d attempts", event.get("id"),
                    max_attempts)
