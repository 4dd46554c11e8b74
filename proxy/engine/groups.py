"""Model groups (config `groups:`): models that live and leave together, or never together.

    together   a request for one member queues loads of the others, best effort: through the
               preload path, into free memory only (never evicting), at most once per
               GROUP_RETRY_S per member. The policy sees the idle members as one candidate
               (sizes, reload times and rates added up, recency and priority the unit's
               highest) and evicts them together; the unit's idle timeout counts from its
               last use. While any member serves (a USE lease), no member is a victim.
    exclusive  at most one member resident: before a member loads, the others are unloaded,
               each once drained — a generation is never cut. One that is serving (or loading,
               or inside its residency) makes the load wait, up to eviction.queue_timeout_s,
               and the refusal names the group; one that will not go by itself (pinned, not
               the proxy's) refuses it at once. A preload never unloads a member.

Loads and evictions a group causes carry the reason `group:<name>` (on_preload, on_evict).
The hooks: the preloader calls `to_load_with`; the evictor `partner_serving`, `units` and
`rider_reason`; the scheduler `exclusive_turn` before it admits a load and `refusal` when one
times out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ..config import Config
from ..errors import GroupBusy, ProxyError, clip
from ..groupcheck import EXCLUSIVE, TOGETHER, Group, resolved
from .context import EngineContext, Part
from .lifecycle import ModelEntry, ModelStatus
from .memory import GB
from .policy import TEMPORARY, Candidate
from .registry import ECHO_MAX_CHARS

if TYPE_CHECKING:
    from .eviction import Evictor

S = ModelStatus
GROUP_RETRY_S = 10.0      # a together partner that did not fit is queued again after this
RESIDENT = (S.LOADED, S.LOADING, S.UNLOADING)
# exclusive_turn's answers besides None (nothing in the way) and a refusal
CLEARED, WAIT, DROP = "cleared", "wait", "drop"


@dataclass(frozen=True)
class GroupIndex:
    """The groups by member: built once per configuration (a live view)."""
    together: dict[str, Group] = field(default_factory=dict)
    exclusive: dict[str, tuple[Group, ...]] = field(default_factory=dict)
    of_model: dict[str, tuple[Group, ...]] = field(default_factory=dict)

    @staticmethod
    def of(config: Config) -> "GroupIndex":
        idx = GroupIndex()
        for g in resolved(config):
            for key in g.members:
                idx.of_model[key] = idx.of_model.get(key, ()) + (g,)
                if g.policy == TOGETHER:
                    idx.together.setdefault(key, g)
                elif g.policy == EXCLUSIVE:
                    idx.exclusive[key] = idx.exclusive.get(key, ()) + (g,)
        return idx


class Groups(Part):
    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx)
        self._index = ctx.registry.live.derive(GroupIndex.of)
        self._queued_at: dict[str, float] = {}

    @property
    def index(self) -> GroupIndex:
        return self._index.value

    def row(self, key: str) -> list[dict[str, Any]]:
        """The groups a model is in, for its row on /proxy/models."""
        return [{"name": g.name, "policy": g.policy, "members": list(g.members)}
                for g in self.index.of_model.get(key, ())]

    def _partners(self, g: Group, key: str) -> Iterator[ModelEntry]:
        for k in g.members:
            e = self.registry.entries.get(k)
            if k != key and e is not None:
                yield e

    # -- together ----------------------------------------------------------------------------
    def to_load_with(self, key: str) -> Sequence[tuple[str, str]]:
        """A request for key arrived: its together partners that are not loaded, each with the
        reason to give its load (`group:<name>`). Cheap for a model in no group: no frame for
        `self.index`, no list made."""
        g = self._index.value.together.get(key)
        if g is None:
            return ()
        now = self.clock.now()
        out = []
        for e in self._partners(g, key):
            if e.status is S.UNLOADED and now - self._queued_at.get(e.key, -GROUP_RETRY_S) \
                    >= GROUP_RETRY_S:
                self._queued_at[e.key] = now
                out.append((e.key, f"group:{g.name}"))
        return out

    def partner_serving(self, e: ModelEntry) -> bool:
        """Does another member of e's together group serve a request now?"""
        g = self.index.together.get(e.key)
        return g is not None and any(p.leases for p in self._partners(g, e.key))

    def units(self, candidates: list[Candidate], spare: str | None = None
              ) -> tuple[list[Candidate], dict[str, tuple[str, ...]]]:
        """Candidates with each together group's members merged into one, which the first of
        them stands for; and for each such one, the others that go with it. Members of
        `spare`'s group (a model about to load) are left out."""
        idx = self.index
        if not idx.together:
            return candidates, {}
        spared = idx.together.get(spare) if spare is not None else None
        out: list[Candidate] = []
        grouped: dict[str, list[Candidate]] = {}
        for c in candidates:
            g = idx.together.get(c.key)
            if g is None:
                out.append(c)
            elif g is not spared:
                grouped.setdefault(g.name, []).append(c)
        riders = {}
        for members in grouped.values():
            out.append(_merged(members))
            riders[members[0].key] = tuple(c.key for c in members[1:])
        return out, riders

    def rider_reason(self, key: str, gone: set[str]) -> str | None:
        """`group:<name>` when key goes because a member of its together group just went."""
        g = self.index.together.get(key)
        if g is not None and any(k in gone for k in g.members if k != key):
            return f"group:{g.name}"
        return None

    def last_used_s(self, e: ModelEntry) -> float | None:
        """The last use of e's together group, loaded members only (e's own without one)."""
        g = self.index.together.get(e.key)
        times = [m.last_used_at_s or m.loaded_at_s for m in
                 [e, *(p for p in self._partners(g, e.key) if p.status is S.LOADED)]] \
            if g is not None else [e.last_used_at_s or e.loaded_at_s]
        known = [t for t in times if t is not None]
        return max(known) if known else None

    # -- exclusive ---------------------------------------------------------------------------
    def _resident_rivals(self, key: str) -> list[tuple[ModelEntry, Group]]:
        return [(p, g) for g in self.index.exclusive.get(key, ())
                for p in self._partners(g, key) if p.status in RESIDENT]

    async def exclusive_turn(self, e: ModelEntry, evictor: "Evictor", *, speculative: bool,
                             waited_s: float) -> str | ProxyError | None:
        """Before e loads: unload its exclusive partners that are idle (`group:<name>`, for e).
        None: none was resident; CLEARED: unloaded them all; WAIT: one is loading, unloading
        or kept for a while (serving, in its residency); DROP: a preload, which never unloads
        a member; or the refusal when one is kept for good (pinned, not the proxy's)."""
        rivals = self._resident_rivals(e.key)
        if not rivals:
            return None
        if speculative:
            return DROP
        for p, g in rivals:
            if p.status is not S.LOADED:
                return WAIT
            why = evictor.why_kept(p, critical=False, requester_waited_s=waited_s)
            if why is None:
                if not await evictor.unload(p, f"group:{g.name}", e.key):
                    return WAIT           # a request took it meanwhile: it drains first
            elif why in TEMPORARY:
                return WAIT
            else:
                return self._refusal(e, p, g, why, retry_after_s=None)
        return CLEARED

    def refusal(self, e: ModelEntry, timeout_s: float) -> ProxyError | None:
        """Why e's wait ended without a load, when a member of an exclusive group of it is
        still there (None: something else held it up)."""
        for p, g in self._resident_rivals(e.key):
            why = ("loading" if p.status is S.LOADING else
                   "unloading" if p.status is S.UNLOADING else
                   f"serving {p.leases} request(s)" if p.leases else
                   f"held by {p.holds} probe(s) or read(s)" if p.holds else "still loaded")
            return self._refusal(e, p, g, f"{why} after {timeout_s:g}s "
                                 "(eviction.queue_timeout_s)",
                                 retry_after_s=max(1.0, min(30.0, timeout_s)))
        return None

    def _refusal(self, e: ModelEntry, p: ModelEntry, g: Group, why: str, *,
                 retry_after_s: float | None) -> GroupBusy:
        size = self.registry.footprint_bytes(p) / GB
        return GroupBusy(
            f"'{clip(e.key, ECHO_MAX_CHARS)}' is in the exclusive group '{g.name}' with "
            f"'{p.key}' ({size:.1f} GB), which is {why}: a member loads only once the others "
            f"are unloaded, and a generation is never cut.", retry_after_s=retry_after_s,
            final=retry_after_s is None)   # pinned or not the proxy's: it stays


def _merged(members: list[Candidate]) -> Candidate:
    """One candidate for a unit: what evicting all of it frees and costs."""
    if len(members) == 1:
        return members[0]
    return Candidate(
        key=members[0].key,
        footprint_bytes=sum(c.footprint_bytes for c in members),
        last_used_s=max(c.last_used_s for c in members),
        priority=max(c.priority for c in members),
        reload_s=sum(c.reload_s for c in members),
        rate_per_h=sum(c.rate_per_h for c in members),
        heat=sum(c.heat for c in members),
        p_reuse=max(c.p_reuse for c in members),
        p_due=max(c.p_due for c in members),
        own_wait_s=min(c.own_wait_s for c in members))
