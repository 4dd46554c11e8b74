"""Fakes of the project's Protocols (never of its classes)."""
from __future__ import annotations

from typing import Any, Mapping

from proxy.engine.memory import MemorySample
from proxy.errors import ModelLoadFailed
from proxy.upstream.base import ApiLevel, Capabilities, LoadResult, UpstreamModel

GB = 1_000_000_000


class SettableSampler:
    """A MemorySampler whose readings the test sets."""
    blocking = False
    local = False

    def __init__(self, total_gb: float = 32.0, available_gb: float = 32.0) -> None:
        self.total_bytes = int(total_gb * GB)
        self.available_bytes = int(available_gb * GB)

    def set_available(self, gb: float) -> None:
        self.available_bytes = int(gb * GB)

    def sample(self) -> MemorySample:
        return MemorySample(self.total_bytes, self.available_bytes)


class ScriptedBackend:
    """A ModelBackend with the capabilities a test declares. Beyond `max_loaded` models a load
    drops the least recently loaded one by itself (as llama.cpp's router and Ollama do), even
    when the load then fails (a key in `broken`); `memory_gb` is what it reports as resident."""

    def __init__(self, sizes_gb: dict[str, float], capabilities: Capabilities, *,
                 max_loaded: int = 0, memory_gb: dict[str, float] | None = None,
                 broken: frozenset[str] = frozenset()) -> None:
        self.sizes_gb = sizes_gb
        self.capabilities = capabilities
        self.max_loaded = max_loaded
        self.memory_gb = memory_gb or {}
        self.broken = broken
        self.loaded: list[str] = []
        self.loads: list[str] = []

    async def detect(self) -> ApiLevel:
        return ApiLevel.MANAGED if self.capabilities.manages_loading else ApiLevel.JIT_ONLY

    async def list_models(self) -> list[UpstreamModel]:
        return [UpstreamModel(key=k, size_bytes=int(gb * GB),
                              instance_ids=(k,) if k in self.loaded else (),
                              memory_bytes=int(self.memory_gb[k] * GB)
                              if k in self.loaded and k in self.memory_gb else None)
                for k, gb in self.sizes_gb.items()]

    async def load(self, key: str, options: Mapping[str, Any]) -> LoadResult:
        self.loads.append(key)
        if self.max_loaded and len(self.loaded) >= self.max_loaded:
            self.loaded.pop(0)
        if key in self.broken:
            raise ModelLoadFailed(f"'{key}' failed to load (exit code 1)")
        self.loaded.append(key)
        return LoadResult(key)

    async def unload(self, instance_id: str) -> None:
        if instance_id in self.loaded:
            self.loaded.remove(instance_id)
