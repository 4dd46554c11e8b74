"""The emulator's model state: catalogue, loaded instances, memory account, faults, counters.

It reproduces LM Studio's behaviour around loading: a second load of a loaded model makes a
second instance (`key:2`), loads beyond capacity are refused like its guardrails do, JIT loads
auto-evict the previous JIT model (killing its generations in flight), and nothing single-flights.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from .catalog import CatalogModel

PAGE_BYTES = 4096


@dataclass
class Faults:
    """Injected failures; tests flip these to drive the proxy's error paths."""
    load_fail: dict[str, str] = field(default_factory=dict)     # model → reason
    load_gate: dict[str, asyncio.Event] = field(default_factory=dict)  # load waits for set()
    inference_status: int | None = None                          # answer every inference with it
    drop_stream_after_chunks: int | None = None
    first_token_delay_s: float = 0.0
    hang_inference: bool = False
    stream_gate: asyncio.Event | None = None   # streams pause after the first event until set()
    stream_end_gate: asyncio.Event | None = None   # streams end (EOF) only once set()
    no_stream_usage: bool = False    # as LM Studio before 0.3.18: no usage in any stream


@dataclass
class Instance:
    instance_id: str
    model: CatalogModel
    context_length: int
    jit: bool
    loaded_at: float
    memory_bytes: int
    ttl_s: float | None
    last_used_at: float
    # The load call's options besides the model (flash_attention, eval_batch_size, ...).
    load_config: dict = field(default_factory=dict)
    ballast: bytearray | None = None
    generations: set[asyncio.Task] = field(default_factory=set)


class LoadRefused(Exception):
    def __init__(self, status: int, message: str, error_type: str = "model_load_failed") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type


class EmulatorState:
    def __init__(self, catalog: list[CatalogModel], *, capacity_bytes: int,
                 load_time_scale: float = 1.0, real_memory_scale: float | None = None,
                 jit: bool = True, jit_ttl_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.catalog = {m.key: m for m in catalog}
        self.capacity_bytes = capacity_bytes
        self.load_time_scale = load_time_scale
        self.real_memory_scale = real_memory_scale
        self.jit = jit
        self.jit_ttl_s = jit_ttl_s
        self.clock = clock
        self.instances: dict[str, Instance] = {}
        self.loading: Counter[str] = Counter()
        self.faults = Faults()
        self.load_calls: Counter[str] = Counter()
        self.unload_calls: Counter[str] = Counter()
        self.inference_calls: Counter[str] = Counter()
        self.peak_used_bytes = 0
        self.cancelled_streams = 0
        self.hung_requests = 0
        self.abandoned_hung_requests = 0   # hung requests whose client went away
        self.completed_streams = 0
        self._changed = asyncio.Event()

    # -- observation -------------------------------------------------------------------------
    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until predicate() holds; tests await state instead of sleeping."""
        while not predicate():
            await self._changed.wait()

    def notify(self) -> None:
        """Wake every wait_for() to re-check; call after any change worth waiting for."""
        self._changed.set()
        self._changed = asyncio.Event()

    def used_bytes(self) -> int:
        return sum(i.memory_bytes for i in self.instances.values())

    def instances_of(self, key: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.model.key == key]

    def resolve(self, name: str) -> Instance | None:
        """An inference `model` names an instance id or a model key (its first instance)."""
        if name in self.instances:
            return self.instances[name]
        found = self.instances_of(name)
        return found[0] if found else None

    # -- load / unload -----------------------------------------------------------------------
    async def load(self, key: str, *, context_length: int | None = None, jit: bool = False,
                   instance_id: str | None = None, options: dict | None = None) -> Instance:
        model = self.catalog[key]
        context_length = context_length or model.default_context_length
        memory_bytes = model.memory_at(context_length)
        self.load_calls[key] += 1
        self.loading[key] += 1
        self.notify()
        try:
            gate = self.faults.load_gate.get(key)
            if gate is not None:
                await gate.wait()
            if self.load_time_scale > 0:
                await asyncio.sleep(model.load_time_s * self.load_time_scale)
            if key in self.faults.load_fail:
                raise LoadRefused(500, f"Failed to load model \"{key}\": "
                                       f"{self.faults.load_fail[key]}")
            if self.used_bytes() + memory_bytes > self.capacity_bytes:
                raise LoadRefused(500, "Model loading was stopped due to insufficient system "
                                       "resources. Unload other models or adjust the guardrails.")
            instance = Instance(
                instance_id=instance_id or self._next_instance_id(key), model=model,
                context_length=context_length, jit=jit, loaded_at=self.clock(),
                memory_bytes=memory_bytes, ttl_s=self.jit_ttl_s if jit else None,
                last_used_at=self.clock(), load_config=dict(options or {}))
            if self.real_memory_scale:
                instance.ballast = _touched(int(memory_bytes * self.real_memory_scale))
            self.instances[instance.instance_id] = instance
            self.peak_used_bytes = max(self.peak_used_bytes, self.used_bytes())
            return instance
        finally:
            self.loading[key] -= 1
            self.notify()

    def _next_instance_id(self, key: str) -> str:
        if key not in self.instances:
            return key
        n = 2
        while f"{key}:{n}" in self.instances:
            n += 1
        return f"{key}:{n}"

    async def unload(self, instance_id: str) -> None:
        instance = self.instances.pop(instance_id)
        self.unload_calls[instance.model.key] += 1
        for task in list(instance.generations):
            task.cancel()  # LM Studio cuts off what the unloaded model was generating
        instance.ballast = None
        self.notify()

    async def unload_all(self) -> None:
        for instance_id in list(self.instances):
            await self.unload(instance_id)

    async def jit_load(self, key: str) -> Instance:
        """What LM Studio does for a request naming a model with no loaded instance."""
        for inst in [i for i in self.instances.values() if i.jit]:
            await self.unload(inst.instance_id)  # auto-evict: only one JIT model at a time
        return await self.load(key, jit=True)

    async def expire_idle(self) -> None:
        now = self.clock()
        for inst in list(self.instances.values()):
            if inst.ttl_s is not None and not inst.generations and \
                    now - inst.last_used_at >= inst.ttl_s:
                await self.unload(inst.instance_id)


def _touched(n_bytes: int) -> bytearray:
    """Allocate and write every page, so the host's available memory really drops."""
    buf = bytearray(n_bytes)
    buf[::PAGE_BYTES] = b"\x01" * len(range(0, n_bytes, PAGE_BYTES))
    return buf
