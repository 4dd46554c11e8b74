"""Fakes of the project's Protocols (never of its classes)."""
from __future__ import annotations

from proxy.engine.memory import MemorySample

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
