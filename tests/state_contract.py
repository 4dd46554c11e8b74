"""Helpers for the shared-state tests: several replicas on one state, and polling with a
deadline (expiry is real time here: TTLs of a few hundred ms, conditions polled, never slept)."""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Awaitable, Callable

from proxy.state import MemoryState, StateStore
from proxy.state.redis import RedisState

EVENTS_MAXLEN = 50
TTL_S = 0.4


class Fleet:
    """Handles of replicas that share one state: views of one MemoryState, or RedisState
    clients of one server under one prefix (each its own connection pool, as replicas are)."""

    def __init__(self, kind: str, url: str | None = None) -> None:
        self.kind = kind
        self.url = url
        self.prefix = f"test-{uuid.uuid4().hex[:8]}:"
        self._root = MemoryState("root", events_maxlen=EVENTS_MAXLEN)
        self.opened: list[RedisState] = []

    def replica(self, replica_id: str) -> StateStore:
        if self.kind == "memory":
            return self._root.view(replica_id)
        assert self.url is not None
        store = RedisState(self.url, replica_id, prefix=self.prefix,
                           events_maxlen=EVENTS_MAXLEN)
        self.opened.append(store)
        return store

    async def close(self) -> None:
        for store in self.opened:
            await store.close()


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> float:
    """Polls `check` until it holds; the seconds it took. Fails at the deadline."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < timeout_s, f"not true within {timeout_s} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


class Hub:
    """What EventRelay needs of an EventHub: its publish hooks, and publish (recorded)."""

    def __init__(self) -> None:
        self.on_publish: list[Callable[[str, dict[str, Any]], None]] = []
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def publish(self, event_type: str, data: dict[str, Any]) -> None:
        self.seen.append((event_type, data))
        for hook in self.on_publish:
            hook(event_type, data)
