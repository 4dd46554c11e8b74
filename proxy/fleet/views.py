"""A host's state for one model, as the placer reads it (`HostView`), built from its engine:
its status there, free room, footprint, ceiling, the cheapest victim set's expected reload cost
(the evictor's own choice, priced over the placement horizon) and the load time learned there.
(A model resident somewhere never gets this far: the fleet's hot path picks among its copies
directly.)"""
from __future__ import annotations

from ..engine.lifecycle import ModelEntry, ModelStatus
from ..engine.policy import priority_weight
from .hosts import Host
from .placer import LOADED, LOADING, HostView

S = ModelStatus
# Victims are priced by their chance of a request within this long, not the evictor's minute:
# with requests minutes apart every victim would cost ~0, the load time alone would decide and
# the fastest host would churn while the others' memory sat idle (bench.fleet: the placer ÷
# single-host geo. mean 1.78 → 1.62 with this and the sole-host term below).
PLACEMENT_HORIZON_S = 300.0


def victim_cost_s(reload_s: float, priority_weight_: float, p_return: float, *,
                  sole_here: bool, incoming_load_s: float) -> float:
    """Expected seconds evicting one victim costs: its reload × its chance of return. A victim
    no other host can hold comes back here and pushes the newcomer out: its load again too."""
    cost = priority_weight_ * max(reload_s, 0.01) * p_return
    return cost + incoming_load_s * p_return if sole_here else cost


def _status(h: Host, e: ModelEntry, loading_elsewhere: bool = False) -> str:
    if e.status is S.LOADED:
        return LOADED
    if e.status is S.LOADING or e.key in h.core.scheduler.pending or loading_elsewhere:
        return LOADING
    return e.status.value


def full_view(h: Host, e: ModelEntry, preferred: bool, loading_elsewhere: bool = False, *,
              elsewhere_ceiling_bytes: float = float("inf")) -> HostView:
    """`loading_elsewhere`: another replica of the proxy is loading it there.
    `elsewhere_ceiling_bytes`: the largest ceiling among the fleet's other hosts that are up (a
    victim larger than it fits only here)."""
    core = h.core
    now = core.clock.now()
    need = core.registry.footprint_bytes(e)
    free = core.headroom_bytes()
    load_s = core.registry.reload_s(e)
    evict_cost: float | None = None
    if free < need and h.up:
        evictor, registry = core.evictor, core.registry
        victims = evictor.choose(need - free, exclude=e.key, critical=False)
        if victims:
            evict_cost = 0.0
            for k in victims:
                v = registry.entries[k]
                p_return = max(core.learner.predict(k, now, PLACEMENT_HORIZON_S).p_within,
                               core.learner.follow_chance(k, now))
                evict_cost += victim_cost_s(
                    registry.reload_s(v), priority_weight(registry.priority(k)), p_return,
                    sole_here=registry.footprint_bytes(v) > elsewhere_ceiling_bytes,
                    incoming_load_s=load_s)
    return HostView(h.name, _status(h, e, loading_elsewhere), up=h.up, in_flight=e.leases,
                    parallel=h.config.parallel, waiters=e.waiting, free_bytes=free,
                    footprint_bytes=need, ceiling_bytes=core.ceiling_bytes(),
                    evict_cost_s=evict_cost, load_s=load_s, preferred=preferred,
                    failing=e.status is S.ERROR and now < e.retry_at_s)
