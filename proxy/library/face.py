"""The engine's face (`proxy.engine.face.Engine`) read through the library's manager, typed,
and the manager's tie to the one event loop it runs in.

Each attribute is read from the wrapped core when it is read from the manager, so a type
checker sees the core's own types (`_Through(lambda core: core.usage)` has the type of
`EngineCore.usage`) and a new core attribute needs one line here. The coroutine functions are
`_Tied`: reading one from a closed manager, or from another loop than the manager's, raises
ManagerClosed or WrongEventLoop before any of the engine is touched (its futures, locks and
HTTP client belong to that loop, and a call from elsewhere would break them for the loop too).
"""
from __future__ import annotations

import asyncio
from threading import get_ident
from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar, overload

if TYPE_CHECKING:
    from ..engine.core import EngineCore

T = TypeVar("T")


class ManagerClosed(RuntimeError):
    """The manager was closed (cleanup(), or the end of its `async with`)."""


class WrongEventLoop(RuntimeError):
    """The manager was used outside the event loop it runs in."""


class _Through(Generic[T]):
    """An attribute of the wrapped core, read through the manager."""
    __slots__ = ("read",)

    def __init__(self, read: Callable[["EngineCore"], T]) -> None:
        self.read = read

    @overload
    def __get__(self, face: None, owner: type | None = None) -> "_Through[T]": ...
    @overload
    def __get__(self, face: "EngineFace", owner: type | None = None) -> T: ...

    def __get__(self, face: "EngineFace | None", owner: type | None = None) -> Any:
        if face is None:
            return self
        return self.read(face.core)


class _Tied(_Through[T]):
    """A coroutine function of the core: only for the manager's own loop while it is open."""
    __slots__ = ()

    @overload
    def __get__(self, face: None, owner: type | None = None) -> "_Tied[T]": ...
    @overload
    def __get__(self, face: "EngineFace", owner: type | None = None) -> T: ...

    def __get__(self, face: "EngineFace | None", owner: type | None = None) -> Any:
        if face is None:
            return self
        # The common case without asyncio.get_running_loop(), a system call (getpid) per
        # call on Python 3.11: the manager's loop runs in this thread, so it is the one
        # running here (a thread runs one loop at a time).
        loop = face._loop
        if loop is None or face._thread != get_ident() or not loop.is_running() or \
                face._closed:
            face._check_tie()
        return self.read(face.core)


class EngineFace:
    core: "EngineCore"
    # The manager's loop and its thread, from its first use in a running loop.
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: int | None = None
    _closed = False

    def _check_tie(self) -> None:
        """Raise unless called in the manager's loop (or in a loop while it has none yet:
        then that one becomes its loop)."""
        if self._closed:
            raise ManagerClosed("This ModelMemoryManager is closed (cleanup() ran, or its "
                                "`async with` ended); create a new one.")
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is self._loop:
            return
        if self._loop is None:
            self._loop, self._thread = loop, get_ident()
            return
        gone = " (that loop has closed)" if self._loop.is_closed() else ""
        raise WrongEventLoop(
            "This ModelMemoryManager belongs to the event loop it was started in" + gone +
            "; call it from that loop (from another thread: asyncio.run_coroutine_threadsafe"
            "(coro, loop)), or create a manager in this one.")

    # -- the engine's face, read through ----------------------------------------------------
    clock = _Through(lambda core: core.clock)
    store = _Through(lambda core: core.store)
    # the request path
    resolve = _Tied(lambda core: core.resolve)
    acquire = _Tied(lambda core: core.acquire)
    upstream_for = _Through(lambda core: core.upstream_for)
    host_failed = _Through(lambda core: core.host_failed)
    host_lost = _Through(lambda core: core.host_lost)
    hold = _Through(lambda core: core.hold)
    record = _Through(lambda core: core.record)
    # loads an LM Studio SDK client performs through the proxy
    admit_load = _Tied(lambda core: core.admit_load)
    client_connection = _Through(lambda core: core.client_connection)
    owner_of = _Through(lambda core: core.owner_of)
    # operations
    load = _Tied(lambda core: core.load)
    unload = _Tied(lambda core: core.unload)
    unload_report = _Tied(lambda core: core.unload_report)
    clear = _Tied(lambda core: core.clear)
    optimize = _Tied(lambda core: core.optimize)
    pin = _Through(lambda core: core.pin)
    pinned = _Through(lambda core: core.pinned)
    pinned_on = _Through(lambda core: core.pinned_on)
    reconcile = _Tied(lambda core: core.reconcile)
    apply_config = _Through(lambda core: core.apply_config)
    # its own lifecycle (cleanup() is the manager's: it closes the manager too)
    start = _Tied(lambda core: core.start)
    start_monitoring = _Tied(lambda core: core.start_monitoring)
    stop_monitoring = _Tied(lambda core: core.stop_monitoring)
    add_listener = _Through(lambda core: core.add_listener)
    # views
    memory_pressure = _Through(lambda core: core.memory_pressure)
    memory_managed = _Through(lambda core: core.memory_managed)
    last_sample = _Through(lambda core: core.last_sample)
    queue_length = _Through(lambda core: core.queue_length)
    upstream_ok = _Through(lambda core: core.upstream_ok)
    upstream_error = _Through(lambda core: core.upstream_error)
    api_level = _Through(lambda core: core.api_level)
    manages_loading = _Through(lambda core: core.manages_loading)
    capabilities = _Through(lambda core: core.capabilities)
    last_reconcile_s = _Through(lambda core: core.last_reconcile_s)
    known_models = _Through(lambda core: core.known_models)
    loaded_models = _Through(lambda core: core.loaded_models)
    entry = _Through(lambda core: core.entry)
    usage = _Through(lambda core: core.usage)
    footprint_bytes = _Through(lambda core: core.footprint_bytes)
    footprint_source = _Through(lambda core: core.footprint_source)
    ceiling_bytes = _Through(lambda core: core.ceiling_bytes)
    active_leases = _Through(lambda core: core.active_leases)
    row = _Through(lambda core: core.row)
    report = _Through(lambda core: core.report)
    recommend = _Through(lambda core: core.recommend)
    priority = _Through(lambda core: core.priority)
    # the core's maintenance
    sample_memory = _Tied(lambda core: core.sample_memory)
    unload_idle_models = _Tied(lambda core: core.unload_idle_models)
    relieve_pressure = _Tied(lambda core: core.relieve_pressure)
    flush = _Tied(lambda core: core.flush)
