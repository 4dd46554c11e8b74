"""The engine's face (`proxy.engine.face.Engine`) read through the library's manager, typed.

Each attribute is read from the wrapped core when it is read from the manager, so a type
checker sees the core's own types (`_Through(lambda core: core.usage)` has the type of
`EngineCore.usage`) and a new core attribute needs one line here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar, overload

if TYPE_CHECKING:
    from ..engine.core import EngineCore

T = TypeVar("T")


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


class EngineFace:
    core: "EngineCore"

    # -- the engine's face, read through ----------------------------------------------------
    clock = _Through(lambda core: core.clock)
    store = _Through(lambda core: core.store)
    # the request path
    resolve = _Through(lambda core: core.resolve)
    acquire = _Through(lambda core: core.acquire)
    upstream_for = _Through(lambda core: core.upstream_for)
    host_failed = _Through(lambda core: core.host_failed)
    host_lost = _Through(lambda core: core.host_lost)
    hold = _Through(lambda core: core.hold)
    record = _Through(lambda core: core.record)
    # loads an LM Studio SDK client performs through the proxy
    admit_load = _Through(lambda core: core.admit_load)
    client_connection = _Through(lambda core: core.client_connection)
    owner_of = _Through(lambda core: core.owner_of)
    # operations
    load = _Through(lambda core: core.load)
    unload = _Through(lambda core: core.unload)
    unload_report = _Through(lambda core: core.unload_report)
    clear = _Through(lambda core: core.clear)
    optimize = _Through(lambda core: core.optimize)
    pin = _Through(lambda core: core.pin)
    pinned = _Through(lambda core: core.pinned)
    pinned_on = _Through(lambda core: core.pinned_on)
    reconcile = _Through(lambda core: core.reconcile)
    apply_config = _Through(lambda core: core.apply_config)
    # its own lifecycle
    start = _Through(lambda core: core.start)
    start_monitoring = _Through(lambda core: core.start_monitoring)
    stop_monitoring = _Through(lambda core: core.stop_monitoring)
    cleanup = _Through(lambda core: core.cleanup)
    add_listener = _Through(lambda core: core.add_listener)
    # views
    memory_pressure = _Through(lambda core: core.memory_pressure)
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
    sample_memory = _Through(lambda core: core.sample_memory)
    unload_idle_models = _Through(lambda core: core.unload_idle_models)
    relieve_pressure = _Through(lambda core: core.relieve_pressure)
    flush = _Through(lambda core: core.flush)
