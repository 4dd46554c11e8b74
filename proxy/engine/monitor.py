"""Memory as the engine sees it: samples, the pressure level, and how much a load may take.

`headroom(sample)` is the one rule for "may a load of N bytes start now": it keeps
`min_free_memory_gb` free and usage under `max_memory_usage_percent`. `ceiling_bytes(sample)` is
the same rule with nothing of ours resident: a model above it can never load, however long it
waits.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from ..config import Config
from ..liveconfig import LiveConfig
from .listeners import Listeners
from .memory import (GB, BudgetSampler, MemoryPressure, MemorySample, MemorySampler,
                     PressureGauge)

log = logging.getLogger("proxy.engine")


class MemoryMonitor:
    def __init__(self, live: LiveConfig, sampler: MemorySampler, listeners: Listeners, *,
                 reserved_bytes: Callable[[], float],
                 managed: Callable[[], bool] = lambda: True) -> None:
        self.sampler = sampler
        # False where the proxy does not manage memory (a server it cannot load on): a level
        # there is no one's to act on, so the log says none.
        self._managed = managed
        self._told = False     # the first level, logged once memory is managed
        self.listeners = listeners
        self._reserved = reserved_bytes       # loads in flight not yet seen by the sampler
        self.last_sample: MemorySample | None = None
        self.changes = 0     # loads and unloads finished: a footprint is learned only alone
        self._soon: set[asyncio.Task] = set()
        self.live = live
        mem = live.current.memory
        self.gauge = PressureGauge(mem.max_memory_usage_percent, mem.min_free_memory_gb * GB)
        live.on_swap(self._swapped)

    def _swapped(self, old: Config, new: Config) -> None:
        # The gauge keeps its level (and so its hysteresis); only its thresholds move.
        self.gauge.max_usage_percent = new.memory.max_memory_usage_percent
        self.gauge.min_free_bytes = new.memory.min_free_memory_gb * GB
        if isinstance(self.sampler, BudgetSampler) and new.memory.budget_gb is not None:
            self.sampler.budget_bytes = int(new.memory.budget_gb * GB)
        if old.memory != new.memory and self.last_sample is not None:
            # Judged again now, not at the next sample (up to monitoring_interval away): a
            # budget is sampled at once (no I/O); this machine's memory is judged on its last
            # sample against the new limits, and its owner (the engine) samples it soon.
            self._judge(self.sampler.sample() if not self.sampler.blocking
                        else self.last_sample)

    @property
    def min_free_bytes(self) -> float:
        return self.live.current.memory.min_free_memory_gb * GB

    @property
    def max_usage_fraction(self) -> float:
        return self.live.current.memory.max_memory_usage_percent / 100.0

    @property
    def level(self) -> MemoryPressure:
        return self.gauge.level

    async def sample(self) -> MemorySample:
        if self.sampler.blocking:
            s = await asyncio.to_thread(self.sampler.sample)
        else:
            s = self.sampler.sample()
        self._judge(s)
        return s

    def _judge(self, s: MemorySample) -> None:
        """Take `s` as the latest sample: the pressure level from it, logged and told."""
        self.last_sample = s
        old = self.gauge.level
        new = self.gauge.update(s)
        if self._managed():
            self._log_level(old, new, s)
        if new is not old:
            self.listeners.emit("on_pressure", new)
        self.listeners.emit("on_memory", s, new.value)

    def _log_level(self, old: MemoryPressure, new: MemoryPressure, s: MemorySample) -> None:
        if not self._told:   # the gauge's starting level was a guess, not a level memory was at
            self._told = True
            log.info("memory pressure %s (%.0f%% used, %.1f GB free)", new.value,
                     s.used_percent, s.available_bytes / GB)
        elif new is not old:
            # A warning only on the way up into high or critical: low → normal is no alarm.
            worse = new.rank > old.rank and new.rank >= MemoryPressure.HIGH.rank
            log.log(logging.WARNING if worse else logging.INFO,
                    "memory pressure %s → %s (%.0f%% used, %.1f GB free)", old.value,
                    new.value, s.used_percent, s.available_bytes / GB)

    def sample_soon(self) -> None:
        """Sample for a caller that cannot wait (a load reported by a callback)."""
        task = asyncio.create_task(self.sample(), name="memory-sample")
        self._soon.add(task)
        task.add_done_callback(self._sampled)

    def _sampled(self, task: asyncio.Task) -> None:
        self._soon.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("sampling memory failed: %r", task.exception())

    def headroom(self, s: MemorySample) -> float:
        """Bytes a new load may take now."""
        reserved = self._reserved() if self.sampler.local else 0.0
        available = s.available_bytes - reserved
        by_free = available - self.min_free_bytes
        by_ceiling = s.total_bytes * self.max_usage_fraction - (s.total_bytes - available)
        return min(by_free, by_ceiling)

    def ceiling_bytes(self, s: MemorySample) -> float:
        """The most any one model may take: the headroom of an empty machine."""
        return min(s.total_bytes - self.min_free_bytes, s.total_bytes * self.max_usage_fraction)

    def binding_limit(self, s: MemorySample) -> str:
        """The config key that sets the ceiling, for messages that say what to change."""
        if s.total_bytes - self.min_free_bytes < s.total_bytes * self.max_usage_fraction:
            return "memory.min_free_memory_gb"
        return "memory.max_memory_usage_percent"
