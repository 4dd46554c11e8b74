"""Per-model state: one transition function checked against a table, and leases.

    unloaded ──▶ loading ──▶ loaded ──▶ unloading ──▶ unloaded
                    │                       │
                    ▼                       └──▶ loaded   (unload failed)
                  error ──▶ loading (after backoff)

Any state may also jump to `loaded` or `unloaded` when the reconcile loop finds that someone else
(LM Studio's GUI, `lms`, a restart) changed the server behind our back.

A `Lease` keeps a model from being unloaded. A USE lease is a request: it refreshes recency and
heat and is counted; a HOLD lease (probes, admin reads) only pins the model for its duration.
"""
from __future__ import annotations

import asyncio
import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


class ModelStatus(str, enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    ERROR = "error"


S = ModelStatus
OWNER_PROXY = "proxy"          # loaded by this proxy: it may unload it
OWNER_EXTERNAL = "external"    # loaded by someone else (GUI, lms, another client)
# A load the proxy gave up waiting for may still finish on the server for this long after it
# started; an instance of the model appearing by then is the proxy's.
UNFINISHED_LOAD_WATCH_S = 900.0
OWNER_CLIENT = "sdk:"          # prefix: loaded through the proxy by an LM Studio SDK client
TRANSITIONS: dict[ModelStatus, frozenset[ModelStatus]] = {
    S.UNLOADED: frozenset({S.LOADING, S.LOADED}),
    S.LOADING: frozenset({S.LOADED, S.ERROR, S.UNLOADED}),
    S.LOADED: frozenset({S.UNLOADING, S.UNLOADED}),
    S.UNLOADING: frozenset({S.UNLOADED, S.LOADED}),
    S.ERROR: frozenset({S.LOADING, S.LOADED, S.UNLOADED}),
}


class IllegalTransition(RuntimeError):
    pass


@dataclass
class ModelEntry:
    """Everything the engine knows about one model; mutated only by the manager."""
    key: str
    type: str = "llm"
    size_bytes: int | None = None
    status: ModelStatus = S.UNLOADED
    instance_ids: tuple[str, ...] = ()
    owner: str | None = None            # OWNER_PROXY, OWNER_EXTERNAL, OWNER_CLIENT + its id;
                                        # None when not loaded
    leases: int = 0                     # USE leases: requests being served
    holds: int = 0                      # HOLD leases: probes and admin reads
    reserved: int = 0                   # requests its load finished for, not yet leased
    preloaded: bool = False             # loaded on a prediction and not used since
    # When it was unloaded by hand, if not asked for since: for a while its own history (gaps,
    # rhythm, clock) does not preload it back, or the operator's unload is undone within a tick.
    unloaded_by_hand_s: float | None = None
    waiting: int = 0                    # requests waiting for this model's load
    waiting_since_s: float | None = None
    loading_since_s: float | None = None
    # Among replicas: admitted here, its load was refused its reservation, for other replicas'
    # loads hold the room (engine/shared.py); what the refusal said. It holds no memory, so it
    # is not charged: beside their models, resident by then, it would read as critical.
    room_refused: str | None = None
    loaded_at_s: float | None = None
    last_used_at_s: float | None = None
    heat: float = 0.0                   # requests, decayed with age (policy.HEAT_HALF_LIFE_S)
    heat_at_s: float = 0.0              # when heat was last brought up to date
    footprint_bytes: float | None = None  # learned: mean drop in available memory across loads
    footprint_samples: int = 0
    reported_bytes: float | None = None   # resident bytes the server itself reported
    # learned: LM Studio refused it for lack of memory with this much free, so it needs more
    footprint_floor_bytes: float | None = None
    load_time_s: float | None = None    # learned: mean load duration
    load_count: int = 0                 # loads this proxy made (kept across restarts)
    # load_time_s is the mean of this many loads since load_count did: another replica's
    # measurement adopted in place of its own starts it anew (engine/shared_learned.py).
    load_time_since: int = 0
    load_failures: int = 0
    retry_at_s: float = 0.0
    last_error: str | None = None
    # Its last load failed because the server could not be reached: a fact of the server,
    # not of the model; the server's next answer (reconcile) clears the error.
    failed_unreachable: bool = False
    unfinished_since_s: float | None = None  # our load got no answer; the server may finish it
    max_context_length: int | None = None   # the most the server says it can take
    context_length: int | None = None       # its loaded instance's context, when known
    # What else the server says of it, in its own words (UpstreamModel.extra), and of its
    # loaded instance (UpstreamModel.resident: Ollama's size_vram, expires_at).
    extra: Mapping[str, Any] = field(default_factory=dict)
    resident_extra: Mapping[str, Any] = field(default_factory=dict)
    # Loaded (or loading) with a context smaller than configured (engine/fit.py): that
    # context and the memory it is expected to hold there.
    fit_context_length: int | None = None
    fit_bytes: float | None = None
    # learned per context it was loaded with by fit: context → (mean footprint, samples)
    context_footprints: dict[int, tuple[float, int]] = field(default_factory=dict)
    evictions: Counter[str] = field(default_factory=Counter)
    load_task: asyncio.Task | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # set when not unloading
    drained: "Drained" = field(init=False, repr=False, compare=False)  # nothing holds it

    def __post_init__(self) -> None:
        self.settled.set()
        self.drained = Drained(self)

    @property
    def owned(self) -> bool:
        return self.owner == OWNER_PROXY

    @property
    def client(self) -> str | None:
        """The SDK client that loaded it through the proxy (its owner), if one did."""
        return self.owner if self.owner and self.owner.startswith(OWNER_CLIENT) else None

    @property
    def busy(self) -> int:
        """Leases of either kind, and requests about to take one: never unloaded."""
        return self.leases + self.holds + self.reserved

    def claim_unfinished(self, now_s: float) -> bool:
        """Is an instance appearing now the late result of a load the proxy started? (Once.)"""
        since, self.unfinished_since_s = self.unfinished_since_s, None
        return since is not None and now_s - since < UNFINISHED_LOAD_WATCH_S

    def learn_footprint(self, observed_bytes: float) -> None:
        self.footprint_samples += 1
        prev = self.footprint_bytes or 0.0
        self.footprint_bytes = prev + (observed_bytes - prev) / self.footprint_samples

    def learn_load_time(self, seconds: float) -> None:
        self.load_count += 1
        prev = self.load_time_s or 0.0
        self.load_time_s = prev + (seconds - prev) / (self.load_count - self.load_time_since)


def transition(entry: ModelEntry, new: ModelStatus) -> ModelStatus:
    """The only way a status changes; returns the old one. (No state lists itself: a
    "change" to the same state is refused, as ctx.swap never asks for one.)"""
    old = entry.status
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"{entry.key}: {old.value} → {new.value} is not allowed")
    entry.status = new
    if new is S.UNLOADING:
        entry.settled.clear()
    elif old is S.UNLOADING:
        entry.settled.set()
    if new in (S.UNLOADED, S.ERROR):
        entry.context_length = entry.fit_context_length = entry.fit_bytes = None
    if new is S.UNLOADED:
        entry.instance_ids = ()
        entry.loaded_at_s = None
        entry.owner = None
    return old


