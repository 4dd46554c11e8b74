"""The fleet's views: what the rest of the proxy reads of several hosts as of one engine —
memory and pressure summed or the worst, the catalogue as the union, a model's figures from
the host that holds it (and where it lives), the first host's answers where one is needed."""
from __future__ import annotations

from typing import Any, Iterable

from ..engine.lifecycle import Lease, ModelEntry, ModelStatus
from ..engine.memory import MemoryPressure, MemorySample
from ..engine.usage import ModelUsage, merged
from ..upstream.base import ApiLevel, Capabilities
from .hosts import Host


class FleetViews:
    hosts: list[Host]

    def _key_of(self, name: str) -> str | None:
        for h in self.hosts:
            key = h.core.registry.key_of(name)
            if key is not None and h.allows(key):
                return key
        return None

    def _up(self) -> Iterable[Host]:
        return (h for h in self.hosts if h.core.upstream_ok)

    @property
    def memory_managed(self) -> bool:
        return any(h.core.memory_managed for h in self.hosts)

    @property
    def memory_pressure(self) -> MemoryPressure:
        """The worst over the hosts whose memory the proxy manages."""
        return max((h.core.memory_pressure for h in self.hosts if h.core.memory_managed),
                   key=lambda p: p.rank, default=MemoryPressure.LOW)

    @property
    def last_sample(self) -> MemorySample | None:
        """The fleet's memory as one sample: the totals and availability of the hosts up
        summed (a host that does not answer has no memory to offer, and its last figures are
        not its memory now)."""
        samples = [h.core.last_sample for h in self.hosts if h.up]
        if not any(samples):
            return None
        have = [s for s in samples if s is not None]
        return MemorySample(total_bytes=sum(s.total_bytes for s in have),
                            available_bytes=sum(s.available_bytes for s in have))

    def ceiling_bytes(self) -> float:
        """The most one model may take on the roomiest host."""
        return max(h.core.ceiling_bytes() for h in self.hosts)

    @property
    def queue_length(self) -> int:
        return sum(h.core.queue_length for h in self.hosts)

    @property
    def upstream_ok(self) -> bool:
        return any(True for _ in self._up())

    @property
    def upstream_error(self) -> str | None:
        errors = [f"{h.name}: {h.core.upstream_error}" for h in self.hosts
                  if h.core.upstream_error]
        return "; ".join(errors) or None

    @property
    def api_level(self) -> ApiLevel | None:
        return next((h.core.api_level for h in self._up()), self.hosts[0].core.api_level)

    @property
    def manages_loading(self) -> bool:
        return any(h.core.manages_loading for h in self.hosts)

    @property
    def capabilities(self) -> Capabilities | None:
        return next((h.core.capabilities for h in self._up()), None)

    @property
    def last_reconcile_s(self) -> float:
        return min(h.core.last_reconcile_s for h in self.hosts)

    def known_models(self) -> list[str]:
        seen: dict[str, None] = {}
        for h in self.hosts:
            seen.update((k, None) for k in h.core.known_models() if h.allows(k))
        return list(seen)

    def loaded_models(self) -> list[str]:
        seen: dict[str, None] = {}
        for h in self.hosts:
            seen.update((k, None) for k in h.loaded_models())
        return list(seen)

    def where(self, key: str) -> list[Host]:
        """The hosts that list the model, those where it is loaded first."""
        listed = [h for h in self.hosts if h.entry(key) is not None]
        return sorted(listed, key=lambda h: not h.resident(key))

    def entry(self, name: str) -> ModelEntry | None:
        key = self._key_of(name)
        hosts = self.where(key) if key is not None else []
        return hosts[0].core.registry.entries[key] if hosts else None

    def _core_of(self, e: ModelEntry):  # noqa: ANN202 - EngineCore
        for h in self.hosts:
            if h.core.registry.entries.get(e.key) is e:
                return h.core
        return self.hosts[0].core

    def usage(self, key: str) -> ModelUsage:
        """The model's usage on every host, added up (each figure is a sum of events)."""
        return merged([h.core.usage(key) for h in self.hosts
                       if key in h.core.registry.entries])

    def footprint_bytes(self, e: ModelEntry) -> float:
        return self._core_of(e).footprint_bytes(e)

    def footprint_source(self, e: ModelEntry) -> str:
        return self._core_of(e).footprint_source(e)

    def active_leases(self) -> list[Lease]:
        return [lease for h in self.hosts for lease in h.core.active_leases()]

    def row(self, key: str) -> dict[str, Any]:
        """The model's row where it is loaded (else where it is listed first), its use added
        up over every host, and where it lives: `host` (the row's), `hosts` (its state on
        every host that lists it), `host_errors` (why it failed on each host in error)."""
        hosts = self.where(key)
        first = hosts[0]
        row = first.core.row(key)
        now_s = first.core.clock.now()
        usage = self.usage(key)
        row.update(usage.summary(now_s))   # every host's use
        entries = [(h, h.core.registry.entries[key]) for h in hosts]
        row.update(_history(usage, [e for _, e in entries], now_s))
        state = first.shown_state(first.core.registry.entries[key])
        if state != row["state"]:      # resident on a host that is down: not resident
            row.update(state=state, owner=None, instances=[])
        row["host"] = first.name
        row["hosts"] = {h.name: h.shown_state(e) for h, e in entries}
        # The row's last_error is its host's: a failure on another host is told here.
        row["host_errors"] = {h.name: e.last_error or "no reason given" for h, e in entries
                              if e.status is ModelStatus.ERROR}
        return row

    def report(self) -> dict[str, Any]:
        from .report import fleet_report
        return fleet_report(self)

    def recommend(self, context: Any = None) -> dict[str, Any]:
        """The recommendation of the host that lists the most models (the fleet's catalogue
        is the union; a model listed elsewhere only is still placed where it is listed)."""
        best = max(self._up(), key=lambda h: len(h.core.registry), default=self.hosts[0])
        return best.core.recommend(context)


def _history(usage: ModelUsage, entries: list[ModelEntry], now_s: float) -> dict[str, Any]:
    """A model's loads, evictions and last use over every host that lists it: a model used,
    loaded or evicted on one host and listed first by another is not "never used" there."""
    loads = sum(e.load_count for e in entries)
    # (a load time restored from the history with no load counted yet weighs as one load)
    timed = [(e.load_time_s, max(1, e.load_count)) for e in entries
             if e.load_time_s is not None]
    evictions: dict[str, int] = {}
    for e in entries:
        for reason, n in e.evictions.items():
            evictions[reason] = evictions.get(reason, 0) + n
    # Its last request, else its last load (as a single server's row says).
    last = usage.last_used_at_s
    if last is None:
        last = max((e.last_used_at_s for e in entries if e.last_used_at_s is not None),
                   default=None)
    weight = sum(n for _, n in timed)
    return {"loads": loads, "evictions": evictions,
            "avg_load_time_s": round(sum(t * n for t, n in timed) / weight, 3) if weight
            else None,
            "last_used_s_ago": None if last is None else round(now_s - last, 1)}
