"""What an operator asks of a fleet (POST /proxy/models/load, unload, pin, /proxy/clear,
/proxy/optimize): one named host, or every host (a load with no host is placed as a request
is), each host's engine working in its log context. A mixin of Fleet."""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from ..engine.hostlog import run_for, working_for
from ..engine.lifecycle import Lease, ModelStatus
from ..engine.memory import MemoryPressure
from ..errors import InvalidRequest
from .hosts import Host

S = ModelStatus


class FleetOperations:
    hosts: list[Host]
    host: Callable[[str], Host]
    resolve: Callable[[str], Awaitable[str]]
    acquire: Callable[..., Awaitable[Lease]]
    memory_pressure: MemoryPressure

    def _targets(self, host: str | None) -> list[Host]:
        return [self.host(host)] if host is not None else self.hosts

    async def load(self, name: str, priority: int | None = None, *, host: str | None = None
                   ) -> bool:
        if priority is not None and not 1 <= priority <= 10:
            raise InvalidRequest("priority must be 1..10", param="priority")
        if host is None:
            key = await self.resolve(name)
            if priority is not None:     # kept on every host, wherever it is placed
                for h in self.hosts:
                    h.core.registry.priority_override[key] = priority
            lease = await self.acquire(key)
            lease.release()
            return True
        h = self.host(host)
        key = await self.resolve(name)
        if h.entry(key) is None:
            raise h.not_holding(key)
        with working_for(h.name):
            return await h.core.load(key, priority)

    async def unload(self, name: str, *, reason: str = "manual",
                     drain_timeout_s: float | None = None, host: str | None = None) -> bool:
        key = await self.resolve(name)
        done = False
        for h in self._targets(host):
            e = h.core.registry.entries.get(key)
            if e is not None and e.status in (S.LOADED, S.LOADING, S.UNLOADING):
                with working_for(h.name):
                    done = await h.core.unload(key, reason=reason,
                                               drain_timeout_s=drain_timeout_s) or done
        return done

    async def clear(self, *, host: str | None = None) -> list[str]:
        out: list[str] = []
        for h in self._targets(host):
            out += [k for k in await run_for(h.name, h.core.clear) if k not in out]
        return out

    async def optimize(self, *, host: str | None = None) -> dict[str, Any]:
        per_host = {h.name: await run_for(h.name, h.core.optimize)
                    for h in self._targets(host)}
        return {"unloaded_idle": sorted({k for r in per_host.values() for k in r["unloaded_idle"]}),
                "evicted_for_pressure": sorted({k for r in per_host.values()
                                                for k in r["evicted_for_pressure"]}),
                "memory_pressure": self.memory_pressure.value, "hosts": per_host}

    def pin(self, key: str, pinned: bool, *, host: str | None = None) -> None:
        if host is not None and self.host(host).entry(key) is None:
            raise self.host(host).not_holding(key)
        for h in self._targets(host):
            with working_for(h.name):
                h.core.pin(key, pinned)

    def pinned(self, key: str, *, host: str | None = None) -> bool:
        """Pinned on that host, or (no host) on any."""
        return any(h.core.pinned(key) for h in self._targets(host))

    def pinned_on(self, key: str) -> list[str]:
        return [h.name for h in self.hosts if h.core.pinned(key)]
