"""The Ollama emulator's scheduler: runners, keep-alive, its own evictions and its bounded queue.

What it reproduces of Ollama's scheduler (server/sched.go):
- One runner per model; a request for a model with no runner loads it. A request's keep_alive
  (seconds; negative: forever; 0: unload when idle) replaces the runner's; a request without one
  keeps it; a new runner without one gets OLLAMA_KEEP_ALIVE (5 minutes).
- The keep-alive clock starts when the runner's last request ends; `expires_at` is then + its
  duration. A runner past it is gone (observed whenever anything asks, on a settable clock).
- Beyond OLLAMA_MAX_LOADED_MODELS, loading evicts by itself: the idle runner with the shortest
  keep-alive, ties by name (`ByDurationAndName`); with none idle it waits for that one.
- Requests wait for the scheduler, one at a time; while it is busy (a load) they queue, and
  past OLLAMA_MAX_QUEUE waiting requests the next is turned away (503, ErrMaxQueue). Requests
  are not limited once scheduled (OLLAMA_NUM_PARALLEL is not modelled).
- A model that does not fit the GPU spills to system RAM: `size_vram` < `size`.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from .catalog import CatalogModel

DEFAULT_KEEP_ALIVE_S = 300.0
MAX_QUEUE_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"


class SettableClock:
    """Wall-clock seconds that move only when told to: keep-alive expiry without waiting."""

    def __init__(self, start_s: float = 1_750_000_000.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


class OllamaRefused(Exception):
    """An answer of Ollama's own: status and the message of its {"error": "..."} body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Runner:
    name: str                  # the full name, as /api/ps shows it (`llama3.2:latest`)
    model: CatalogModel
    size_bytes: int            # resident, RAM and VRAM
    size_vram_bytes: int
    keep_alive_s: float        # math.inf: forever
    loaded_at_s: float
    refs: int = 0
    expires_at_s: float | None = None   # None while a request uses it
    idle: asyncio.Event = field(default_factory=asyncio.Event)


