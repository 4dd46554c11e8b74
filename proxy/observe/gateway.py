"""vLLM's series for a Kubernetes inference gateway (`metrics.inference_gateway: true`).

The Gateway API Inference Extension's endpoint picker scrapes each model server's /metrics for
four vLLM series and routes on them: shortest queue, least KV-cache, and the LoRA-affinity
scorer, which sends a request to the pod where its adapter is resident. A proxy in front of one
host answers the same questions about whole models, so with the names and label names vLLM uses
the picker routes to the host that already holds the model, with nothing on its side:

    vllm:num_requests_waiting   requests waiting for their model's load (for memory, or for
                                the load itself)
    vllm:num_requests_running   requests being served (USE leases; probes do not count)
    vllm:kv_cache_usage_perc    memory in use over the ceiling a model may take, 0..1 (vLLM's
                                scale: "1 means 100 percent usage")
    vllm:lora_requests_info     labels running_lora_adapters (resident models),
                                waiting_lora_adapters (models loading or waited for) and
                                max_lora (the models resident or loading, plus as many more of
                                the median footprint as the room under the ceiling holds); the
                                value is the time of the scrape in Unix seconds, as vLLM sets it
                                to the current time

The first three carry vLLM's labels model_name (here the upstream's host:port) and engine ("0").
Everything is read from the engine's face at scrape time; the key is read then too, so a
reload turns the series on or off.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import TYPE_CHECKING, Callable, Iterable
from urllib.parse import urlsplit

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..engine.lifecycle import ModelEntry, ModelStatus

if TYPE_CHECKING:
    from ..engine.face import Engine

# vLLM labels its scheduler gauges with the model it serves and the engine index.
LABELS = ["model_name", "engine"]
ENGINE_INDEX = "0"
HOLD_MEMORY = (ModelStatus.LOADED, ModelStatus.LOADING, ModelStatus.UNLOADING)


class InferenceGatewayCollector(Collector):
    def __init__(self, engine: "Engine", wall_clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.wall_clock = wall_clock

    def collect(self) -> Iterable[GaugeMetricFamily]:
        e = self.engine
        if not e.config.metrics.inference_gateway:
            return
        labels = [server_name(e.config.upstream.url), ENGINE_INDEX]
        entries = [x for x in map(e.entry, e.known_models()) if x is not None]
        resident = sorted(x.key for x in entries if x.status is ModelStatus.LOADED)
        loading = [x.key for x in entries if x.status is ModelStatus.LOADING]
        wanted = sorted({*loading, *(x.key for x in entries
                                     if x.waiting and x.status is not ModelStatus.LOADED)})
        yield _gauge("vllm:num_requests_waiting", "Requests waiting for their model's load.",
                     labels, float(sum(x.waiting for x in entries)))
        yield _gauge("vllm:num_requests_running", "Requests being served.", labels,
                     float(len(e.active_leases())))
        used = self.used_bytes(entries)
        ceiling = e.ceiling_bytes()
        known = used is not None and 0 < ceiling < math.inf
        if known:
            yield _gauge("vllm:kv_cache_usage_perc", "Memory usage over the ceiling for models. "
                         "1 means 100 percent usage.", labels, min(1.0, used / ceiling))
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                 labels=["max_lora", "waiting_lora_adapters",
                                         "running_lora_adapters"])
        fit = len(resident) + len(loading)
        if known:
            fit += self.more_that_fit(entries, ceiling - used, ceiling)
        info.add_metric([str(fit), ",".join(wanted), ",".join(resident)], self.wall_clock())
        yield info

    def used_bytes(self, entries: list[ModelEntry]) -> float | None:
        """Memory in use now: the last sample, or more if the models that hold memory (or are
        loading into it) take more than it saw; samples are taken after a load, not as it
        starts. None until memory was first sampled."""
        s = self.engine.last_sample
        if s is None:
            return None
        ours = sum(self.engine.footprint_bytes(x) for x in entries if x.status in HOLD_MEMORY)
        return float(max(s.used_bytes, ours))

    def more_that_fit(self, entries: list[ModelEntry], room_bytes: float,
                      ceiling_bytes: float) -> int:
        """How many models of a typical size (the median footprint of those that could load
        here and do not hold memory now) the room left holds."""
        sizes = [b for b in (self.engine.footprint_bytes(x) for x in entries
                             if x.status not in HOLD_MEMORY) if 0 < b <= ceiling_bytes]
        if not sizes or room_bytes <= 0:
            return 0
        return int(room_bytes // statistics.median(sizes))


def server_name(url: str) -> str:
    """The upstream as `host:port` (never its credentials): the model server these describe."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or ""
    return f"{host}:{port}" if port else host


def _gauge(name: str, doc: str, labels: list[str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=LABELS)
    family.add_metric(labels, value)
    return family
