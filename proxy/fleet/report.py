"""The fleet's views: `GET /proxy/stats` in the single server's shape (figures summed over the
hosts, each model's row where it lives) plus `hosts`, one entry per host from its own engine."""
from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ..urls import redact_url
from ..engine.memory import GB
from ..engine.report import persistence, pressure_shown, top_by_usage, upstream_state

if TYPE_CHECKING:
    from .fleet import Fleet
    from .hosts import Host


def host_summary(h: "Host") -> dict[str, Any]:
    core = h.core
    s = core.last_sample
    return {
        "url": redact_url(h.config.url), "kind": h.config.kind, "up": h.up,
        "suspect": h.suspect, "labels": dict(h.config.labels),
        "upstream": upstream_state(core),
        "memory": None if s is None else {
            "total_gb": round(s.total_bytes / GB, 2),
            "available_gb": round(s.available_bytes / GB, 2),
            "used_percent": round(s.used_percent, 1),
            "ceiling_gb": round(core.ceiling_bytes() / GB, 2)},
        "memory_managed": core.memory_managed,
        "memory_pressure": pressure_shown(core),
        "loaded_models": h.loaded_models(),
        "queue_length": core.queue_length,
        "in_flight": len(core.active_leases()),
        "persistence": persistence(core),   # each host has its own history file
    }


def fleet_upstream(fleet: "Fleet") -> dict[str, Any]:
    """The fleet's `upstream` in /proxy/stats and /proxy/health: its hosts, not the single
    `upstream.url` (which a fleet does not use): `hosts` those up, `urls` every host's."""
    level = fleet.api_level
    caps = fleet.capabilities
    return {"ok": fleet.upstream_ok, "error": fleet.upstream_error,
            "hosts": [h.name for h in fleet.hosts if h.up],
            "urls": {h.name: redact_url(h.config.url) for h in fleet.hosts},
            "api_level": None if level is None else level.value,
            "manages_loading": fleet.manages_loading,
            "capabilities": None if caps is None else asdict(caps)}


def fleet_report(fleet: "Fleet") -> dict[str, Any]:
    first = fleet.hosts[0].core.report()
    s = fleet.last_sample
    counts: dict[str, int] = {k: 0 for k in first["model_counts"]}
    for h in fleet.hosts:            # host–model pairs, as the rows' `hosts` list them
        for e in h.core.registry:
            if h.allows(e.key):
                state = h.shown_state(e)
                counts[state] = counts.get(state, 0) + 1
    return {
        **first,
        "system_memory": None if s is None else {
            "total_gb": round(s.total_bytes / GB, 2),
            "available_gb": round(s.available_bytes / GB, 2),
            "used_percent": round(s.used_percent, 1)},
        "gpu_memory": None,
        "memory_managed": fleet.memory_managed,
        "memory_pressure": pressure_shown(fleet),
        "upstream": fleet_upstream(fleet),
        "model_counts": counts,
        "loaded_models": fleet.loaded_models(),
        "queue_length": fleet.queue_length,
        "models": {k: fleet.row(k) for k in fleet.known_models()},
        "top_models_by_usage": top_by_usage(
            {k: fleet.usage(k) for k in fleet.known_models()}, fleet.hosts[0].core.clock.now()),
        "hosts": {h.name: host_summary(h) for h in fleet.hosts},
        "placements": dict(fleet.placements),
    }
