"""Why no host of the fleet takes a model: too large for each host that may hold it (its ceiling
for one model and the settings that bound it) while the others' `models` patterns or catalogues
keep it off; or every host that serves it unreachable."""
from __future__ import annotations

from ..engine.lifecycle import ModelEntry
from ..engine.memory import GB
from ..errors import ModelTooLarge, UpstreamUnreachable
from .hosts import Host


def too_large(key: str, hosts: list[Host]) -> ModelTooLarge:
    """Each host of the fleet, in the config's order, with why it cannot take `key`."""
    holding = [(h, e) for h in hosts for e in (h.entry(key),) if e is not None]
    needs = {h.name: h.core.registry.footprint_bytes(e) for h, e in holding}
    one_need = len({f"{n / GB:.1f}" for n in needs.values()}) == 1
    clauses = []
    for h in hosts:
        e = h.entry(key)
        clauses.append(_cannot_hold(h, key) if e is None else
                       _ceiling(h, e, None if one_need else needs[h.name]))
    head = f"'{key}' needs "
    if one_need:
        h, e = holding[0]
        head += f"{needs[h.name] / GB:.1f} GB ({h.core.scheduler.refusals.footprint_how(e)}), "
    return ModelTooLarge(
        f"{head}more than any host of the fleet may give one model: {'; '.join(clauses)}. It "
        f"can never be loaded here: change one of those, or set models.{key}.footprint_gb if "
        f"the estimate is wrong.")


def _ceiling(h: Host, e: ModelEntry, need: float | None) -> str:
    """`need`: its footprint there, when the hosts do not agree on one."""
    core = h.core
    s = core.monitor.last_sample
    if s is None:
        return f"'{h.name}' memory not sampled yet"
    refusals = core.scheduler.refusals
    keys = refusals.ceiling_keys(s, core.config.memory.sampler == "budget")
    there = "" if need is None else f" for its {need / GB:.1f} GB"
    how = "" if need is None else f"{refusals.footprint_how(e)}; "
    return (f"'{h.name}' {core.ceiling_bytes() / GB:.1f} GB of {s.total_bytes / GB:.1f} GB"
            f"{there} ({how}change {keys})")


def _cannot_hold(h: Host, key: str) -> str:
    if not h.allows(key):
        return (f"'{h.name}' may not hold it ({h.core.ctx.host_path}.models: "
                f"{', '.join(h.config.models or ())})")
    return f"'{h.name}' does not list it"


def unreachable(key: str, listed: list[tuple[Host, ModelEntry]], avoid: str | None, *,
                retry_after_s: float) -> UpstreamUnreachable:
    """No host that serves `key` took the request: each host that lists it is named, and why
    those that are down are."""
    names = ", ".join(f"'{h.name}'" for h, _ in listed) or "none other"
    if avoid is not None:
        names += f"; '{avoid}' did not answer this request"
    down = [h for h, _ in listed if not h.up]
    why = "; ".join(f"'{h.name}': {h.core.upstream_error or 'not answering'}" for h in down)
    return UpstreamUnreachable(f"No host that serves '{key}' is reachable (hosts: "
                               f"{names}){': ' + why if why else ''}",
                               retry_after_s=retry_after_s)
