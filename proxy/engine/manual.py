"""The operations an operator asks for by hand (the admin API's and the library's): load now,
unload after the in-flight requests, clear, optimize, pin. A part of EngineCore (a mixin: the
attributes below are the core's); in a fleet, fleet/operations.py does the same per host."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from ..errors import InvalidRequest, ModelUnavailable
from ..upstream import no_loading
from .memory import GB
from .report import pressure_shown

if TYPE_CHECKING:
    from ..config import Config
    from ..upstream.base import Capabilities
    from .accounting import Accounting
    from .clock import Clock
    from .eviction import Evictor
    from .lifecycle import Lease
    from .memory import MemoryPressure
    from .registry import Registry

log = logging.getLogger("proxy.engine")


class ManualOperations:
    registry: "Registry"
    accounting: "Accounting"
    evictor: "Evictor"
    config: "Config"
    clock: "Clock"
    capabilities: "Capabilities | None"
    manages_loading: bool
    memory_pressure: "MemoryPressure"
    memory_managed: bool
    resolve: Callable[[str], Awaitable[str]]
    acquire: Callable[..., Awaitable["Lease"]]
    unload_idle_models: Callable[[], Awaitable[list[str]]]
    sample_memory: Callable[[], Awaitable[Any]]
    relieve_pressure: Callable[[], Awaitable[list[str]]]

    async def load(self, name: str, priority: int | None = None, *,
                   host: str | None = None) -> bool:
        """Make a model resident now (a USE lease taken and released at once); `priority`
        (1–10) is kept for it until the proxy restarts."""
        _one_server(host)
        key = await self.resolve(name)
        if priority is not None:
            if not 1 <= priority <= 10:
                raise InvalidRequest("priority must be 1..10", param="priority")
            self.registry.priority_override[key] = priority
        self._can_load_or_unload(key, "loaded")
        e = self.registry.entries.get(key)
        if e is not None and self.registry.footprint_floor_bytes(e) is not None:
            # A load asked for by hand tries again: the refusal may have come while memory
            # was held by something the proxy did not count.
            log.warning("%s: the bound learned from a refusal (%.1f GB) is set aside for a "
                        "load asked for by hand", key, e.footprint_floor_bytes / GB)
            e.footprint_floor_bytes = None
            self.accounting.footprint_changed(e)
        lease = await self.acquire(key)
        lease.release()
        return True

    async def unload(self, name: str, *, reason: str = "manual",
                     drain_timeout_s: float | None = None, host: str | None = None) -> bool:
        """Unload after in-flight requests finish (never cut a generation)."""
        _one_server(host)
        e = self.registry.entries[await self.resolve(name)]
        self._can_load_or_unload(e.key, "unloaded")
        timeout_s = drain_timeout_s if drain_timeout_s is not None else \
            self.config.eviction.queue_timeout_s
        unloaded = await self.evictor.unload_drained(e, reason, timeout_s)
        if unloaded:
            self.keep_unloaded(e.key)
        return unloaded

    def keep_unloaded(self, key: str, *, tell: bool = True) -> None:
        """An unload by hand: no preload of key by its own history for an hour
        (preload.HAND_UNLOAD_QUIET_S) or until a request asks for it (a request for a model it follows still preloads it:
        that is news the unload did not know). Among replicas the others are told (`tell`),
        for the leader preloads."""
        e = self.registry.entries.get(key)
        if e is not None:
            e.unloaded_by_hand_s = self.clock.now()
            if tell and self.ctx.shared is not None:
                self.ctx.shared.tell_unloaded_by_hand(key)

    def _can_load_or_unload(self, key: str, done: str) -> None:
        """A 409 naming the server's kind when the proxy cannot load or unload on it (an
        OpenAI-compatible server, LM Studio before 0.4.0, a single-model llama-server): an
        unload answered "unloaded" there would be untrue, as a load would."""
        caps = self.capabilities      # None: the server has not answered yet; it will say
        if caps is not None and not caps.manages_loading:
            lacks, instead = no_loading(self.config.upstream.kind)
            raise ModelUnavailable(f"'{key}' cannot be {done} through the proxy: {lacks}; "
                                   f"{instead}.", final=True)

    async def unload_report(self, name: str, *, reason: str = "manual",
                            drain_timeout_s: float | None = None, host: str | None = None
                            ) -> dict[str, Any]:
        """The admin API's answer: `unloaded` (a fleet adds where, and where it failed)."""
        return {"unloaded": await self.unload(name, reason=reason,
                                              drain_timeout_s=drain_timeout_s, host=host)}

    async def clear(self, *, host: str | None = None) -> dict[str, Any]:
        """Unload every loaded model the proxy may unload (pins included: an explicit clear):
        `unloaded`, the keys unloaded."""
        _one_server(host)
        cleared: list[str] = []
        if not self.manages_loading:
            return {"unloaded": cleared}     # the server keeps what it loaded: nothing to do
        for key in self.registry.loaded():
            e = self.registry.entries[key]
            if e.owned or self.config.eviction.manage_external:
                if await self.unload(key, reason="manual"):
                    cleared.append(key)
        return {"unloaded": cleared}

    async def optimize(self, *, host: str | None = None) -> dict[str, Any]:
        """Idle models unloaded, then pressure relieved."""
        _one_server(host)
        idle = await self.unload_idle_models()
        await self.sample_memory()
        pressure = await self.relieve_pressure()
        return {"unloaded_idle": idle, "evicted_for_pressure": pressure,
                "memory_pressure": pressure_shown(self)}

    def pin(self, key: str, pinned: bool, *, host: str | None = None) -> None:
        """A runtime pin (POST /proxy/models/pin): kept until the proxy restarts."""
        _one_server(host)
        self.registry.pin_override[key] = pinned

    def pinned(self, key: str, *, host: str | None = None) -> bool:
        _one_server(host)
        return self.registry.pinned(key)

    def pinned_on(self, key: str) -> list[str]:
        return []


def _one_server(host: str | None) -> None:
    if host is not None:
        raise InvalidRequest("This proxy serves one upstream: `host` applies to a fleet "
                             "(upstreams: in the config)", param="host")
