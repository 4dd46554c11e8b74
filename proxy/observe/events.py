"""The event hub behind `GET /proxy/events` (Server-Sent Events) and the dashboard.

It listens to the engine and the health monitor. Rare events (state changes, evictions, loads,
queue changes, alerts) are encoded once and appended to a ring of recent events; requests only
bump a per-model counter (O(1), no allocation per request), and a ticker turns those counters
into one `requests` event per second, together with the latest memory sample and in-flight
counts when they changed. A flusher hands each batch of new events to every client's bounded
buffer; a client whose buffer overflows (it reads slower than events come) is dropped — its
connection aborted — so a slow viewer never holds up the engine or the other viewers.

Event ids are `<epoch>-<n>`: a client resuming with `Last-Event-ID` from this process gets the
events it missed from the ring; one from another process (a restart) or from too long ago gets a
fresh `snapshot` first.

The hub also feeds the timeline the dashboard draws (timeline.py).

With a fleet (`upstreams:`) every model event carries `host` (the host it happened on), the
per-second request summary counts requests per host, and the memory event and the snapshot add
`hosts`: each host's memory, state and resident models (observe/hosts.py).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import orjson

from ..engine.memory import GB, MemorySample
from ..engine.report import pressure_shown
from ..engine.usage import RequestRecord
from .hosts import fleet_of, host_memory
from .timeline import Timelines

if TYPE_CHECKING:
    from .health import ModelHealthMonitor
    from ..engine.face import Engine

log = logging.getLogger("proxy.events")

RING_EVENTS = 2048           # recent events kept for Last-Event-ID resume
CLIENT_BUFFER_EVENTS = 1024  # a client further behind than this is dropped
TICK_S = 1.0                 # per-second request summaries, memory, in-flight
HEARTBEAT_S = 15.0           # a comment line on a stream idle this long
RECENT_ERRORS = 50
OTHER = "__other__"


@dataclass
class Event:
    n: int
    type: str
    encoded: bytes


@dataclass(eq=False)
class Client:
    """One viewer: a bounded buffer of encoded events and a way to cut it off."""
    limit: int
    abort: Callable[[], None]
    pending: collections.deque = field(default_factory=collections.deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: bool = False
    connected_at_s: float = field(default_factory=time.monotonic)
    events_sent: int = 0
    bytes_sent: int = 0

    def push(self, batch: list[Event]) -> bool:
        """False (and the client dropped) when the batch does not fit its buffer."""
        if self.dropped:
            return False
        if len(self.pending) + len(batch) > self.limit:
            self.dropped = True
            self.pending.clear()
            self.wake.set()
            self.abort()
            return False
        self.pending.extend(batch)
        self.wake.set()
        return True

    def take(self) -> bytes:
        batch, self.pending = self.pending, collections.deque()
        data = b"".join(e.encoded for e in batch)
        self.events_sent += len(batch)
        self.bytes_sent += len(data)
        return data


def encode(event_id: str, event_type: str, data: Any) -> bytes:
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (event_id.encode(), event_type.encode(),
                                                   orjson.dumps(data))


class EventHub:
    def __init__(self, engine: "Engine", health: "ModelHealthMonitor | None" = None,
                 *, ring_events: int = RING_EVENTS,
                 client_buffer_events: int = CLIENT_BUFFER_EVENTS, tick_s: float = TICK_S) -> None:
        self.engine = engine
        self.health = health
        self.tick_s = tick_s
        # A comment line this often on an idle stream: a viewer that hears nothing for
        # longer knows its proxy (or the way to it) froze, and says so (the snapshot tells it).
        self.heartbeat_s = HEARTBEAT_S
        self.client_buffer_events = client_buffer_events
        self.epoch = format(int(time.time() * 1000), "x")
        self.ring: collections.deque[Event] = collections.deque(maxlen=ring_events)
        self.clients: set[Client] = set()
        self.published = 0
        self.dropped_clients = 0
        self._n = 0
        self._batch: list[Event] = []
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        # model → [requests, errors, 503s, latency_s, tokens, {status: errors}]
        self._second: dict[str, list] = {}
        self._in_flight: dict[str, int] = {}
        self._sample: MemorySample | None = None
        self._sent_memory: tuple | None = None
        self.timelines = Timelines()
        self.errors: collections.deque = collections.deque(maxlen=RECENT_ERRORS)
        self._started_wall = time.time()
        self._rate: collections.deque = collections.deque(maxlen=60)   # (wall, published)
        self.on_publish: list[Callable[[str, dict[str, Any]], None]] = []   # observe/relayed.py
        self.fleet = fleet_of(engine)
        self.takes_host = self.fleet is not None   # fleet events come with host=<name>
        engine.add_listener(self)
        if health is not None:
            health.listeners.append(self)

    # -- publishing ------------------------------------------------------------------------
    def publish(self, event_type: str, data: dict[str, Any]) -> Event:
        self._n += 1
        data.setdefault("t", round(time.time(), 3))
        ev = Event(self._n, event_type, encode(f"{self.epoch}-{self._n}", event_type, data))
        self.ring.append(ev)
        self._batch.append(ev)
        self.published += 1
        self._wake.set()
        for hook in self.on_publish:
            hook(event_type, data)
        return ev

    @property
    def last_id(self) -> str:
        return f"{self.epoch}-{self._n}"

    # -- engine listener (cheap: no awaits, no I/O) ----------------------------------------
    # With a fleet each hook gets `host=` and its event says where it happened.
    def _publish(self, event_type: str, data: dict[str, Any], host: str | None) -> None:
        if host is not None:
            data["host"] = host
        self.publish(event_type, data)

    def on_state(self, model: str, old: str, new: str, host: str | None = None) -> None:
        self.timelines.state(model, old, new, time.time())
        self._publish("state", {"model": model, "old": old, "new": new}, host)

    def on_load(self, model: str, duration_s: float, ok: bool, host: str | None = None) -> None:
        data: dict[str, Any] = {"model": model, "ok": ok, "duration_s": round(duration_s, 3)}
        e = self._entry(model, host)
        if e is not None:
            data["footprint_bytes"] = round(self.engine.footprint_bytes(e))
            data["footprint_source"] = self.engine.footprint_source(e)
            if not ok:
                data["error"] = e.last_error
                error = {"t": round(time.time(), 3), "model": model, "kind": "load_failed",
                         "message": e.last_error}
                if host is not None:
                    error["host"] = host
                self.errors.append(error)
        self._publish("load", data, host)

    def _entry(self, model: str, host: str | None):  # noqa: ANN202 - ModelEntry | None
        """The model's entry on the host the event came from (the fleet's row otherwise)."""
        if host is not None and self.fleet is not None and host in self.fleet.by_name:
            return self.fleet.by_name[host].core.entry(model)
        return self.engine.entry(model)

    def on_evict(self, model: str, reason: str, for_model: str | None,
                 host: str | None = None) -> None:
        self.timelines.evict(model, reason, for_model, time.time())
        self._publish("evict", {"model": model, "reason": reason, "for_model": for_model}, host)

    def on_unload(self, model: str, reason: str, host: str | None = None) -> None:
        self._publish("unload", {"model": model, "reason": reason}, host)

    def on_preload(self, model: str, why: str, host: str | None = None) -> None:
        self.timelines.preload(model, why, time.time())
        self._publish("preload", {"model": model, "reason": why}, host)

    def on_queue(self, model: str, waiting: int, host: str | None = None) -> None:
        self.timelines.queue(model, waiting, time.time())
        self._publish("queue", {"model": model, "waiting": waiting}, host)

    def on_queue_wait(self, model: str, seconds: float, host: str | None = None) -> None:
        pass   # the queue events above already tell the story

    def on_memory(self, sample: MemorySample, level: str, host: str | None = None) -> None:
        # Sent coalesced, once per tick, with the engine's level (a fleet's: the hosts summed).
        self._sample = sample if host is None else self.engine.last_sample

    def on_request(self, r: RequestRecord, host: str | None = None) -> None:
        key = r.model if self.engine.entry(r.model) is not None else OTHER
        acc = self._second.get(key)
        if acc is None:
            acc = self._second[key] = [0, 0, 0, 0.0, 0, {}, {}]
        acc[0] += 1
        if host is not None:
            acc[6][host] = acc[6].get(host, 0) + 1
        acc[3] += r.latency_s
        acc[4] += r.completion_tokens
        if r.failed:      # a client that left is no error of the model's
            acc[1] += 1
            acc[5][r.status] = acc[5].get(r.status, 0) + 1
            if r.status == 503:
                acc[2] += 1
            code = f" {r.error}" if r.error else ""
            self.errors.append({"t": round(time.time(), 3), "model": r.model,
                                "kind": "request", "status": r.status, "code": r.error,
                                "message": f"{r.status}{code} on {r.endpoint or 'a request'}"})

    def on_alert(self, status: str, alert: dict[str, Any]) -> None:
        self.publish("alert", {"status": status, "alert": alert})

    # -- the ticker: per-second summaries ---------------------------------------------------
    def tick(self) -> None:
        now = time.time()
        if self._second:
            second, self._second = self._second, {}
            models: dict[str, Any] = {}
            engine_now = self.engine.clock.now()
            for key, (n, errors, rejected, latency_s, tokens, statuses, hosts) in \
                    second.items():
                row: dict[str, Any] = {"requests": n, "errors": errors, "rejected": rejected,
                                       "avg_latency_ms": round(latency_s / n * 1000, 2),
                                       "completion_tokens": tokens}
                if statuses:
                    row["error_statuses"] = {str(s): c for s, c in statuses.items()}
                if hosts:
                    row["hosts"] = hosts   # requests per host this second
                if key != OTHER:
                    self.timelines.requests(key, n, errors, rejected, now)
                    row["stats"] = self.engine.usage(key).summary(engine_now)
                models[key] = row
            self.publish("requests", {"models": models})
        in_flight = {}
        for key in self.engine.known_models():
            e = self.engine.entry(key)
            if e is not None and (e.leases or self._in_flight.get(key)):
                in_flight[key] = e.leases
        if in_flight:
            self._in_flight = {k: v for k, v in in_flight.items() if v}
            self.publish("in_flight", {"models": in_flight})
        if self._sample is not None:
            memory = self.memory()
            sig = (memory["available_bytes"], memory["total_bytes"], memory["level"],
                   orjson.dumps(memory.get("hosts")))
            if sig != self._sent_memory:
                self._sent_memory = sig
                self.publish("memory", memory)
        self._rate.append((now, self.published))

    def memory(self) -> dict[str, Any]:
        mem = self.engine.config.memory
        managed = self.engine.memory_managed     # else no figures: the proxy acts on none
        s = (self._sample or self.engine.last_sample) if managed else None
        out: dict[str, Any] = {"level": pressure_shown(self.engine), "managed": managed,
                               "sampler": mem.sampler,
                               "reserve_bytes": int(mem.min_free_memory_gb * GB),
                               "ceiling_percent": mem.max_memory_usage_percent,
                               "total_bytes": None, "available_bytes": None, "used_percent": None}
        if s is not None:
            out.update(total_bytes=s.total_bytes, available_bytes=s.available_bytes,
                       used_percent=round(s.used_percent, 2))
        if self.fleet is not None:
            out["hosts"] = {h.name: host_memory(h) for h in self.fleet.hosts}
        return out

    # -- clients ----------------------------------------------------------------------------
    def subscribe(self, last_event_id: str | None, abort: Callable[[], None]
                  ) -> tuple[Client, bytes]:
        """Register a client; returns it and what to send first: the missed events when
        `last_event_id` can be resumed from the ring, else a snapshot."""
        client = Client(self.client_buffer_events, abort)
        self.clients.add(client)
        self._changed.set()
        replay = self._replay(last_event_id)
        if replay is None:
            first = b"event: snapshot\ndata: %s\n\n" % orjson.dumps(self.snapshot())
        else:
            first = b"".join(e.encoded for e in replay)
        return client, first

    def _replay(self, last_event_id: str | None) -> list[Event] | None:
        if not last_event_id:
            return None
        epoch, _, n = last_event_id.strip().partition("-")
        if epoch != self.epoch or not n.isdigit():
            return None
        after = int(n)
        oldest = self.ring[0].n if self.ring else self._n + 1
        if after > self._n or after < oldest - 1:
            return None   # from the future, or the ring no longer reaches back that far
        return [e for e in self.ring if e.n > after]

    def unsubscribe(self, client: Client) -> None:
        self.clients.discard(client)
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Until predicate() holds, re-checked whenever a client comes, goes or is dropped."""
        while not predicate():
            self._changed.clear()
            await self._changed.wait()

    def _fan_out(self) -> None:
        batch, self._batch = self._batch, []
        if not batch:
            return
        for client in list(self.clients):
            if not client.push(batch):
                self.dropped_clients += 1
                self.clients.discard(client)
                self._changed.set()
                log.info("dropped an event-stream client %d events behind", client.limit)

    def close_clients(self) -> None:
        for client in list(self.clients):
            client.dropped = True
            client.wake.set()
        self.clients.clear()
        self._changed.set()

    # -- background tasks -------------------------------------------------------------------
    async def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._flusher(), name="events-flush"),
                           asyncio.create_task(self._ticker(), name="events-tick")]

    async def close(self) -> None:
        self.close_clients()
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _flusher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._fan_out()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                self.tick()
            except Exception:
                log.exception("event ticker failed; continuing")

    # -- views ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        rate = 0.0
        if len(self._rate) >= 2:
            (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
            rate = (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
        return {"published": self.published, "events_per_s": round(rate, 2),
                "ring": len(self.ring), "dropped_clients": self.dropped_clients,
                "clients": [{"connected_s": round(time.monotonic() - c.connected_at_s, 1),
                             "events_sent": c.events_sent, "bytes_sent": c.bytes_sent,
                             "buffered": len(c.pending)} for c in self.clients]}

    def snapshot(self) -> dict[str, Any]:
        engine = self.engine
        stats = engine.report()
        models = []
        for key, row in stats["models"].items():
            e = engine.entry(key)
            cfg = engine.config.model(key)
            models.append({"model": key, **row, "waiting": e.waiting if e else 0,
                           "aliases": list(cfg.aliases)})
        health = self.health.get_health_report() if self.health is not None else None
        memory = self.memory()
        out = {"id": self.last_id, "t": round(time.time(), 3), "models": models,
               "memory": memory, "upstream": stats["upstream"],
               "queue_length": stats["queue_length"], "health": health,
               "errors": list(self.errors), "heartbeat_s": self.heartbeat_s}
        if self.fleet is not None:
            out["hosts"] = memory["hosts"]
        return out

    def timeline(self, window_s: float) -> dict[str, Any]:
        return self.timelines.view(window_s, self.engine.known_models(), self._started_wall)
