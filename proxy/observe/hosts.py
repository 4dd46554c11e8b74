"""The host dimension of the proxy's views, when its engine is a fleet (`upstreams:`): which
hosts there are, each one's state (up, circuit, last error) and memory. The event stream, the
health report, `/metrics` and `/readyz` read it; for a single server there are no hosts and
those views stay as they were.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..urls import redact_url
from ..engine.memory import GB
from ..engine.report import pressure_shown
from ..fleet import Fleet

if TYPE_CHECKING:
    from ..engine.face import Engine
    from ..fleet import Host


def fleet_of(engine: "Engine") -> Fleet | None:
    return engine if isinstance(engine, Fleet) else None


def host_names(engine: "Engine") -> frozenset[str] | None:
    """The configured host names of a fleet; None for a single server."""
    fleet = fleet_of(engine)
    return None if fleet is None else frozenset(h.name for h in fleet.hosts)


def host_state(h: "Host") -> dict[str, Any]:
    """Whether the host takes requests, and if not why."""
    breaker = getattr(h.backend, "breaker", None)
    error = h.core.upstream_error
    if error is None and h.suspect:
        error = "a request could not reach it; waiting for it to answer again"
    if error is None and breaker is not None and breaker.open:
        error = f"circuit {breaker.state}"
    return {"up": h.up, "url": redact_url(h.config.url), "error": None if h.up else error,
            "circuit": None if breaker is None else breaker.state}


def host_memory(h: "Host") -> dict[str, Any]:
    """One host's memory as the dashboard draws it (the single server's `memory` event shape),
    and the models resident there."""
    core = h.core
    mem = core.config.memory
    s = core.last_sample
    out: dict[str, Any] = {"up": h.up, "level": pressure_shown(core),
                           "managed": core.memory_managed,
                           "sampler": mem.sampler,
                           "reserve_bytes": int(mem.min_free_memory_gb * GB),
                           "ceiling_percent": mem.max_memory_usage_percent,
                           "total_bytes": None, "available_bytes": None, "used_percent": None,
                           "ceiling_bytes": None, "loaded_models": h.loaded_models()}
    if s is not None:
        out.update(total_bytes=s.total_bytes, available_bytes=s.available_bytes,
                   used_percent=round(s.used_percent, 2), ceiling_bytes=core.ceiling_bytes())
    return out
