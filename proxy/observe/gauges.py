"""The engine-wide gauges of `/metrics`, one engine or a fleet through the same face: loads
queued, memory pressure, the upstream answering, memory available / used / total (the memory
series only where the proxy manages memory); and among replicas, the shared state answering."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..engine.memory import MemoryPressure

if TYPE_CHECKING:
    from ..engine.face import Engine
    from ..engine.replica import Replica


def engine_gauges(e: "Engine") -> Iterable[GaugeMetricFamily]:
    yield GaugeMetricFamily("proxy_queue_depth", "Loads waiting for memory",
                            value=float(e.queue_length))
    if e.memory_managed:     # else no pressure, and no memory (last_sample is None)
        pressure = GaugeMetricFamily("proxy_memory_pressure",
                                     "Memory pressure level (1 for the current one)",
                                     labels=["level"])
        for level in MemoryPressure:
            pressure.add_metric([level.value], 1.0 if e.memory_pressure is level else 0.0)
        yield pressure
    yield GaugeMetricFamily("proxy_upstream_up", "1 if the upstream answers",
                            value=1.0 if e.upstream_ok else 0.0)
    sample = e.last_sample
    if sample is not None:
        yield GaugeMetricFamily("proxy_memory_available_bytes", "Memory available",
                                value=float(sample.available_bytes))
        yield GaugeMetricFamily("proxy_memory_used_bytes", "Memory in use",
                                value=float(sample.used_bytes))
        yield GaugeMetricFamily("proxy_memory_total_bytes", "Memory in all",
                                value=float(sample.total_bytes))


class SharedStateCollector(Collector):
    """proxy_shared_state_up (state.backend: redis): as this replica last found Redis, by its
    heartbeat or any call since."""

    def __init__(self, state: "Replica") -> None:
        self.state = state

    def collect(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily("proxy_shared_state_up",
                                "1 if the replicas' shared state (Redis) answers",
                                value=1.0 if self.state.ok else 0.0)
