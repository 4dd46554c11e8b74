"""The gauges of `/metrics` for a fleet (`upstreams:`), read from each host's engine at scrape
time: the per-model gauges of a single server with a `host` label (a model listed on two hosts
is two series), and per-host gauges — up, memory used/total/available/ceiling, loaded models,
loads queued, requests in flight. The fleet-wide gauges (pressure, queue depth, upstream up,
memory summed over the hosts) keep their single-server names, so dashboards built for one
server keep working. `host` values are the configured host names only.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..engine.coreviews import UNKNOWN
from ..engine.lifecycle import ModelStatus
from ..fleet import Fleet
from .gauges import engine_gauges

if TYPE_CHECKING:
    from ..engine.face import Engine


class FleetStateCollector(Collector):
    def __init__(self, fleet: "Engine") -> None:
        assert isinstance(fleet, Fleet)
        self.fleet = fleet

    def collect(self) -> Iterable[GaugeMetricFamily]:
        yield from self._models()
        yield from self._hosts()
        yield from self._fleet()

    def _models(self) -> Iterable[GaugeMetricFamily]:
        loaded = GaugeMetricFamily("proxy_model_loaded", "1 if the model is loaded",
                                   labels=["model", "host"])
        owner = GaugeMetricFamily("proxy_model_owner", "1 for the owner of a loaded model",
                                  labels=["model", "owner", "host"])
        leases = GaugeMetricFamily("proxy_model_requests_in_flight",
                                   "Requests holding the model", labels=["model", "host"])
        footprint = GaugeMetricFamily("proxy_model_footprint_bytes",
                                      "Memory the model takes (measured, else estimated)",
                                      labels=["model", "host"])
        for h in self.fleet.hosts:
            core = h.core
            managed = core.memory_managed     # else no footprints (as for one server)
            for key in core.known_models():
                entry = h.entry(key)
                if entry is None:
                    continue   # listed there but the host may not hold it
                is_loaded = h.status(entry) is ModelStatus.LOADED
                if h.shown_state(entry) != UNKNOWN:
                    loaded.add_metric([key, h.name], 1.0 if is_loaded else 0.0)
                if is_loaded and entry.owner:
                    owner.add_metric([key, entry.owner.split(":", 1)[0], h.name], 1.0)
                leases.add_metric([key, h.name], float(entry.leases))
                if managed:
                    footprint.add_metric([key, h.name], core.footprint_bytes(entry))
        yield from (loaded, owner, leases, footprint)

    def _hosts(self) -> Iterable[GaugeMetricFamily]:
        def family(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["host"])
        up = family("proxy_host_up", "1 if the host answers and takes requests")
        used = family("proxy_host_memory_used_bytes", "Memory in use on the host")
        total = family("proxy_host_memory_total_bytes", "Memory in all on the host")
        available = family("proxy_host_memory_available_bytes", "Memory available on the host")
        ceiling = family("proxy_host_memory_ceiling_bytes",
                         "The most any one model may take on the host")
        models = family("proxy_host_loaded_models", "Models loaded on the host")
        queue = family("proxy_host_queue_depth", "Loads waiting for memory on the host")
        in_flight = family("proxy_host_requests_in_flight", "Requests the host serves now")
        for h in self.fleet.hosts:
            core, name = h.core, [h.name]
            up.add_metric(name, 1.0 if h.up else 0.0)
            sample = core.last_sample
            if sample is not None and h.up:    # a down host's last figures are not its memory
                used.add_metric(name, float(sample.used_bytes))
                total.add_metric(name, float(sample.total_bytes))
                available.add_metric(name, float(sample.available_bytes))
                ceiling.add_metric(name, float(core.ceiling_bytes()))
            models.add_metric(name, float(len(h.loaded_models())))
            queue.add_metric(name, float(core.queue_length))
            in_flight.add_metric(name, float(len(core.active_leases())))
        yield from (up, used, total, available, ceiling, models, queue, in_flight)

    def _fleet(self) -> Iterable[Any]:
        yield from engine_gauges(self.fleet)   # summed or worst over the hosts: the fleet's face
