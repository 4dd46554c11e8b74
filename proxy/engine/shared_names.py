"""Do the replicas name this host alike? (engine/shared.py)

Replicas share a host's locks, leases and records under its name, so every replica must give
one server one name. A replica that calls it otherwise coordinates with nobody: two names for
one server load each model on it twice; one name for two servers mixes their facts. Each host
record carries the server's URL (urls.normal_url); before writing its own, a replica reads the
live replicas' records and finds the names that disagree with its own: another name for its
URL, or its name for another URL. It logs a WARNING once, and /proxy/health has it as an alert
(`host_name_conflict`) until no such record has been seen for a record's lifetime (the other
record may be overwritten in between: one name, two URLs, is seen only when the other replica
wrote last).
"""
from __future__ import annotations

import asyncio
import logging

from ..state import HostRecord, StateStore

log = logging.getLogger("proxy.shared")


class HostNames:
    def __init__(self, store: StateStore, host: str) -> None:
        self.store = store
        self.host = host
        self._found: dict[str, float] = {}     # what disagrees → until (loop time)

    async def check(self, mine: HostRecord, keep_s: float) -> None:
        """Compare `mine` (about to be written) with the live replicas' records. Raises
        StateUnavailable."""
        records = await self.store.hosts()
        live = set(await self.store.replicas())
        now = asyncio.get_running_loop().time()
        for name, r in records.items():
            if not r.url or not mine.url or r.reported_by == self.store.replica_id or \
                    r.reported_by not in live:
                continue
            if name == self.host and r.url != mine.url:
                found = (f"replica {r.reported_by} has host '{name}' at {r.url}, this "
                         f"replica at {mine.url}")
            elif name != self.host and r.url == mine.url:
                found = (f"replica {r.reported_by} calls {mine.url} host '{name}', this "
                         f"replica calls it '{self.host}'")
            else:
                continue
            if found not in self._found:
                log.warning("%s: the replicas must name each server alike (upstreams[].name), "
                            "or they do not coordinate its loads", found)
            self._found[found] = now + keep_s
        for found, until in list(self._found.items()):
            if until <= now:
                del self._found[found]
                log.info("no longer seen: %s", found)

    def conflict(self) -> str | None:
        """What disagrees, as last found (None: nothing)."""
        now = asyncio.get_running_loop().time()
        found = [f for f, until in self._found.items() if until > now]
        return "; ".join(sorted(found)) or None
