"""Alert delivery to a webhook: queued, retried with backoff, never blocking a request."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

log = logging.getLogger("proxy.webhook")
QUEUE_LIMIT = 1000


class WebhookSink:
    def __init__(self, url: str, *, timeout_s: float = 5.0, max_attempts: int = 5,
                 first_backoff_s: float = 0.5) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.first_backoff_s = first_backoff_s
        self.delivered = 0
        self.dropped = 0
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_LIMIT)
        self._task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None

    def send(self, event: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("alert webhook queue full; dropped %s", event.get("id"))

    async def start(self) -> None:
        if self._task is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s))
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
        for attempt in range(1, self.max_attempts + 1):
            try:
                async with self._session.post(self.url, json=event) as resp:
                    if resp.status < 300:
                        self.delivered += 1
                        return
                    problem = f"HTTP {resp.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                problem = repr(exc)
            if attempt < self.max_attempts:
                log.info("alert webhook attempt %d failed (%s); retrying in %.1fs", attempt,
                         problem, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s *= 2
        self.dropped += 1
        log.warning("alert webhook gave up on %s after %d attempts", event.get("id"),
                    self.max_attempts)
