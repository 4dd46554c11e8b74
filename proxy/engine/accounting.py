"""Accounting: per-model statistics, and what of the engine's knowledge survives a restart.

Persisted (through `store.UsageStore`, off the event loop, in batches):
- per-minute usage history and per-model statistics snapshots (with the last use and the
  evictions by reason); the latest WINDOW_MINUTES of the history refill the per-minute rates;
- learned footprints, their lower bounds (from out-of-memory refusals) and load times, keyed
  by upstream identity (URL | model key | load options), so that what a demo's emulator taught
  is never applied to a real LM Studio;
- the instances this proxy loaded, so that a restarted proxy still owns them. These are
  committed at once (`commit_ownership`), not with the batch: a crash moments after a load
  must not turn the proxy's model into someone else's;
- the usage patterns the engine learned (engine.learning).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from ..urls import redact_url
from ..store import UsageStore
from .clock import Clock
from .learner import UsageLearner
from .learning import ModelPattern
from .lifecycle import ModelEntry
from .listeners import Listeners
from .registry import Registry
from .usage import WINDOW_MINUTES, ModelUsage, RequestRecord, replay_minutes
from .usage import restore as restore_usage
from .usage import snapshot as snapshot_usage

log = logging.getLogger("proxy.engine")


def footprint_identity(upstream_url: str, key: str, load_options: Any) -> str:
    return f"{upstream_url}|{key}|{orjson.dumps(load_options, option=orjson.OPT_SORT_KEYS).decode()}"


class Accounting:
    def __init__(self, registry: Registry, clock: Clock, listeners: Listeners,
                 store: UsageStore | None, learner: UsageLearner) -> None:
        self.learner = learner
        self.registry = registry
        self.clock = clock
        self.listeners = listeners
        self.store = store
        self.usage: dict[str, ModelUsage] = {}
        # instance id → {"model", "load_config", "loaded_at"}: what this proxy loaded
        self.owned_instances: dict[str, dict[str, Any]] = {}
        self._pending_minutes: dict[tuple[str, int], list[float]] = {}
        self._dirty_stats: set[str] = set()
        self._dirty_footprints: set[str] = set()
        self._owned_add: dict[str, dict[str, Any]] = {}
        self._owned_remove: set[str] = set()
        self._restored_footprints: dict[str, dict[str, Any]] = {}
        self._load_times_v1: dict[str, dict[str, Any]] = {}   # model → load_time_s, load_count
        self._restored_evictions: dict[str, dict[str, int]] = {}   # model → reason → count
        self._store_generation = 0   # the store's fresh file this process wrote all it holds to

    @property
    def _upstream_url(self) -> str:
        """What the history is filed under: the upstream as shown, never its credentials."""
        return redact_url(self.registry.config.upstream.url)

    # -- requests ----------------------------------------------------------------------------
    def record(self, r: RequestRecord) -> None:
        """Account a finished request; names that are not known models are not kept."""
        usage = self.usage.get(r.model)
        if usage is None and r.model in self.registry.entries:
            usage = self.usage[r.model] = ModelUsage()
        if usage is not None:
            usage.record(r)
            if self.store is not None:
                minute_key = (r.model, int(self.clock.wall() // 60))
                slot = self._pending_minutes.get(minute_key)
                if slot is None:
                    slot = self._pending_minutes[minute_key] = [0, 0, 0, 0, 0.0]
                slot[0] += 1
                slot[1] += r.failed
                slot[2] += r.prompt_tokens
                slot[3] += r.completion_tokens
                slot[4] += r.latency_s
                self._dirty_stats.add(r.model)
        for hook in self.listeners.on_request:
            try:
                hook(r)
            except Exception:
                log.exception("listener %r failed on on_request; ignored", hook)

    def usage_of(self, key: str) -> ModelUsage:
        return self.usage.get(key) or _EMPTY_USAGE

    # -- learned facts -----------------------------------------------------------------------
    def identity(self, key: str) -> str:
        return footprint_identity(self._upstream_url, key,
                                  dict(self.registry.config.model(key).load))

    def footprint_changed(self, e: ModelEntry) -> None:
        self._dirty_footprints.add(e.key)

    def evicted(self, e: ModelEntry) -> None:
        """e.evictions changed: they are part of its statistics snapshot."""
        if self.store is not None:
            self._dirty_stats.add(e.key)

    def apply_learned(self, e: ModelEntry) -> None:
        """Give a newly seen entry what an earlier process learned about it here."""
        evictions = self._restored_evictions.pop(e.key, None)
        if evictions:
            e.evictions.update(evictions)
        saved = self._restored_footprints.pop(self.identity(e.key), None)
        legacy = self._load_times_v1.pop(e.key, None)
        if saved is not None:
            e.footprint_bytes, e.footprint_samples = saved["footprint_bytes"], saved["samples"]
            e.load_time_s, e.load_count = saved["load_time_s"], saved["load_count"]
            e.footprint_floor_bytes = saved.get("footprint_floor_bytes")
        elif legacy is not None:   # a version 1 file's, by model key: written under identity
            e.load_time_s, e.load_count = legacy["load_time_s"], legacy["load_count"]
            self._dirty_footprints.add(e.key)

    # -- ownership ---------------------------------------------------------------------------
    def remember_owned(self, e: ModelEntry, instance_id: str, load_config: dict) -> None:
        record = {"model": e.key, "load_config": load_config, "loaded_at": self.clock.wall()}
        self.owned_instances[instance_id] = record
        self._owned_add[instance_id] = record
        self._owned_remove.discard(instance_id)

    def forget_owned(self, instance_ids: tuple[str, ...]) -> None:
        for i in instance_ids:
            if self.owned_instances.pop(i, None) is not None:
                self._owned_add.pop(i, None)
                self._owned_remove.add(i)

    async def commit_ownership(self) -> None:
        """Write the ownership changes not yet written, now and in their own transaction.
        A failed write keeps them for the next flush."""
        if self.store is None or self.store._db is None or \
                not (self._owned_add or self._owned_remove):
            return
        owned_add, self._owned_add = self._owned_add, {}
        owned_remove, self._owned_remove = self._owned_remove, set()
        if not await asyncio.to_thread(self.store.write_owned, self._upstream_url,
                                       owned_add, owned_remove):
            self._keep_ownership(owned_add, owned_remove)

    def _keep_ownership(self, owned_add: dict[str, dict[str, Any]],
                        owned_remove: set[str]) -> None:
        """A write failed: merge what it held under what changed since (newer wins)."""
        older = {i: o for i, o in owned_add.items() if i not in self._owned_remove}
        self._owned_add = {**older, **self._owned_add}
        self._owned_remove |= owned_remove - set(self._owned_add)

    def owns(self, key: str, instance_ids: tuple[str, ...]) -> bool:
        """True when every listed instance of key is one this proxy loaded."""
        return bool(instance_ids) and all(
            self.owned_instances.get(i, {}).get("model") == key for i in instance_ids)

    # -- persistence -------------------------------------------------------------------------
    async def open(self) -> None:
        if self.store is None or self.store._db is not None or self.store.error is not None:
            return
        if await asyncio.to_thread(self.store.open):
            since_minute = int(self.clock.wall() // 60) - WINDOW_MINUTES
            self._restore(await asyncio.to_thread(self.store.load, self._upstream_url,
                                                  since_minute))
        self._store_generation = self.store.generation   # nothing was held before

    def _restore(self, state: dict[str, Any]) -> None:
        now_s, wall_s = self.clock.now(), self.clock.wall()
        minutes = state.get("minutes", {})
        for key, snap in state["stats"].items():
            try:   # a row of the right type with wrong contents: skipped like a damaged one
                usage = restore_usage(snap, now_s, wall_s)
                replay_minutes(usage, minutes.get(key, []), now_s, wall_s)
                evictions = snap.get("evictions")
                if isinstance(evictions, dict):
                    self._restored_evictions[key] = {str(k): int(v)
                                                     for k, v in evictions.items()}
            except (TypeError, ValueError, KeyError, AttributeError) as exc:
                self._skipped_row("model_stats", key, exc)
                continue
            self.usage[key] = usage
        self._restored_footprints = state["footprints"]
        self._load_times_v1 = dict(state.get("load_times_v1", {}))
        self.owned_instances.update(state.get("owned", {}))
        for key, snap in state.get("patterns", {}).items():
            try:
                self.learner.patterns[key] = ModelPattern.restore(snap, self.clock.now(),
                                                                  self.clock.wall())
            except (TypeError, ValueError, KeyError, AttributeError) as exc:
                self._skipped_row("patterns", key, exc)
        for e in self.registry:
            self.apply_learned(e)
        log.info("restored statistics of %d models and %d owned instances from %s",
                 len(state["stats"]), len(state.get("owned", {})),
                 self.store.path if self.store else "?")

    def _skipped_row(self, table: str, key: str, exc: Exception) -> None:
        if self.store is not None:
            self.store.note_skipped(table, key, f"does not restore: {type(exc).__name__}: {exc}")

    def _all_dirty(self) -> None:
        """The store started a fresh file in place of a damaged one: all that is held in
        memory goes into it, not only what changed since the last flush."""
        self._dirty_stats |= set(self.usage) | set(self._restored_evictions)
        self._dirty_footprints |= {e.key for e in self.registry
                                   if e.footprint_bytes is not None or e.load_count
                                   or e.footprint_floor_bytes is not None}
        self._owned_add = {**self.owned_instances, **self._owned_add}
        self.learner.dirty |= set(self.learner.patterns)

    async def flush(self) -> None:
        """Write what changed since the last flush, off the event loop, in one transaction."""
        if self.store is None or self.store._db is None:
            return
        if self.store.generation != self._store_generation:
            self._store_generation = self.store.generation
            self._all_dirty()
        if not (self._pending_minutes or self._dirty_stats or self._dirty_footprints
                or self._owned_add or self._owned_remove or self.learner.dirty):
            return
        dirty_patterns, self.learner.dirty = self.learner.dirty, set()
        patterns = {k: self.learner.patterns[k].snapshot(self.clock.now(), self.clock.wall())
                    for k in dirty_patterns if k in self.learner.patterns}
        minutes, self._pending_minutes = self._pending_minutes, {}
        stats = {k: self._stats_snapshot(k) for k in self._dirty_stats}
        footprints = {self.identity(k): {"footprint_bytes": e.footprint_bytes,
                                         "samples": e.footprint_samples,
                                         "load_time_s": e.load_time_s,
                                         "load_count": e.load_count,
                                         "footprint_floor_bytes": e.footprint_floor_bytes}
                      for k in self._dirty_footprints if (e := self.registry.entries.get(k))}
        owned_add, self._owned_add = self._owned_add, {}
        owned_remove, self._owned_remove = self._owned_remove, set()
        dirty_stats, self._dirty_stats = self._dirty_stats, set()
        dirty_footprints, self._dirty_footprints = self._dirty_footprints, set()
        written = await asyncio.to_thread(
            self.store.write, minutes, stats, footprints, int(self.clock.wall() // 60),
            upstream=self._upstream_url, owned_add=owned_add, owned_remove=owned_remove,
            patterns=patterns)
        if not written:   # kept for the next flush: a failed write loses nothing
            for minute_key, slot in minutes.items():
                mine = self._pending_minutes.setdefault(minute_key, [0, 0, 0, 0, 0.0])
                for i, v in enumerate(slot):
                    mine[i] += v
            self._dirty_stats |= dirty_stats
            self._dirty_footprints |= dirty_footprints
            self._keep_ownership(owned_add, owned_remove)
            self.learner.dirty |= dirty_patterns

    def _stats_snapshot(self, key: str) -> dict[str, Any]:
        out = snapshot_usage(self.usage.get(key) or _EMPTY_USAGE, self.clock.now(),
                             self.clock.wall())
        e = self.registry.entries.get(key)
        # Not seen since the restart: what was restored for it, not nothing.
        out["evictions"] = dict(e.evictions) if e is not None else \
            self._restored_evictions.get(key, {})
        return out

    async def close(self) -> None:
        if self.store is not None:
            await self.flush()
            await asyncio.to_thread(self.store.close)


_EMPTY_USAGE = ModelUsage()
