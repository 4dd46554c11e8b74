"""One line per request at INFO, emitted in batches off the request path.

    POST /v1/chat/completions gemma 200 812.4ms client=10.0.0.7 key=alice ttft=95.1ms tokens=12/40

Method, path, model (its key once held: an alias resolved; as the client named it when refused
before that; `-` before it was read), status and latency in
that order, then `key=value` fields: the client's address (the connection's peer), the client
key's name (`-`: none, or not known yet; never the secret), time to first token (`-`: none) and
tokens prompt/completion, ` (estimated)` when some were estimated.

A request appends a tuple; a background task hands the lines to the `proxy.request` logger
every FLUSH_INTERVAL_S (or when BATCH_LINES are waiting). The log records are the same as if
each request had logged itself — same logger, level and format — but the request path pays
for a list append, and the logging machinery runs in a tight loop where it is cheaper.
"""
from __future__ import annotations

import asyncio
import logging

from ..errors import clip

log = logging.getLogger("proxy.request")
FLUSH_INTERVAL_S = 0.25
BATCH_LINES = 512
LINE = "%s %s %s %d %.1fms client=%s key=%s ttft=%s tokens=%d/%d%s"


class AccessLog:
    def __init__(self) -> None:
        self.pending: list[tuple] = []
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()

    @property
    def enabled(self) -> bool:
        return log.isEnabledFor(logging.INFO)

    def add(self, method: str, path: str, model: str, status: int, latency_s: float,
            ttft_s: float | None, prompt_tokens: int, completion_tokens: int,
            estimated: bool, client: str | None = None, key: str | None = None) -> None:
        self.pending.append((method, path, model, status, latency_s * 1000, client or "-",
                             key or "-", "-" if ttft_s is None else f"{ttft_s * 1000:.1f}ms",
                             prompt_tokens, completion_tokens,
                             " (estimated)" if estimated else ""))
        if len(self.pending) >= BATCH_LINES:
            self._wake.set()

    def flush(self) -> None:
        lines, self.pending = self.pending, []
        for method, path, model, status, latency_ms, client, key, *rest in lines:
            # The model is the client's string: a newline in it must not forge a line. A key's
            # name is the config's, but a space in it must not shift the fields after it.
            log.info(LINE, method, path, clip(model), status, latency_ms, client,
                     clip(key).replace(" ", "\\x20"), *rest)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="access-log")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.flush()

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(FLUSH_INTERVAL_S):   # (wait_for may lose a cancel)
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            self.flush()
