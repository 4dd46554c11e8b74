"""Refusals that say why: what holds the memory a load needs, and what to change when a model
can never fit. Built by the scheduler; words shared with the policy's candidate filter."""
from __future__ import annotations

from .clock import Clock
from .eviction import Evictor
from .lifecycle import ModelEntry, ModelStatus
from .memory import GB, MemoryPressure, MemorySample
from .monitor import MemoryMonitor
from .policy import CLIENT_CONNECTED, CLIENT_KEPT, NOT_OURS, TEMPORARY
from .registry import ECHO_MAX_CHARS, Registry
from ..errors import InsufficientMemory, ModelTooLarge, clip

S = ModelStatus
LOADING, UNLOADING, OTHERS, EVICTABLE = "loading", "unloading", "other processes", "evictable"
# Memory that may free without anyone changing the config (other processes: perhaps).
WILL_GO = TEMPORARY | {LOADING, UNLOADING, EVICTABLE, OTHERS}
Holder = tuple[str, float, str]   # (model, bytes, why)


def gb_pair(a_bytes: float, b_bytes: float) -> tuple[str, str]:
    """Two amounts in GB with as many decimals (up to 3) as it takes to tell them apart:
    "needs 3.0 GB, 3.0 GB may be used now" reads as a contradiction."""
    for digits in (1, 2, 3):
        a, b = f"{a_bytes / GB:.{digits}f}", f"{b_bytes / GB:.{digits}f}"
        if a != b:
            break
    return a, b


