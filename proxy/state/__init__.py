"""The fleet's shared state: `StateStore` (base.py), in memory or in Redis."""
from __future__ import annotations

import os
import socket
import uuid
from typing import Any

from .base import (HostRecord, LeaseKey, Learned, LoadLock, Measured, Renewal, Reserved,
                   StateStore, StoredEvent, Whereabouts)
from .memory import MemoryState

__all__ = ["HostRecord", "LeaseKey", "Learned", "LoadLock", "Measured", "MemoryState", "Renewal",
           "Reserved", "StateStore", "StoredEvent", "Whereabouts", "create_state",
           "default_replica_id"]


def default_replica_id() -> str:
    """Unique per process start: a restarted replica is a new one (its old leases lapse)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def create_state(url: str | None, *, replica_id: str | None = None,
                 **options: Any) -> StateStore:
    """None → `MemoryState` (one process); `redis://` / `rediss://` / `unix://` → `RedisState`.
    `options` go to the implementation (a clock for memory; prefix, timeouts for redis)."""
    replica_id = replica_id or default_replica_id()
    if url is None:
        return MemoryState(replica_id, **options)
    scheme = url.partition("://")[0].lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"state URL must start with redis://, rediss:// or unix://, "
                         f"not {scheme + '://' if '://' in url else repr(url)}")
    from .redis import RedisState     # redis-py is imported only by the fleets that use it
    return RedisState(url, replica_id, **options)
