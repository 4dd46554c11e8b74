"""The `groups:` section checked as a whole (called by configload.load_config's cross-checks, so at
`--check` and at every reload): names, members, policies that contradict each other, and a
`together` group whose configured footprints can never be resident at once.

`resolved(config)` is the one reading of the section: each group's members as model keys
(aliases resolved), used by these checks and by the engine (engine/groups.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .config import Config

TOGETHER, EXCLUSIVE = "together", "exclusive"


@dataclass(frozen=True)
class Memory:
    """Memory a together group may be resident in: the one machine's, or a fleet host's."""
    total_gb: float | None          # None: cannot be known here (the check is skipped)
    source: str                     # the keys that set it, for the message
    host: str | None = None         # a fleet host's name
    allows: Callable[[str], bool] = lambda key: True    # its models: patterns


@dataclass(frozen=True)
class Group:
    name: str
    policy: str
    members: tuple[str, ...]      # model keys, in the order given, aliases resolved


def resolved(config: "Config") -> tuple[Group, ...]:
    aliases = config.alias_map()
    out = []
    for g in config.groups:
        keys = tuple(dict.fromkeys(aliases.get(m, m) for m in g.members))
        out.append(Group(g.name, g.policy, keys))
    return tuple(out)


def group_problems(config: "Config", memories: list[Memory]) -> list[str]:
    """memories: where a group may be resident (one per fleet host; a together group's
    members load on one host, so one host must hold them all)."""
    problems: list[str] = []
    aliases = config.alias_map()
    names: dict[str, int] = {}
    together_of: dict[str, int] = {}          # model → the together group it is in
    for i, g in enumerate(config.groups):
        path = f"groups[{i}]"
        if not g.name:
            problems.append(f"{path}.name: required (it names the group in events and rows)")
        elif g.name in names:
            problems.append(f"{path}.name: '{g.name}' is also the name of groups"
                            f"[{names[g.name]}]")
        else:
            names[g.name] = i
        seen: dict[str, str] = {}
        for j, member in enumerate(g.members):
            key = aliases.get(member, member)
            if not member:
                problems.append(f"{path}.members[{j}]: empty model name")
            elif key in seen:
                same = f" ('{seen[key]}' and '{member}' name the same model)" \
                    if seen[key] != member else ""
                problems.append(f"{path}.members[{j}]: '{member}' is listed twice{same}")
            seen.setdefault(key, member)
        if len(seen) < 2:
            problems.append(f"{path}.members: a group needs at least two models "
                            f"(got {len(seen)})")
        if g.policy == TOGETHER:
            for key in seen:
                if key in together_of:
                    problems.append(
                        f"{path}.members: '{key}' is already in the together group "
                        f"groups[{together_of[key]}]; a model is in at most one together "
                        f"group (merge the two)")
                together_of.setdefault(key, i)
    problems += _contradictions(config, aliases)
    problems += _never_together(config, memories)
    return problems


def _contradictions(config: "Config", aliases: dict[str, str]) -> list[str]:
    """Two models that one group keeps together and another keeps apart."""
    out = []
    groups = config.groups
    for i, g in enumerate(groups):
        if g.policy != EXCLUSIVE:
            continue
        apart = {aliases.get(m, m) for m in g.members}
        for j, h in enumerate(groups):
            if h.policy != TOGETHER:
                continue
            both = sorted(apart & {aliases.get(m, m) for m in h.members})
            if len(both) >= 2:
                out.append(f"groups[{i}].members: {', '.join(repr(k) for k in both)} are "
                           f"kept apart here (exclusive) and together by groups[{j}] "
                           f"('{h.name}'): they cannot be both")
    return out


def _never_together(config: "Config", memories: list[Memory]) -> list[str]:
    """A together group whose configured footprints add up to more than the memory the
    models may take at once (the ceiling of one model: the headroom of an empty machine) on
    every host that may hold all of them, or that no host may hold whole."""
    out = []
    for i, g in enumerate(resolved(config)):
        known = [(k, config.models[k].footprint_gb) for k in g.members
                 if k in config.models and config.models[k].footprint_gb is not None]
        if g.policy != TOGETHER:
            continue
        may = [m for m in memories if all(m.allows(k) for k in g.members)]
        if not may:
            out.append(f"groups[{i}]: '{g.name}' can never be resident at once: no host's "
                       f"upstreams[].models patterns allow all of its members; change those, "
                       f"or make it exclusive")
            continue
        if len(known) < 2 or any(m.total_gb is None for m in may):
            continue
        total = sum(gb for _, gb in known)
        ceilings = [(m, ceiling_gb(config, m.total_gb)) for m in may]
        if all(total > gb for _, gb in ceilings):
            parts = " + ".join(f"{k} {gb:g}" for k, gb in known)
            where = ", ".join(f"{'' if m.host is None else f'on {m.host!r}: '}{gb:.1f} GB of "
                              f"{m.total_gb:.1f} GB ({m.source})" for m, gb in ceilings)
            out.append(
                f"groups[{i}]: '{g.name}' can never be resident at once: its members' "
                f"models.<key>.footprint_gb add up to {total:g} GB ({parts}), more than "
                f"models may take at once, {where}; make it exclusive, or change those "
                f"(models' share: memory.max_memory_usage_percent, memory.min_free_memory_gb)")
    return out


def ceiling_gb(config: "Config", total_gb: float) -> float:
    """The most models may take of total_gb at once (the headroom of an empty machine)."""
    mem = config.memory
    return min(total_gb - mem.min_free_memory_gb, total_gb * mem.max_memory_usage_percent / 100.0)