class Drained:
    """Set while nothing holds its model (no lease of either kind): what an unload waits for.
    Read from the lease counts rather than toggled by each lease, so a request pays for it
    only when an unload is waiting."""
    __slots__ = ("entry", "waiters")

    def __init__(self, entry: ModelEntry) -> None:
        self.entry = entry
        self.waiters: list[asyncio.Future] = []

    def is_set(self) -> bool:
        e = self.entry
        return not (e.leases or e.holds)

    async def wait(self) -> bool:
        if self.is_set():
            return True
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            return await waiter
        finally:
            if waiter in self.waiters:
                self.waiters.remove(waiter)

    def wake(self) -> None:
        """The last lease went: every wait so far is over (as asyncio.Event.set)."""
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(True)


class LeaseKind(str, enum.Enum):
    USE = "use"     # a request: counts as use of the model
    HOLD = "hold"   # a probe or an admin read: keeps the model, changes nothing about its use


# Module constants: an Enum member read as a class attribute costs as much as a dict lookup
# and a call; the request path reads these instead.
USE, HOLD = LeaseKind.USE, LeaseKind.HOLD


class Lease:
    """A hold on a loaded model; a model with a lease of either kind is never unloaded.
    `last_activity_s` is moved on by whoever relays the response, for hang detection."""
    __slots__ = ("entry", "kind", "_on_release", "released", "started_s", "last_activity_s",
                 "host")

    def __init__(self, entry: ModelEntry, on_release: Callable[["Lease"], None],
                 now_s: float = 0.0, kind: LeaseKind = USE, host: str | None = None) -> None:
        self.entry = entry
        self.kind = kind
        self._on_release = on_release
        self.released = False
        self.started_s = self.last_activity_s = now_s
        self.host = host    # the fleet's host it is on (None: a single server)
        if kind is USE:
            entry.leases += 1
        else:
            entry.holds += 1

    @property
    def model(self) -> str:
        return self.entry.key

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        e = self.entry
        if self.kind is USE:
            e.leases -= 1
        else:
            e.holds -= 1
        if e.drained.waiters and not (e.leases or e.holds):
            e.drained.wake()
        self._on_release(self)

    async def __aenter__(self) -> "Lease":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()