class OllamaState:
    def __init__(self, catalog: list[CatalogModel], *, max_loaded_models: int = 3,
                 max_queue: int = 512, vram_bytes: int = 24 * 10**9,
                 default_keep_alive_s: float = DEFAULT_KEEP_ALIVE_S,
                 load_time_scale: float = 0.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.models = {full_name(m.key): m for m in catalog}
        self.max_loaded_models = max_loaded_models
        self.max_queue = max_queue
        self.vram_bytes = vram_bytes
        self.default_keep_alive_s = default_keep_alive_s
        self.load_time_scale = load_time_scale
        self.clock = clock
        self.runners: dict[str, Runner] = {}
        self.waiting = 0                      # requests queued for the scheduler
        self.load_gate: asyncio.Event | None = None   # loads wait for set() (tests)
        self.load_calls: Counter[str] = Counter()
        self.unload_calls: Counter[str] = Counter()
        self.inference_calls: Counter[str] = Counter()
        self.evictions: list[tuple[str, str]] = []   # (name, why): Ollama's own decisions
        self.load_fail: dict[str, str] = {}   # full name → the error its load answers (500)
        self.rejected = 0                     # turned away by a full queue
        self._scheduler = asyncio.Lock()
        self._changed = asyncio.Event()

    # -- observation -------------------------------------------------------------------------
    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until predicate() holds; tests await state instead of sleeping."""
        while not predicate():
            await self._changed.wait()

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def lookup(self, name: str) -> tuple[str, CatalogModel]:
        full = full_name(name)
        if full not in self.models:
            raise OllamaRefused(404, f"model '{name}' not found")
        return full, self.models[full]

    def expire(self) -> None:
        """Drop every idle runner whose keep-alive has run out."""
        now = self.clock()
        for r in list(self.runners.values()):
            if r.refs == 0 and r.expires_at_s is not None and r.expires_at_s <= now:
                self._drop(r, "keep_alive expired")

    # -- scheduling --------------------------------------------------------------------------
    async def schedule(self, name: str, keep_alive_s: float | None) -> Runner:
        """A runner for `name` with a reference taken (release() it), loading it if needed."""
        full, model = self.lookup(name)
        if self.waiting >= self.max_queue:
            self.rejected += 1
            self.notify()
            raise OllamaRefused(503, MAX_QUEUE_MESSAGE)
        self.waiting += 1
        self.notify()
        try:
            await self._scheduler.acquire()
        finally:
            self.waiting -= 1
            self.notify()
        try:
            self.expire()
            r = self.runners.get(full)
            if r is None:
                r = await self._load(full, model, keep_alive_s)
            elif keep_alive_s is not None:
                r.keep_alive_s = keep_alive_s
            r.refs += 1
            r.expires_at_s = None
            r.idle.clear()
            return r
        finally:
            self._scheduler.release()

    def release(self, r: Runner) -> None:
        r.refs -= 1
        if r.refs > 0:
            return
        r.idle.set()
        if r.keep_alive_s <= 0:
            self._drop(r, "keep_alive 0")
        else:
            r.expires_at_s = self.clock() + r.keep_alive_s
        self.notify()

    def stop(self, name: str) -> None:
        """keep_alive 0 without a prompt: expire the runner now (at once when idle)."""
        r = self.runners.get(full_name(name))
        if r is None:
            return
        self.unload_calls[r.name] += 1
        r.keep_alive_s = 0.0
        if r.refs == 0:
            self._drop(r, "keep_alive 0")

    async def _load(self, full: str, model: CatalogModel, keep_alive_s: float | None
                    ) -> Runner:
        while len(self.runners) >= self.max_loaded_models:
            victim = sorted(self.runners.values(),
                            key=lambda r: (r.keep_alive_s, r.name))
            idle = [r for r in victim if r.refs == 0]
            target = idle[0] if idle else victim[0]
            if target.refs:
                await target.idle.wait()
                continue
            self._drop(target, "OLLAMA_MAX_LOADED_MODELS")
        self.load_calls[full] += 1
        self.notify()
        if self.load_gate is not None:
            await self.load_gate.wait()
        if self.load_time_scale > 0:
            await asyncio.sleep(model.load_time_s * self.load_time_scale)
        if full in self.load_fail:
            raise OllamaRefused(500, self.load_fail[full])
        size = model.resident_bytes
        vram_free = self.vram_bytes - sum(r.size_vram_bytes for r in self.runners.values())
        r = Runner(full, model, size, max(0, min(size, vram_free)),
                   keep_alive_s if keep_alive_s is not None else self.default_keep_alive_s,
                   loaded_at_s=self.clock())
        self.runners[full] = r
        self.notify()
        return r

    def _drop(self, r: Runner, why: str) -> None:
        if self.runners.get(r.name) is r:
            del self.runners[r.name]
            if why != "keep_alive 0":    # asked for by a client, not Ollama's own decision
                self.evictions.append((r.name, why))
            self.notify()


def full_name(name: str) -> str:
    """`llama3.2` → `llama3.2:latest`: Ollama's default tag (it follows the last '/')."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def keep_alive_seconds(value: object) -> float | None:
    """Ollama's keep_alive: seconds as a number, or a Go duration ("5m", "1h30m", "0");
    negative means forever. None: not given. Raises ValueError when it is neither."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"invalid keep_alive {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _go_duration_s(value)
    else:
        raise ValueError(f"invalid keep_alive {value!r}")
    return math.inf if seconds < 0 else seconds


_UNITS_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _go_duration_s(text: str) -> float:
    s = text.strip()
    if s in ("0", "-0", "+0"):
        return 0.0
    sign = -1.0 if s.startswith("-") else 1.0
    s = s.lstrip("+-")
    total, number = 0.0, ""
    i = 0
    while i < len(s):
        if s[i].isdigit() or s[i] == ".":
            number += s[i]
            i += 1
            continue
        unit = next((u for u in ("ns", "us", "µs", "ms", "s", "m", "h")
                     if s.startswith(u, i) and not (u == "m" and s.startswith("ms", i))), None)
        if unit is None or not number:
            raise ValueError(f'time: invalid duration "{text}"')
        total += float(number) * _UNITS_S[unit]
        number, i = "", i + len(unit)
    if number or not s:
        raise ValueError(f'time: missing unit in duration "{text}"')
    return sign * total
