"""A host's state for one model, as the placer reads it (`HostView`), built from its engine:
its status there, free room, footprint, ceiling, the cheapest victim set's expected reload cost
(the evictor's own choice and cost) and the load time learned there. (A model resident
somewhere never gets this far: the fleet's hot path picks among its copies directly.)"""
from __future__ import annotations

from ..engine.lifecycle import ModelEntry, ModelStatus
from ..engine.policy import expected_cost_s
from .hosts import Host
from .placer import LOADED, LOADING, HostView

S = ModelStatus


def _status(h: Host, e: ModelEntry, loading_elsewhere: bool = False) -> str:
    if e.status is S.LOADED:
        return LOADED
    if e.status is S.LOADING or e.key in h.core.scheduler.pending or loading_elsewhere:
        return LOADING
    return e.status.value


def full_view(h: Host, e: ModelEntry, preferred: bool, loading_elsewhere: bool = False
              ) -> HostView:
    """`loading_elsewhere`: another replica of the proxy is loading it there."""
    core = h.core
    now = core.clock.now()
    need = core.registry.footprint_bytes(e)
    free = core.headroom_bytes()
    evict_cost: float | None = None
    if free < need and h.up:
        evictor = core.evictor
        victims = evictor.choose(need - free, exclude=e.key, critical=False)
        if victims:
            evict_cost = sum(expected_cost_s(evictor.candidate(core.registry.entries[k], now,
                                                               predicted=True))
                             for k in victims)
    return HostView(h.name, _status(h, e, loading_elsewhere), up=h.up, in_flight=e.leases,
                    parallel=h.config.parallel, waiters=e.waiting, free_bytes=free,
                    footprint_bytes=need, ceiling_bytes=core.ceiling_bytes(),
                    evict_cost_s=evict_cost, load_s=core.registry.reload_s(e),
                    preferred=preferred,
                    failing=e.status is S.ERROR and now < e.retry_at_s)
