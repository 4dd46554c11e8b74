"""ModelHealthMonitor: alert rules over the engine's state, logged and sent to a webhook.

Rules (thresholds in `health.*`): memory critical; upstream unreachable; a model's error rate
over a sliding window (errorwindow.py; once open, it stays open through a window with too few
requests to judge, as long as some failed); a model's recent p95 latency against its own
baseline; a load running past `upstream.load_timeout_s`; the silent hang (a request with no
upstream byte, or a load queued, for `hang_threshold_s` while the upstream still answers); a
failing probe; with a fleet, a host down (a warning while other hosts serve, critical when none
does); among replicas, the shared state (Redis) out of reach (a warning: resident models serve,
loads and evictions wait), and a host another replica names otherwise (a warning: they do not
coordinate its loads). An alert is logged once when it opens and once when it clears, and both
transitions go to the webhook when configured.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

from ..config import HealthConfig
from ..engine.lifecycle import ModelStatus
from ..engine.memory import MemoryPressure
from ..engine.periodic import Periodic
from ..engine.report import pressure_shown, upstream_state
from ..engine.usage import BOUNDS_S, quantile_of
from ..fleet.report import fleet_upstream
from .errorwindow import ErrorWindow
from .hosts import fleet_of, host_state

if TYPE_CHECKING:
    from ..engine.face import Engine
    from ..engine.replica import Replica
    from ..engine.lifecycle import ModelEntry
    from ..engine.usage import ModelUsage

log = logging.getLogger("proxy.health")


class AlertSink(Protocol):
    def send(self, event: dict[str, Any]) -> None: ...


@dataclass
class Alert:
    id: str
    rule: str
    severity: str
    message: str
    since_s: float
    model: str | None = None

    def as_dict(self, now_s: float) -> dict[str, Any]:
        return {"id": self.id, "rule": self.rule, "severity": self.severity,
                "model": self.model, "message": self.message,
                "open_for_s": round(now_s - self.since_s, 1)}


@dataclass
class ProbeResult:
    ok: bool
    latency_s: float
    at_s: float
    error: str | None = None


@dataclass
class _LatencyHistory:
    snapshots: collections.deque = field(default_factory=lambda: collections.deque(maxlen=512))


class ModelHealthMonitor:
    def __init__(self, manager: "Engine", config: HealthConfig | None = None, *,
                 sink: AlertSink | None = None,
                 prober: Callable[[str], Awaitable[None]] | None = None,
                 shared_state: "Replica | None" = None) -> None:
        self.manager = manager
        self.shared_state = shared_state   # among replicas (state.backend: redis)
        self._fixed = config    # a library caller's own thresholds; else the engine's, live
        self.sink = sink
        self.prober = prober
        self.alerts: dict[str, Alert] = {}
        self.probes: dict[str, ProbeResult] = {}
        self._latency: dict[str, _LatencyHistory] = {}
        self._errors = ErrorWindow()
        self._periodic = Periodic("health", log)
        self._last_probe_s = float("-inf")
        self.listeners: list[Any] = []   # on_alert(status, alert_dict): "firing" | "resolved"

    @property
    def config(self) -> HealthConfig:
        return self._fixed if self._fixed is not None else self.manager.config.health

    # -- lifecycle ---------------------------------------------------------------------------
    async def start_monitoring(self, interval: float | None = None) -> None:
        if not self._periodic.running:
            self._periodic.start("check", interval or (lambda: self.config.interval_s),
                                 self.check)

    async def stop_monitoring(self) -> None:
        await self._periodic.stop()

    # -- evaluation --------------------------------------------------------------------------
    async def check(self) -> dict[str, Any]:
        now = self.manager.clock.now()
        if self.prober is not None and self.config.probe_interval_s > 0 and \
                now - self._last_probe_s >= self.config.probe_interval_s:
            self._last_probe_s = now
            await self._probe_all()
        found = {a.id: a for a in self._evaluate(now)}
        for alert_id in list(self.alerts):
            if alert_id not in found:
                self._close(self.alerts.pop(alert_id), now)
        for alert_id, alert in found.items():
            if alert_id not in self.alerts:
                self.alerts[alert_id] = alert
                self._open(alert, now)
            else:
                self.alerts[alert_id].message = alert.message
        return self.get_health_report()

    def _evaluate(self, now: float) -> list[Alert]:
        m, c = self.manager, self.config
        out: list[Alert] = []
        if m.memory_managed and m.memory_pressure is MemoryPressure.CRITICAL:
            out.append(Alert("memory_critical", "memory_critical", "critical",
                             "memory pressure is critical", now))
        if not m.upstream_ok:
            out.append(Alert("upstream_unreachable", "upstream_unreachable", "critical",
                             f"upstream unavailable: {m.upstream_error}", now))
        out += self._hosts_down(now)
        state = self.shared_state
        if state is not None and not state.ok:
            out.append(Alert("shared_state_unavailable", "shared_state_unavailable", "warning",
                             f"{state.error or 'shared state unavailable'}; resident models "
                             "serve, loads and evictions wait for it", now))
        if state is not None:
            out += [Alert(f"host_name_conflict:{host}", "host_name_conflict", "warning",
                          f"host '{host}': {found}", now)
                    for host, found in state.name_conflicts().items()]
        known = m.known_models()
        self._errors.forget(set(known))
        for key in known:
            e = m.entry(key)
            usage = m.usage(key)
            error_rate = self._error_rate(key, usage, now)
            if error_rate is not None:
                out.append(Alert(f"error_rate:{key}", "error_rate", "warning", error_rate,
                                 now, key))
            regression = self._latency_regression(key, usage.latency.counts, now)
            if regression is not None:
                out.append(Alert(f"latency_regression:{key}", "latency_regression", "warning",
                                 regression, now, key))
            if e.status is ModelStatus.LOADING and e.loading_since_s is not None and \
                    now - e.loading_since_s > m.config.upstream.load_timeout_s:
                out.append(Alert(f"load_stuck:{key}", "load_stuck", "critical",
                                 f"{key} has been loading for {now - e.loading_since_s:.0f}s",
                                 now, key))
            queued = self._queued(key, e, now)
            if queued is not None:
                out.append(Alert(f"hang:queued:{key}", "hang", "critical", queued, now, key))
            probe = self.probes.get(key)
            if probe is not None and not probe.ok and e.status is ModelStatus.LOADED:
                out.append(Alert(f"probe_failed:{key}", "probe_failed", "warning",
                                 f"{key} failed its probe: {probe.error}", now, key))
        if m.upstream_ok:
            fleet = fleet_of(m)
            silent = {}
            for lease in m.active_leases():
                # Silent while its host does not answer either (its look timed out, it is
                # gone): that is the host_down alert, not a hang of a server that answers.
                if fleet is not None and lease.host is not None and \
                        not fleet.by_name[lease.host].up:
                    continue
                quiet_s = now - lease.last_activity_s
                if quiet_s > c.hang_threshold_s:
                    silent[lease.model] = max(silent.get(lease.model, 0.0), quiet_s)
            for key, quiet_s in silent.items():
                out.append(Alert(f"hang:in_flight:{key}", "hang", "critical",
                                 f"a request to {key} has had no byte from the upstream for "
                                 f"{quiet_s:.0f}s while the upstream answers", now, key))
        return out

    def _error_rate(self, key: str, usage: "ModelUsage", now: float) -> str | None:
        """The error_rate alert's message while it fires, else None. Judged over a sliding
        window with at least min_requests; an open alert is not closed by a window with too
        few requests to judge (it would reopen with the next few): it closes when enough
        requests fail less than the threshold, or when none in the window failed."""
        c = self.config
        requests, failures = self._errors.counts(key, usage, now, c.error_window_s)
        failing = f"{key}: {failures}/{requests} requests failed in the last " \
                  f"{c.error_window_s:.0f}s{_latest(usage)}"
        if requests >= c.min_requests:
            return failing if failures / requests >= c.error_rate_threshold else None
        if failures and f"error_rate:{key}" in self.alerts:
            return f"{failing} (too few to judge: still open)"
        return None

    def _queued(self, key: str, e: "ModelEntry", now: float) -> str | None:
        """Requests for key waiting past hang_threshold_s for the model on a server that
        answers: in a fleet, on each host (its own queue; a host that is down is its
        host_down alert)."""
        m, threshold_s = self.manager, self.config.hang_threshold_s
        fleet = fleet_of(m)
        places = [(None, e, m.upstream_ok)] if fleet is None else [
            (h.name, h.core.registry.entries.get(key), h.up) for h in fleet.hosts]
        for host, entry, up in places:
            if up and entry is not None and entry.waiting and \
                    entry.waiting_since_s is not None and \
                    now - entry.waiting_since_s > threshold_s:
                where = "" if host is None else f" on host '{host}'"
                return (f"{entry.waiting} request(s) for {key} waiting "
                        f"{now - entry.waiting_since_s:.0f}s for the model{where}")
        return None

    def _hosts_down(self, now: float) -> list[Alert]:
        fleet = fleet_of(self.manager)
        if fleet is None:
            return []
        down = [(h.name, host_state(h)) for h in fleet.hosts if not h.up]
        severity = "critical" if len(down) == len(fleet.hosts) else "warning"
        return [Alert(f"host_down:{name}", "host_down", severity,
                      f"host '{name}' ({state['url']}) is down: "
                      f"{state['error'] or 'not answering'}; its models are served elsewhere",
                      now) for name, state in down]

    def _latency_regression(self, key: str, counts: list[int], now: float) -> str | None:
        """Recent p95 (the last latency_window_s) against the p95 of everything before it."""
        hist = self._latency.setdefault(key, _LatencyHistory())
        snaps = hist.snapshots
        snaps.append((now, list(counts)))
        window_start = now - self.config.latency_window_s
        while len(snaps) > 1 and snaps[1][0] <= window_start:
            snaps.popleft()   # keep the newest snapshot that is at least a window old
        start_s, before = snaps[0]
        if start_s > window_start:
            return None   # no history older than the window yet: no baseline
        recent = [a - b for a, b in zip(counts, before)]
        if sum(recent) < self.config.min_requests or sum(before) < self.config.min_requests:
            return None
        p95_recent, p95_base = quantile_of(recent, 0.95), quantile_of(before, 0.95)
        assert p95_recent is not None and p95_base is not None
        if p95_recent > self.config.latency_regression_factor * max(p95_base, BOUNDS_S[0]):
            return (f"{key}: p95 latency {p95_recent * 1000:.0f} ms over the last "
                    f"{self.config.latency_window_s:.0f}s, baseline {p95_base * 1000:.0f} ms")
        return None

    async def _probe_all(self) -> None:
        assert self.prober is not None
        for key in self.manager.loaded_models():
            started = time.perf_counter()
            try:
                await self.prober(key)
                self.probes[key] = ProbeResult(True, time.perf_counter() - started,
                                               self.manager.clock.now())
            except Exception as exc:
                self.probes[key] = ProbeResult(False, time.perf_counter() - started,
                                               self.manager.clock.now(),
                                               getattr(exc, "message", None) or repr(exc))

    def _open(self, alert: Alert, now: float) -> None:
        log.warning("ALERT %s: %s", alert.id, alert.message)
        if self.sink is not None:
            self.sink.send({"status": "firing", **alert.as_dict(now)})
        self._notify("firing", alert.as_dict(now))

    def _close(self, alert: Alert, now: float) -> None:
        log.info("resolved %s after %.0fs", alert.id, now - alert.since_s)
        if self.sink is not None:
            self.sink.send({"status": "resolved", **alert.as_dict(now)})
        self._notify("resolved", alert.as_dict(now))

    def _notify(self, status: str, alert: dict[str, Any]) -> None:
        for listener in self.listeners:
            hook = getattr(listener, "on_alert", None)
            if hook is not None:
                hook(status, alert)

    # -- report ------------------------------------------------------------------------------
    def get_health_report(self) -> dict[str, Any]:
        m = self.manager
        now = m.clock.now()
        models = {}
        for key in m.known_models():
            row = m.row(key)
            probe = self.probes.get(key)
            models[key] = {
                **{k: row[k] for k in REPORT_FIELDS if k in row},
                "probe": None if probe is None else {
                    "ok": probe.ok, "latency_ms": round(probe.latency_s * 1000, 1),
                    "age_s": round(now - probe.at_s, 1), "error": probe.error},
                "healthy": not any(a.model == key for a in self.alerts.values())}
        status = "critical" if any(a.severity == "critical" for a in self.alerts.values()) \
            else "degraded" if self.alerts else "ok"
        system = {"memory_pressure": pressure_shown(m),
                  "upstream": upstream_state(m),
                  "loaded_models": len(m.loaded_models()),
                  "requests_in_flight": len(m.active_leases()),
                  "queue_length": m.queue_length}
        fleet = fleet_of(m)
        if fleet is not None:
            system["upstream"] = fleet_upstream(fleet)
            system["hosts"] = {h.name: {
                **host_state(h), "memory_pressure": pressure_shown(h.core),
                "loaded_models": h.loaded_models(),
                "requests_in_flight": len(h.core.active_leases()),
                "queue_length": h.core.queue_length} for h in fleet.hosts}
        state = self.shared_state
        if state is not None:
            system["shared_state"] = {"ok": state.ok, "replica": state.id,
                                      "leader": state.leader, "error": state.error}
        return {
            "status": status,
            "system_health": system,
            "models": models,
            "alerts": [a.as_dict(now) for a in sorted(self.alerts.values(),
                                                      key=lambda a: a.since_s)],
        }


# The per-model fields of the health report, taken from the one per-model view.
# (`host`, `hosts`: where it lives, with a fleet only.)
REPORT_FIELDS = ("state", "owner", "requests", "success_rate", "p95_latency_ms", "in_flight",
                 "waiting", "host", "hosts")


def _latest(usage: "ModelUsage") -> str:
    """What the latest failure was, so the alert says why: ` (latest: 503 model_too_large)`."""
    last = usage.last_failure
    if last is None:
        return ""
    _, status, code = last
    return f" (latest: {status}{f' {code}' if code else ''})"
