"""What an operator asks of a fleet (POST /proxy/models/load, unload, pin, /proxy/clear,
/proxy/optimize): one named host, or every host (a load with no host is placed as a request
is), each host's engine working in its log context. A mixin of Fleet.

Asked of every host, an unload, clear or optimize goes to all of them at once: a host that is
down is not asked (it would not answer, or only after a timeout), a host that fails is named
with its error in `failed`, and what the others did stands. Only when no host could do it is
the answer an error, naming each host. A named host answers for itself: its error is the
answer. (A pin and a load's priority are kept by each engine, down or not: nothing to reach.)"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, TypeVar

from ..engine.hostlog import working_for
from ..engine.lifecycle import Lease, ModelStatus
from ..engine.memory import MemoryPressure
from ..engine.report import pressure_shown
from ..errors import InvalidRequest, ProxyError, UpstreamError, UpstreamUnreachable
from .hosts import Host

S = ModelStatus
T = TypeVar("T")
Failed = dict[str, dict[str, Any]]     # host → {"code", "message"}


class FleetOperations:
    hosts: list[Host]
    host: Callable[[str], Host]
    host_failed: Callable[[str], None]
    resolve: Callable[[str], Awaitable[str]]
    acquire: Callable[..., Awaitable[Lease]]
    memory_pressure: MemoryPressure
    memory_managed: bool

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
        return (await self.unload_report(name, reason=reason, drain_timeout_s=drain_timeout_s,
                                         host=host))["unloaded"]

    async def unload_report(self, name: str, *, reason: str = "manual",
                            drain_timeout_s: float | None = None, host: str | None = None
                            ) -> dict[str, Any]:
        """`unloaded` (on any host), `unloaded_on` (the hosts it was unloaded on) and `failed`
        (the hosts holding it that could not unload it, and why)."""
        key = await self.resolve(name)
        holding = [h for h in self._targets(host)
                   for e in (h.core.registry.entries.get(key),)
                   if e is not None and (e.status in (S.LOADED, S.LOADING, S.UNLOADING) or
                                         # named, and it cannot unload: its own 409 says why
                                         host is not None and not h.core.manages_loading)]

        async def unload(h: Host) -> bool:
            return await h.core.unload(key, reason=reason, drain_timeout_s=drain_timeout_s)

        done, failed = await self._each(holding, unload, f"'{key}' could be unloaded on no host",
                                        named=host is not None)
        on = [n for n, unloaded in done.items() if unloaded]
        if on:      # nor preloaded back by a host that did not hold it
            for h in self._targets(host):
                h.core.keep_unloaded(key)
        return {"unloaded": bool(on), "unloaded_on": on, "failed": failed}

    async def clear(self, *, host: str | None = None) -> dict[str, Any]:
        done, failed = await self._each(self._targets(host), lambda h: h.core.clear(),
                                        "No host could be cleared", named=host is not None)
        return {"unloaded": sorted({k for r in done.values() for k in r["unloaded"]}),
                "hosts": done, "failed": failed}

    async def optimize(self, *, host: str | None = None) -> dict[str, Any]:
        done, failed = await self._each(self._targets(host), lambda h: h.core.optimize(),
                                         "No host could be optimized", named=host is not None)
        return {"unloaded_idle": sorted({k for r in done.values() for k in r["unloaded_idle"]}),
                "evicted_for_pressure": sorted({k for r in done.values()
                                                for k in r["evicted_for_pressure"]}),
                "memory_pressure": pressure_shown(self), "hosts": done,
                "failed": failed}

    async def _each(self, hosts: list[Host], work: Callable[[Host], Awaitable[T]], none: str,
                    *, named: bool) -> tuple[dict[str, T], Failed]:
        """`work` on every host at once; each host's result, and the hosts that failed. No host
        done and some failed: the error `none` (a named host: its own error)."""
        async def one(h: Host) -> T:
            if not h.up and not named:
                raise UpstreamUnreachable(f"down, not asked: {h.down_reason()}")
            with working_for(h.name):
                try:
                    return await work(h)
                except UpstreamUnreachable:
                    self.host_failed(h.name)     # left alone until it answers again
                    raise

        outcomes = await asyncio.gather(*(one(h) for h in hosts), return_exceptions=True)
        done: dict[str, T] = {}
        errors: dict[str, ProxyError] = {}
        for h, out in zip(hosts, outcomes):
            if isinstance(out, ProxyError):
                errors[h.name] = out
            elif isinstance(out, BaseException):
                raise out
            else:
                done[h.name] = out
        if errors and not done:
            raise errors[hosts[0].name] if named else _none_done(none, errors)
        return done, {n: {"code": e.code, "message": e.message} for n, e in errors.items()}

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


def _none_done(what: str, errors: dict[str, ProxyError]) -> ProxyError:
    """One error naming each host's: of their kind when they agree (its retry hint kept),
    else an upstream error."""
    first = next(iter(errors.values()))
    error = first if all(type(e) is type(first) for e in errors.values()) else \
        UpstreamError("")
    error.message = f"{what}: " + "; ".join(f"'{n}': {e.message}" for n, e in errors.items())
    return error