class Refusals:
    def __init__(self, registry: Registry, monitor: MemoryMonitor, evictor: Evictor,
                 clock: Clock, *, host_path: str | None = None) -> None:
        self.registry, self.monitor, self.evictor, self.clock = registry, monitor, evictor, clock
        # A fleet's host has its budget in its own entry: upstreams[<i>].budget_gb.
        self.budget_key = f"{host_path}.budget_gb" if host_path else "memory.budget_gb"

    def holders(self, wanted: ModelEntry, waited_s: float) -> list[Holder]:
        """Every model holding memory and why it stays, and the memory of other programs."""
        out = []
        critical = self.monitor.level is MemoryPressure.CRITICAL
        ours = 0.0
        for e in self.registry:
            if e is wanted or e.status not in (S.LOADED, S.LOADING, S.UNLOADING):
                continue
            size = self.registry.held_bytes(e)
            ours += size
            if e.status is S.LOADING:
                out.append((e.key, size, LOADING))
            elif e.status is S.UNLOADING:
                out.append((e.key, size, UNLOADING))
            else:
                why = self.evictor.why_kept(e, critical=critical, requester_waited_s=waited_s)
                out.append((e.key, size, why or EVICTABLE))
        s = self.monitor.last_sample
        if s is not None and self.monitor.sampler.local:
            others = s.used_bytes - ours
            if others > 0.05 * s.total_bytes:
                out.append((OTHERS, others, OTHERS))
        return sorted(out, key=lambda h: -h[1])

    def insufficient(self, e: ModelEntry, holders: list[Holder], when: str, *,
                     retry_after_s: float) -> InsufficientMemory:
        need = self.registry.footprint_bytes(e)
        s = self.monitor.last_sample
        headroom = self.monitor.headroom(s) if s is not None else 0.0
        free = max(0.0, headroom)
        held = "; ".join(f"'{k}' {b / GB:.1f} GB ({why})" if k != OTHERS else
                         f"{why} {b / GB:.1f} GB" for k, b, why in holders) or "nothing"
        reasons = {why for _, _, why in holders}
        hint = ""
        if NOT_OURS in reasons:
            hint += " Models loaded outside the proxy are left alone unless " \
                    "eviction.manage_external is true."
        if reasons & {CLIENT_CONNECTED, CLIENT_KEPT}:
            hint += " Models an SDK client loaded through the proxy are kept while it is " \
                    "connected, or as native.evict says."
        need_gb, free_gb = gb_pair(need, free)
        if need > free:
            amounts = f"it needs {need_gb} GB, {free_gb} GB may be used now"
        else:   # memory came free, but too late for this load
            amounts = f"it needs {need_gb} GB; {free_gb} GB came free only as it gave up"
        # Even if all that may go went, it would not fit: only a person freeing memory helps,
        # so the refusal is final (an SDK would otherwise retry it after each Retry-After).
        final = need - headroom > sum(b for _, b, why in holders if why in WILL_GO)
        if final:
            hint += " Nothing the proxy may unload would make room: a retry helps only once " \
                    "memory is freed by hand (a model unpinned, or unloaded in LM Studio)."
        return InsufficientMemory(
            f"Not enough memory to load '{clip(e.key, ECHO_MAX_CHARS)}'{when} ({amounts}). Memory is "
            f"held by: {held}.{hint}", retry_after_s=None if final else retry_after_s,
            final=final)

    def hopeless(self, e: ModelEntry, need: float, s: MemorySample
                 ) -> InsufficientMemory | None:
        """The refusal of a load that neither waiting nor evicting can help: above the
        ceiling, or known to fail in the memory it may use now (None: it may go on)."""
        ceiling = self.monitor.ceiling_bytes(s)
        if need > ceiling:
            return self.too_large(e, need, ceiling, s,
                                  self.registry.config.memory.sampler == "budget")
        return self.known_to_fail(e, self.monitor.headroom(s))

    def too_large(self, e: ModelEntry, need: float, ceiling: float, s: MemorySample,
                  budget: bool) -> ModelTooLarge:
        limit = self.monitor.binding_limit(s)
        return ModelTooLarge(
            f"'{clip(e.key, ECHO_MAX_CHARS)}' needs {need / GB:.1f} GB ({self.footprint_how(e)}), "
            f"more than the {ceiling / GB:.1f} GB any one model may take of "
            f"{s.total_bytes / GB:.1f} GB (set by {limit}). It can never be loaded here: change "
            f"{self.ceiling_keys(s, budget)}, or set models.{e.key}.footprint_gb if the "
            f"estimate is wrong.")

    def footprint_how(self, e: ModelEntry) -> str:
        """Where the footprint a refusal quotes comes from."""
        floor = e.footprint_floor_bytes or 0.0
        return {"refused": f"LM Studio refused to load it with {floor / GB:.1f} GB free for it",
                "configured": f"models.{e.key}.footprint_gb",
                "learned": "measured across earlier loads",
                "shared": "as another replica measured it",
                "estimated": f"estimated as its {(e.size_bytes or 0) / GB:.1f} GB file × "
                             f"memory.footprint_factor"}.get(self.registry.footprint_source(e),
                                                             "as fitted")

    def ceiling_keys(self, s: MemorySample, budget: bool) -> str:
        """The settings that raise the ceiling for one model: the binding limit, and the
        budget when the memory is one (a fleet's host: its own upstreams[<i>].budget_gb)."""
        limit = self.monitor.binding_limit(s)
        return f"{limit} or {self.budget_key}" if budget else limit

    def known_to_fail(self, e: ModelEntry, headroom: float) -> InsufficientMemory | None:
        """The refusal when the server refused e for lack of memory with at least `headroom`
        free for it: loading it would fail again, and evicting for it would empty memory for
        nothing (None: it may be tried)."""
        floor = self.registry.footprint_floor_bytes(e)
        if floor is None or headroom > floor:
            return None
        size = f" (its file is {e.size_bytes / GB:.1f} GB)" if e.size_bytes else ""
        return InsufficientMemory(
            f"'{clip(e.key, ECHO_MAX_CHARS)}' needs more than {floor / GB:.1f} GB{size}: LM Studio "
            f"refused to load it for lack of memory with that much free for it. "
            f"{max(0.0, headroom) / GB:.1f} GB may be used now, and no model is evicted for it "
            f"again until its footprint is revised: set models.{e.key}.footprint_gb to its "
            f"real need (then it is loaded like any other model, evicting what it must), "
            f"free memory so that more than {floor / GB:.1f} GB are available, or load it "
            f"with the admin API (POST /proxy/models/load), which tries once more.", final=True)
