"""Per-model usage statistics in bounded memory.

Latency and time-to-first-token quantiles come from fixed log-spaced histograms (about 5 %
relative error), request rates from a ring of per-minute counters; nothing grows with traffic.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

_BUCKET_RATIO = 1.1
# 0.1 ms … ~1 h in ~170 buckets.
BOUNDS_S = tuple(1e-4 * _BUCKET_RATIO ** i for i in range(int(math.log(3.6e7, _BUCKET_RATIO)) + 2))
WINDOW_MINUTES = 120   # two hours: the latest hour is compared with the one before for the trend
MAX_TASKS = 32         # task names kept per model: a client cannot grow this without bound
# An empty slot of a MinuteRing: older than any minute, so that minutes before the monotonic
# clock's zero (restored history, a clock started moments ago) are kept too.
NO_MINUTE = -(1 << 62)
CLIENT_CLOSED = 499    # the status of a request whose client left before the end of its answer


@dataclass(slots=True)
class RequestRecord:   # built once per request: plain slots, no frozen-init cost
    model: str
    ok: bool
    latency_s: float
    at_s: float
    endpoint: str = ""
    status: int = 200
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_estimated: bool = False
    task: str | None = None        # the task the client tagged it with (X-Task-Type)
    host: str | None = None        # the fleet's host that served it (None: a single server)
    error: str | None = None       # a failure's code, the proxy's or the server's (None: none
                                   # given), so what failed says why

    # The one test of a failure, for success rates, the error_rate alert, the history and the
    # metrics alike: a client that left is not the model's doing.
    @property
    def failed(self) -> bool:
        """The model, its host or the proxy failed the request."""
        return not self.ok and self.status != CLIENT_CLOSED

    @property
    def client_closed(self) -> bool:
        """The client left before the end of its answer: a request, neither success nor
        failure."""
        return not self.ok and self.status == CLIENT_CLOSED


class Histogram:
    __slots__ = ("counts", "count", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS_S) + 1)
        self.count = 0
        self.total = 0.0

    def add(self, value: float) -> None:
        self.counts[bisect.bisect_left(BOUNDS_S, value)] += 1
        self.count += 1
        self.total += value

    def quantile(self, q: float) -> float | None:
        return quantile_of(self.counts, q)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


def quantile_of(counts: list[int], q: float) -> float | None:
    """The q-quantile of a histogram given as bucket counts over BOUNDS_S."""
    total = sum(counts)
    if not total:
        return None
    rank = q * (total - 1) + 1
    seen = 0
    for i, n in enumerate(counts):
        seen += n
        if seen >= rank:
            lo = BOUNDS_S[i - 1] if i > 0 else 0.0
            hi = BOUNDS_S[i] if i < len(BOUNDS_S) else BOUNDS_S[-1]
            return math.sqrt(lo * hi) if lo > 0 else hi
    return BOUNDS_S[-1]


class MinuteRing:
    """Counts per minute over the last WINDOW_MINUTES minutes."""
    __slots__ = ("slots", "minutes")

    def __init__(self) -> None:
        self.slots = [0] * WINDOW_MINUTES
        self.minutes = [NO_MINUTE] * WINDOW_MINUTES

    def add(self, at_s: float, n: int = 1) -> None:
        minute = int(at_s // 60)
        i = minute % WINDOW_MINUTES
        if self.minutes[i] != minute:
            self.minutes[i] = minute
            self.slots[i] = 0
        self.slots[i] += n

    def total(self, now_s: float, first_minute_ago: int, last_minute_ago: int) -> int:
        """Sum over minutes in [now - last_minute_ago, now - first_minute_ago)."""
        now_minute = int(now_s // 60)
        out = 0
        for i, m in enumerate(self.minutes):
            if first_minute_ago <= now_minute - m < last_minute_ago:
                out += self.slots[i]
        return out


@dataclass
class ModelUsage:
    requests: int = 0
    failures: int = 0
    client_closed: int = 0         # requests whose client left before the end: no failures
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_tokens: int = 0
    generation_s: float = 0.0
    last_used_at_s: float | None = None
    last_failure: tuple[float, int, str | None] | None = None   # (at_s, status, error code)
    latency: Histogram = field(default_factory=Histogram)
    ttft: Histogram = field(default_factory=Histogram)
    per_minute: MinuteRing = field(default_factory=MinuteRing)
    failures_per_minute: MinuteRing = field(default_factory=MinuteRing)
    tasks: dict[str, list[float]] = field(default_factory=dict)  # task → [requests, failures,
    #                                                                 latency_s sum]

    def record(self, r: RequestRecord) -> None:
        # Once per request: Histogram.add and MinuteRing.add written out, no max() (a call).
        self.requests += 1
        failed = r.failed
        if failed:
            self.failures += 1
            self.failures_per_minute.add(r.at_s)
            self.last_failure = (r.at_s, r.status, r.error)
        elif not r.ok:
            self.client_closed += 1
        self.prompt_tokens += r.prompt_tokens
        self.completion_tokens += r.completion_tokens
        if r.tokens_estimated:
            self.estimated_tokens += r.prompt_tokens + r.completion_tokens
        latency_s, ttft_s = r.latency_s, r.ttft_s
        if r.completion_tokens:
            generation_s = latency_s - (ttft_s or 0.0)
            self.generation_s += 1e-6 if 1e-6 > generation_s else generation_s
        h = self.latency
        h.counts[bisect.bisect_left(BOUNDS_S, latency_s)] += 1
        h.count += 1
        h.total += latency_s
        if ttft_s is not None:
            h = self.ttft
            h.counts[bisect.bisect_left(BOUNDS_S, ttft_s)] += 1
            h.count += 1
            h.total += ttft_s
        ring = self.per_minute
        minute = int(r.at_s // 60)
        i = minute % WINDOW_MINUTES
        if ring.minutes[i] != minute:
            ring.minutes[i] = minute
            ring.slots[i] = 0
        ring.slots[i] += 1
        self.last_used_at_s = r.at_s
        if r.task is not None:
            t = self.tasks.get(r.task)
            if t is None:
                if len(self.tasks) >= MAX_TASKS:
                    return
                t = self.tasks[r.task] = [0, 0, 0.0]
            t[0] += 1
            t[1] += failed
            t[2] += r.latency_s

    @property
    def success_rate(self) -> float:
        return 1.0 - self.failures / self.requests if self.requests else 1.0

    @property
    def tokens_per_s(self) -> float | None:
        return self.completion_tokens / self.generation_s if self.generation_s else None

    def rate_per_h(self, now_s: float) -> float:
        return float(self.per_minute.total(now_s, 0, 60))

    def trend(self, now_s: float) -> str:
        recent = self.per_minute.total(now_s, 0, 60)
        before = self.per_minute.total(now_s, 60, 120)
        if recent >= max(3, before * 1.25):
            return "rising"
        if before >= 3 and recent <= before * 0.75:
            return "falling"
        return "steady"

    def summary(self, now_s: float) -> dict:
        ms = lambda s: None if s is None else round(s * 1000.0, 2)  # noqa: E731
        return {
            "requests": self.requests, "failures": self.failures,
            "client_closed": self.client_closed,
            "success_rate": round(self.success_rate, 4),
            "avg_latency_ms": ms(self.latency.mean),
            "p50_latency_ms": ms(self.latency.quantile(0.5)),
            "p95_latency_ms": ms(self.latency.quantile(0.95)),
            "p99_latency_ms": ms(self.latency.quantile(0.99)),
            "avg_ttft_ms": ms(self.ttft.mean), "p95_ttft_ms": ms(self.ttft.quantile(0.95)),
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "estimated_tokens": self.estimated_tokens,
            "tokens_per_s": None if self.tokens_per_s is None else round(self.tokens_per_s, 1),
            "usage_frequency_per_h": self.rate_per_h(now_s), "trend": self.trend(now_s),
        }


SNAPSHOT_FIELDS = ("requests", "failures", "client_closed", "prompt_tokens",
                   "completion_tokens", "estimated_tokens", "generation_s")


def snapshot(u: ModelUsage, now_s: float, wall_s: float) -> dict:
    """What survives a restart: totals, the latency/TTFT histograms and the last use, as wall
    time (the engine's clock is monotonic and starts anew). The per-minute counts are not here:
    they are the store's usage_minutes rows (see replay_minutes)."""
    out: dict = {f: getattr(u, f) for f in SNAPSHOT_FIELDS}
    out["tasks"] = u.tasks
    for name in ("latency", "ttft"):
        h = getattr(u, name)
        out[name] = {"counts": h.counts, "count": h.count, "total": h.total}
    out["last_used_wall_s"] = None if u.last_used_at_s is None else \
        wall_s - (now_s - u.last_used_at_s)
    return out


def restore(data: dict, now_s: float, wall_s: float) -> ModelUsage:
    """A snapshot on this process's clock; one written before the last use was kept has none."""
    u = ModelUsage()
    for f in SNAPSHOT_FIELDS:
        setattr(u, f, data.get(f, 0))
    tasks = data.get("tasks")
    if isinstance(tasks, dict):
        u.tasks = {str(k): list(v) for k, v in list(tasks.items())[:MAX_TASKS]
                   if isinstance(v, list) and len(v) == 3}
    for name in ("latency", "ttft"):
        saved = data.get(name) or {}
        counts = saved.get("counts") or []
        h = getattr(u, name)
        if len(counts) == len(h.counts):   # bucket layout unchanged since it was written
            h.counts, h.count, h.total = list(counts), saved["count"], saved["total"]
    last = data.get("last_used_wall_s")
    if isinstance(last, (int, float)):      # idle since then; never in the future
        u.last_used_at_s = now_s - max(0.0, wall_s - float(last))
    return u


def replay_minutes(u: ModelUsage, rows: list[tuple[int, int, int]], now_s: float,
                   wall_s: float) -> None:
    """Put (wall minute, requests, failures) rows into u's rings at the same age in minutes on
    this process's clock: minutes that passed while the proxy was down stay empty."""
    now_minute, wall_minute = int(now_s // 60), int(wall_s // 60)
    for minute, requests, failures in rows:
        age = max(0, wall_minute - minute)  # a wall clock set back: this minute, not a future one
        if age >= WINDOW_MINUTES:
            continue
        at_s = (now_minute - age) * 60.0
        if requests:
            u.per_minute.add(at_s, requests)
        if failures:
            u.failures_per_minute.add(at_s, failures)


def merged(usages: list[ModelUsage]) -> ModelUsage:
    """One model's usage on several hosts as one: counts, token totals, histograms, minutes
    and tasks added (each is a sum of events, so the sum is exact), the latest use kept."""
    out = ModelUsage()
    for u in usages:
        for f in SNAPSHOT_FIELDS:
            setattr(out, f, getattr(out, f) + getattr(u, f))
        if u.last_used_at_s is not None and (out.last_used_at_s is None or
                                             u.last_used_at_s > out.last_used_at_s):
            out.last_used_at_s = u.last_used_at_s
        if u.last_failure is not None and (out.last_failure is None or
                                           u.last_failure[0] > out.last_failure[0]):
            out.last_failure = u.last_failure
        for name in ("latency", "ttft"):
            into, h = getattr(out, name), getattr(u, name)
            into.counts = [a + b for a, b in zip(into.counts, h.counts)]
            into.count += h.count
            into.total += h.total
        for name in ("per_minute", "failures_per_minute"):
            into_ring, ring = getattr(out, name), getattr(u, name)
            for i, minute in enumerate(ring.minutes):
                if minute == NO_MINUTE:
                    continue
                if into_ring.minutes[i] < minute:       # a later minute replaces an older one
                    into_ring.minutes[i], into_ring.slots[i] = minute, 0
                if into_ring.minutes[i] == minute:
                    into_ring.slots[i] += ring.slots[i]
        for task, (n, failed, latency_s) in u.tasks.items():
            t = out.tasks.setdefault(task, [0, 0, 0.0])
            t[0] += n
            t[1] += failed
            t[2] += latency_s
    return out
