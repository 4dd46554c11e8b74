"""The registry: every model the engine knows, by key, with its aliases and runtime overrides.

It answers "which model is this name", "how much memory does it take", "what is its priority,
is it pinned, what is its idle timeout" — the per-model facts every other part reads. Config is
swappable at run time (`apply_config`) without touching the entries.
"""
from __future__ import annotations

import difflib
from collections import Counter
from typing import Iterator

from ..config import Config
from ..errors import ModelNotFound, clip
from ..liveconfig import LiveConfig
from .lifecycle import ModelEntry, ModelStatus
from .memory import GB

S = ModelStatus
DEFAULT_FOOTPRINT_BYTES = 4 * GB   # a model whose size nobody reported
# Close-match suggestions: bounded in cost whatever a client sends.
SUGGEST_MAX_NAME_CHARS = 128
SUGGEST_MAX_CANDIDATES = 2000
# A suggestion shares a run of this many characters with the name asked for (or all of a
# shorter name): 'fasd' → 'fast', never 'nope' → 'broken', whose scattered 'o' and 'e' alone
# pass difflib's ratio.
SUGGEST_MIN_SHARED_CHARS = 3
ECHO_MAX_CHARS = 80


class Registry:
    def __init__(self, live: LiveConfig) -> None:
        self.entries: dict[str, ModelEntry] = {}
        self.priority_override: dict[str, int] = {}
        self.pin_override: dict[str, bool] = {}
        self.clients: Counter[str] = Counter()   # SDK client (owner) → its open connections
        self.live = live
        # Names the server itself takes for a model (Ollama's `llama3.2` for llama3.2:latest).
        self.upstream_aliases: dict[str, str] = {}

    @property
    def config(self) -> Config:
        return self.live.current

    @property
    def aliases(self) -> dict[str, str]:
        return self.live.aliases

    # -- lookup ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, name: str) -> ModelEntry | None:
        """The entry a name (key or alias) refers to, if known; the request path's lookup."""
        return self.entries.get(self.aliases.get(name, name))

    def key_of(self, name: str) -> str | None:
        key = self.aliases.get(name, name)
        if key in self.entries:
            return key
        for e in self.entries.values():
            if key in e.instance_ids:
                return e.key
        key = self.upstream_aliases.get(name)
        return key if key in self.entries else None

    def loaded_as(self, name: str) -> str | None:
        """The model a native client's identifier reaches: LM Studio resolves a loaded
        instance's identifier before a model key, so an instance loaded under another model's
        key answers for that key."""
        for e in self.entries.values():
            if name in e.instance_ids:
                return e.key
        return self.key_of(name)

    def ensure(self, key: str) -> tuple[ModelEntry, bool]:
        """The entry for key, created if new (True)."""
        e = self.entries.get(key)
        if e is not None:
            return e, False
        e = self.entries[key] = ModelEntry(key)
        return e, True

    def keys(self) -> list[str]:
        return sorted(self.entries)

    def loaded(self) -> list[str]:
        return sorted(k for k, e in self.entries.items() if e.status is S.LOADED)

    def suggestions(self, name: str, n: int = 3) -> list[str]:
        if len(name) > SUGGEST_MAX_NAME_CHARS:
            return []
        names = (list(self.entries) + list(self.aliases))[:SUGGEST_MAX_CANDIDATES]
        shared = min(SUGGEST_MIN_SHARED_CHARS, len(name))
        close = difflib.get_close_matches(name, names, n=max(1, len(names)), cutoff=0.4)
        return [c for c in close if difflib.SequenceMatcher(
            None, name, c).find_longest_match().size >= shared][:n]

    def not_found(self, name: str) -> ModelNotFound:
        """The error for a name no known model answers to, naming the closest ones."""
        close = self.suggestions(name)
        hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""
        return ModelNotFound(f"The model '{clip(name, ECHO_MAX_CHARS)}' does not exist.{hint}",
                             param="model")

    # -- per-model facts ---------------------------------------------------------------------
    def priority(self, key: str) -> int:
        return self.priority_override.get(key) or self.config.model(key).priority

    def pinned(self, key: str) -> bool:
        override = self.pin_override.get(key)
        return self.config.model(key).pinned if override is None else override

    def ttl_s(self, key: str) -> float:
        """Idle timeout; 0 means never."""
        cfg = self.config.model(key)
        if cfg.ttl_s is not None:
            return cfg.ttl_s
        return self.config.eviction.model_timeout_hours * 3600.0

    def configured_footprint_bytes(self, key: str) -> float | None:
        override = self.config.model(key).footprint_gb
        return None if override is None else override * GB

    def footprint_bytes(self, e: ModelEntry) -> float:
        """At a context fit chose (engine/fit.py) while it is loaded with it; else configured,
        else reported by the server, else learned, else estimated from the file size; never
        below what the server refused to load it in."""
        if e.fit_bytes is not None:
            return e.fit_bytes
        return self.configured_options_bytes(e)

    def configured_options_bytes(self, e: ModelEntry) -> float:
        """Its footprint when loaded with its configured options (its configured context)."""
        stated, floor = self._stated_footprint_bytes(e), e.footprint_floor_bytes
        return stated if floor is None else max(stated, floor)

    def _stated_footprint_bytes(self, e: ModelEntry) -> float:
        configured = self.configured_footprint_bytes(e.key)
        if configured is not None:
            return configured
        if e.reported_bytes is not None:
            return e.reported_bytes
        if e.footprint_bytes is not None:
            return e.footprint_bytes
        if e.size_bytes:
            return e.size_bytes * self.config.memory.footprint_factor
        return DEFAULT_FOOTPRINT_BYTES

    def footprint_floor_bytes(self, e: ModelEntry) -> float | None:
        """The memory the server refused to load e in, while no configured or measured
        footprint above it has revised it: e is known to fail in that much."""
        floor = e.footprint_floor_bytes
        if floor is None or self._stated_footprint_bytes(e) > floor:
            return None
        return floor

    def footprint_source(self, e: ModelEntry) -> str:
        if e.fit_bytes is not None:
            return "fitted"
        if self.footprint_floor_bytes(e) is not None:
            return "refused"
        if self.config.model(e.key).footprint_gb is not None:
            return "configured"
        if e.reported_bytes is not None:
            return "reported"
        if e.footprint_bytes is None:
            return "estimated"
        # Another replica's measurement is adopted with no sample of this one's
        # (engine/shared_learned.py); the first load measured here makes it "learned".
        return "learned" if e.footprint_samples else "shared"

    def reload_s(self, e: ModelEntry) -> float:
        """Expected seconds to load e again: learned, else about a second per GB."""
        return e.load_time_s if e.load_time_s is not None else self.footprint_bytes(e) / GB

    def held_bytes(self, e: ModelEntry) -> float:
        """What e holds while loaded: a footprint per instance (an SDK client through the
        proxy may load extra instances of a model, `key:2` and on, each as large)."""
        return self.footprint_bytes(e) * max(1, len(e.instance_ids))

    def charged_bytes(self) -> float:
        """Memory the models we know of hold or are about to hold (the budget sampler's view)."""
        return sum(self.held_bytes(e) for e in self.entries.values()
                   if e.status in (S.LOADED, S.UNLOADING)
                   or (e.status is S.LOADING and e.room_refused is None))

    def loading_bytes(self) -> float:
        return sum(self.footprint_bytes(e) for e in self.entries.values()
                   if e.status is S.LOADING and e.room_refused is None)
