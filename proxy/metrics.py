"""Prometheus metrics, one registry per app (never the global one).

Counters and histograms are fed by the engine's listener events; gauges are read from the
engine's state at scrape time, so they can never drift from it. Label cardinality is bounded:
a model label is a known model key or `__other__`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .engine.memory import MemoryPressure
from .engine.usage import RequestRecord

if TYPE_CHECKING:
    from .engine.manager import ModelMemoryManager

OTHER = "__other__"
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LOAD_BUCKETS_S = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
QUEUE_BUCKETS_S = (0.001, 0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300)


class ProxyMetrics:
    def __init__(self, engine: "ModelMemoryManager") -> None:
        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("proxy_requests_total", "Requests by model, endpoint and outcome",
                                ["model", "endpoint", "outcome"], registry=r)
        self.duration = Histogram("proxy_request_duration_seconds",
                                  "Time from request to the end of the response",
                                  ["model"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.ttft = Histogram("proxy_time_to_first_token_seconds",
                              "Time to the first generated token of a stream", ["model"],
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.tokens = Counter("proxy_tokens_total", "Tokens by model and kind",
                              ["model", "kind"], registry=r)
        self.load_duration = Histogram("proxy_model_load_duration_seconds",
                                       "Model load durations", ["model"],
                                       buckets=LOAD_BUCKETS_S, registry=r)
        self.loads = Counter("proxy_model_loads_total", "Model loads by outcome",
                             ["model", "outcome"], registry=r)
        self.evictions = Counter("proxy_evictions_total", "Model unloads by reason",
                                 ["model", "reason"], registry=r)
        self.queue_wait = Histogram("proxy_queue_wait_seconds",
                                    "Time a load waited for admission (memory)",
                                    buckets=QUEUE_BUCKETS_S, registry=r)
        r.register(_StateCollector(engine))
        engine.listeners.append(self)

    def label(self, model: str) -> str:
        return model if self.engine.entry(model) is not None else OTHER

    # -- engine listener events --------------------------------------------------------------
    def on_request(self, rec: RequestRecord) -> None:
        model = self.label(rec.model)
        outcome = "success" if rec.ok else ("client_closed" if rec.status == 499 else "error")
        self.requests.labels(model, rec.endpoint or "library", outcome).inc()
        self.duration.labels(model).observe(rec.latency_s)
        if rec.ttft_s is not None:
            self.ttft.labels(model).observe(rec.ttft_s)
        if rec.prompt_tokens:
            self.tokens.labels(model, "prompt").inc(rec.prompt_tokens)
        if rec.completion_tokens:
            self.tokens.labels(model, "completion").inc(rec.completion_tokens)

    def on_load(self, model: str, duration_s: float, ok: bool) -> None:
        self.loads.labels(model, "success" if ok else "failure").inc()
        if ok:
            self.load_duration.labels(model).observe(duration_s)

    def on_unload(self, model: str, reason: str) -> None:
        self.evictions.labels(model, reason).inc()

    def on_queue_wait(self, model: str, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Gauges computed from the engine at scrape time."""

    def __init__(self, engine: "ModelMemoryManager") -> None:
        self.engine = engine

    def collect(self) -> Iterable[GaugeMetricFamily]:
        e = self.engine
        loaded = GaugeMetricFamily("proxy_model_loaded", "1 if the model is loaded",
                                   labels=["model"])
        leases = GaugeMetricFamily("proxy_model_requests_in_flight",
                                   "Requests holding the model", labels=["model"])
        footprint = GaugeMetricFamily("proxy_model_footprint_bytes",
                                      "Memory the model takes (measured, else estimated)",
                                      labels=["model"])
        for key in e.known_models():
            entry = e.entry(key)
            assert entry is not None
            loaded.add_metric([key], 1.0 if key in e.loaded_set() else 0.0)
            leases.add_metric([key], float(entry.leases))
            footprint.add_metric([key], e.footprint_bytes(entry))
        yield loaded
        yield leases
        yield footprint
        yield GaugeMetricFamily("proxy_queue_depth", "Loads waiting for memory",
                                value=float(e.queue_length))
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
