"""Memory samplers behind one Protocol, and pressure levels with hysteresis.

- `PsutilSampler`: this host's memory (unified memory on Apple Silicon says everything).
- `NvmlSampler`: NVIDIA memory, when `nvidia-ml-py` is installed and a GPU answers; optional.
- `BudgetSampler`: a configured budget charged with the footprints of loaded models, for an
  LM Studio on another host where local memory says nothing.
Sampling may block (NVML, /proc), so the manager calls `sample()` through `asyncio.to_thread`
for local samplers.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from ..config import MemoryConfig

log = logging.getLogger("proxy.memory")
GB = 1_000_000_000


@dataclass(frozen=True)
class GpuSample:
    index: int
    name: str
    total_bytes: int
    used_bytes: int


@dataclass(frozen=True)
class MemorySample:
    total_bytes: int
    available_bytes: int
    gpus: tuple[GpuSample, ...] = ()

    @property
    def used_bytes(self) -> int:
        return self.total_bytes - self.available_bytes

    @property
    def used_percent(self) -> float:
        return 100.0 * self.used_bytes / self.total_bytes if self.total_bytes else 0.0


class MemorySampler(Protocol):
    blocking: bool   # True: sample() touches the OS and belongs off the event loop
    local: bool      # True: loads show up in this sampler as drops in available memory

    def sample(self) -> MemorySample: ...


class PsutilSampler:
    blocking = True
    local = True

    def __init__(self, gpu: "NvmlSampler | None" = None) -> None:
        import psutil
        self._vm = psutil.virtual_memory
        self.gpu = gpu

    def sample(self) -> MemorySample:
        vm = self._vm()
        gpus = self.gpu.sample_gpus() if self.gpu is not None else ()
        return MemorySample(vm.total, vm.available, gpus)


class NvmlSampler:
    """NVIDIA GPU memory via NVML; `create()` returns None when NVML or a GPU is absent."""

    def __init__(self, nvml: object, handles: list) -> None:
        self._nvml = nvml
        self._handles = handles

    @classmethod
    def create(cls) -> "NvmlSampler | None":
        try:
            import pynvml  # provided by the optional nvidia-ml-py extra
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                       for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as exc:  # NVMLError: no driver, no device
            log.info("NVML present but unusable (%s); GPU memory is not monitored", exc)
            return None
        return cls(pynvml, handles) if handles else None

    def sample_gpus(self) -> tuple[GpuSample, ...]:
        nv = self._nvml
        out = []
        for i, h in enumerate(self._handles):
            info = nv.nvmlDeviceGetMemoryInfo(h)
            name = nv.nvmlDeviceGetName(h)
            out.append(GpuSample(i, name.decode() if isinstance(name, bytes) else str(name),
                                 int(info.total), int(info.used)))
        return tuple(out)


class BudgetSampler:
    blocking = False
    local = False

    def __init__(self, budget_bytes: int, charged_bytes: Callable[[], float]) -> None:
        self.budget_bytes = budget_bytes
        self._charged = charged_bytes

    def sample(self) -> MemorySample:
        used = min(self.budget_bytes, int(self._charged()))
        return MemorySample(self.budget_bytes, self.budget_bytes - used)


class MemoryPressure(str, enum.Enum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {MemoryPressure.LOW: 0, MemoryPressure.NORMAL: 1, MemoryPressure.HIGH: 2,
         MemoryPressure.CRITICAL: 3}


class PressureGauge:
    """Maps samples to levels. Rising is immediate; falling needs `hysteresis_percent` of margin
    below the threshold, so a level does not flap around its boundary.

    high:     used ≥ max_usage_percent, or available < min_free
    critical: used ≥ halfway from max_usage_percent to 100, or available < min_free / 2
    low:      used < max_usage_percent − 25
    """

    def __init__(self, max_usage_percent: float, min_free_bytes: float,
                 hysteresis_percent: float = 3.0) -> None:
        self.max_usage_percent = max_usage_percent
        self.min_free_bytes = min_free_bytes
        self.hysteresis_percent = hysteresis_percent
        self.level = MemoryPressure.NORMAL

    def raw_level(self, s: MemorySample, margin_percent: float = 0.0) -> MemoryPressure:
        used = s.used_percent + margin_percent
        free = s.available_bytes - s.total_bytes * margin_percent / 100.0
        critical_at = self.max_usage_percent + (100.0 - self.max_usage_percent) / 2
        if used >= critical_at or free < self.min_free_bytes / 2:
            return MemoryPressure.CRITICAL
        if used >= self.max_usage_percent or free < self.min_free_bytes:
            return MemoryPressure.HIGH
        if used < self.max_usage_percent - 25.0:
            return MemoryPressure.LOW
        return MemoryPressure.NORMAL

    def update(self, s: MemorySample) -> MemoryPressure:
        now = self.raw_level(s)
        if now.rank > self.level.rank:
            self.level = now
        elif now.rank < self.level.rank:
            # Only step down when the level would hold even with the margin added back.
            self.level = max(now, self.raw_level(s, self.hysteresis_percent),
                             key=lambda lv: lv.rank)
        return self.level


def default_sampler(memory: "MemoryConfig", charged_bytes: Callable[[], float]) -> MemorySampler:
    """The configured sampler: a budget charged with what is loaded, or this host's memory."""
    if memory.sampler == "budget":
        assert memory.budget_gb is not None
        return BudgetSampler(int(memory.budget_gb * 1e9), charged_bytes)
    return PsutilSampler(gpu=NvmlSampler.create())
