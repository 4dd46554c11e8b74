"""Prometheus metrics, one registry per app (never the global one).

Counters and histograms are fed by the engine's listener events; gauges are read from the
engine's state at scrape time, so they can never drift from it. Label cardinality is bounded:
a model label is a known model key or `__other__`. With a fleet (`upstreams:`) every per-model
series also carries `host`, one of the configured host names (observe/fleetmetrics.py adds the
per-host gauges); a single server's exposition has no host label at all.
"""
from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.utils import floatToGoString
from prometheus_client.registry import Collector

from ..engine.lifecycle import ModelStatus
from ..engine.usage import RequestRecord
from .fleetmetrics import FleetStateCollector
from .gauges import engine_gauges
from .gateway import InferenceGatewayCollector
from .hosts import host_names

if TYPE_CHECKING:
    from ..server.compat import Compat
    from ..engine.face import Engine

OTHER = "__other__"
REFUSED = "refused"   # outcome of a request refused for the client's fault: no model's failure
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LOAD_BUCKETS_S = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
QUEUE_BUCKETS_S = (0.001, 0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300)


class _HistogramCounts:
    """A Prometheus histogram as plain counts: no lock, one bisect per observation."""
    __slots__ = ("counts", "total")

    def __init__(self, n_buckets: int) -> None:
        self.counts = [0] * (n_buckets + 1)
        self.total = 0.0


class ProxyMetrics:
    """Per-request series are plain counters updated on the loop and exported by a collector
    at scrape time (prometheus_client's Counter/Histogram lock on every update, which cost more
    than the rest of the engine's per-request work together); rare events use its classes."""

    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        # A fleet's host names (bounded by config), else None: no host label anywhere.
        self.hosts = host_names(engine)
        self.takes_host = self.hosts is not None   # fleet events come with host=<name>
        extra = ["host"] if self.takes_host else []
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.load_duration = Histogram("proxy_model_load_duration_seconds",
                                       "Model load durations", ["model", *extra],
                                       buckets=LOAD_BUCKETS_S, registry=r)
        self.loads = Counter("proxy_model_loads_total", "Model loads by outcome",
                             ["model", "outcome", *extra], registry=r)
        self.evictions = Counter("proxy_evictions_total", "Model unloads by reason",
                                 ["model", "reason", *extra], registry=r)
        self.queue_wait = Histogram("proxy_queue_wait_seconds",
                                    "Time a load waited for admission (memory)", extra,
                                    buckets=QUEUE_BUCKETS_S, registry=r)
        # Series keys end with the host (None on a single server, dropped at export).
        self.requests: dict[tuple[str, str, str, str | None], int] = {}
        self.durations: dict[tuple[str, str | None], _HistogramCounts] = {}
        self.ttfts: dict[tuple[str, str | None], _HistogramCounts] = {}
        self.tokens: dict[tuple[str, str, str | None], int] = {}
        self._known: set[str] = set()   # models that label as themselves (no lookup again)
        r.register(FleetStateCollector(engine) if self.takes_host else _StateCollector(engine))
        r.register(_RequestCollector(self))
        r.register(InferenceGatewayCollector(engine))   # only with metrics.inference_gateway
        engine.add_listener(self)

    def label(self, model: str) -> str:
        return model if self.engine.entry(model) is not None else OTHER

    def _host(self, host: str | None) -> tuple[str, ...]:
        if self.hosts is None:
            return ()
        return (host if host in self.hosts else OTHER,)

    # -- engine listener events --------------------------------------------------------------
    def on_request(self, rec: RequestRecord, host: str | None = None) -> None:
        model = rec.model
        if model not in self._known:
            model = self.label(model)
            if model != OTHER:
                self._known.add(model)
        if host is not None and host not in self.hosts:   # type: ignore[operator]
            host = OTHER
        outcome = "success" if rec.ok else ("client_closed" if rec.client_closed else "error")
        key = (model, rec.endpoint or "library", outcome, host)
        self.requests[key] = self.requests.get(key, 0) + 1
        series = (model, host)
        hist = self.durations.get(series)
        if hist is None:
            hist = self.durations[series] = _HistogramCounts(len(LATENCY_BUCKETS_S))
        hist.counts[bisect.bisect_left(LATENCY_BUCKETS_S, rec.latency_s)] += 1
        hist.total += rec.latency_s
        if rec.ttft_s is not None:
            ttft = self.ttfts.get(series)
            if ttft is None:
                ttft = self.ttfts[series] = _HistogramCounts(len(LATENCY_BUCKETS_S))
            ttft.counts[bisect.bisect_left(LATENCY_BUCKETS_S, rec.ttft_s)] += 1
            ttft.total += rec.ttft_s
        if rec.prompt_tokens:
            k = (model, "prompt", host)
            self.tokens[k] = self.tokens.get(k, 0) + rec.prompt_tokens
        if rec.completion_tokens:
            k = (model, "completion", host)
            self.tokens[k] = self.tokens.get(k, 0) + rec.completion_tokens

    def on_refused(self, model: str, endpoint: str) -> None:
        """A request the proxy refused for the client's own fault (its key, body or model
        name) before any model answered: outcome "refused", on no host (label "" in a fleet)."""
        label = model if model in self._known else self.label(model)
        key = (label, endpoint, REFUSED, "" if self.takes_host else None)
        self.requests[key] = self.requests.get(key, 0) + 1

    def on_load(self, model: str, duration_s: float, ok: bool, host: str | None = None) -> None:
        self.loads.labels(model, "success" if ok else "failure", *self._host(host)).inc()
        if ok:
            self.load_duration.labels(model, *self._host(host)).observe(duration_s)

    def on_unload(self, model: str, reason: str, host: str | None = None) -> None:
        self.evictions.labels(model, reason, *self._host(host)).inc()

    def on_queue_wait(self, model: str, seconds: float, host: str | None = None) -> None:
        if self.hosts is None:
            self.queue_wait.observe(seconds)
        else:
            self.queue_wait.labels(*self._host(host)).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _RequestCollector(Collector):
    def __init__(self, metrics: ProxyMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterable[Any]:
        extra = ["host"] if self.m.hosts is not None else []
        requests = CounterMetricFamily("proxy_requests", "Requests by model, endpoint and "
                                       "outcome", labels=["model", "endpoint", "outcome", *extra])
        for labels, n in sorted(self.m.requests.items(), key=_order):
            requests.add_metric(_values(labels, extra), n)
        yield requests
        tokens = CounterMetricFamily("proxy_tokens", "Tokens by model and kind",
                                     labels=["model", "kind", *extra])
        for labels, n in sorted(self.m.tokens.items(), key=_order):
            tokens.add_metric(_values(labels, extra), n)
        yield tokens
        for name, doc, source in (
                ("proxy_request_duration_seconds", "Time from request to the end of the response",
                 self.m.durations),
                ("proxy_time_to_first_token_seconds",
                 "Time to the first generated token of a stream", self.m.ttfts)):
            family = HistogramMetricFamily(name, doc, labels=["model", *extra])
            for series, h in sorted(source.items(), key=_order):
                cumulative, buckets = 0, []
                for bound, n in zip((*LATENCY_BUCKETS_S, float("inf")), h.counts):
                    cumulative += n
                    buckets.append((floatToGoString(bound), cumulative))
                family.add_metric(_values(series, extra), buckets, h.total)
            yield family


def _order(item: tuple[tuple, Any]) -> tuple:
    return tuple("" if v is None else v for v in item[0])


def _values(key: tuple, extra: list[str]) -> list[str]:
    """A series key's label values: the trailing host only when the family has that label."""
    return list(key) if extra else list(key[:-1])


class CompatCollector(Collector):
    """proxy_compat_repairs_total{kind}: responses repaired on their way through."""

    def __init__(self, compat: "Compat") -> None:
        self.compat = compat

    def collect(self) -> Iterable[Any]:
        family = CounterMetricFamily("proxy_compat_repairs", "Responses repaired for OpenAI "
                                     "compatibility, by kind", labels=["kind"])
        for kind, n in self.compat.counts().items():
            family.add_metric([kind], n)
        yield family


class _StateCollector(Collector):
    """Gauges computed from the engine at scrape time."""

    def __init__(self, engine: "Engine") -> None:
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
        # Who loaded it: proxy, external, or sdk (an LM Studio SDK client through the proxy;
        # the client's identifier stays out of the label, it is new per connection).
        owner = GaugeMetricFamily("proxy_model_owner", "1 for the owner of a loaded model",
                                  labels=["model", "owner"])
        # No series where nothing is known: a server that does not say what it has loaded,
        # footprints where memory is not managed.
        residency = e.capabilities is None or e.capabilities.reports_residency
        managed = e.memory_managed
        for key in e.known_models():
            entry = e.entry(key)
            assert entry is not None
            if residency or entry.status is not ModelStatus.UNLOADED:
                loaded.add_metric([key], 1.0 if entry.status is ModelStatus.LOADED else 0.0)
            if entry.status is ModelStatus.LOADED and entry.owner:
                owner.add_metric([key, entry.owner.split(":", 1)[0]], 1.0)
            leases.add_metric([key], float(entry.leases))
            if managed:
                footprint.add_metric([key], e.footprint_bytes(entry))
        yield loaded
        yield owner
        yield leases
        yield footprint
        yield from engine_gauges(e)
