"""The state of an emulated llama.cpp router: its models, their statuses, its own LRU.

As the real router does: a load answers at once and completes later (`loading` → `loaded`, or
back to `unloaded` with `failed` and an exit code for a broken file); beyond `models_max`
loaded models (0: no limit) a load first unloads the least recently used idle one, even when
the new one then fails; a model that is serving is never unloaded for it.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .catalog import CatalogModel

_PORTS = itertools.count(41000)


@dataclass
class RouterModel:
    spec: CatalogModel
    path: str
    status: str = "unloaded"          # unloaded | loading | loaded
    failed: bool = False
    exit_code: int | None = None
    port: int | None = None
    busy: int = 0                     # requests being served
    last_used_s: float = 0.0
    task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def running(self) -> bool:
        return self.status in ("loading", "loaded")


class RouterState:
    def __init__(self, catalog: list[CatalogModel], *, models_max: int = 4,
                 autoload: bool = True, load_time_scale: float = 0.0,
                 broken: frozenset[str] = frozenset(), models_dir: Path | None = None) -> None:
        self.models_max = models_max
        self.autoload = autoload
        self.load_time_scale = load_time_scale
        self.broken = set(broken)
        self.models: dict[str, RouterModel] = {}
        for spec in catalog:
            path = f"/models/{spec.key.replace('/', '_')}.gguf"
            if models_dir is not None:   # a sparse file of the model's size, as on disk
                file = models_dir / Path(path).name
                with open(file, "wb") as f:
                    f.truncate(spec.size_bytes)
                path = str(file)
            self.models[spec.key] = RouterModel(spec, path)
        self.subscribers: set[asyncio.Queue] = set()
        self.loads: list[str] = []        # every load the router started, for tests
        self.lru_evictions: list[str] = []

    # -- loading and unloading ---------------------------------------------------------------
    def start_load(self, key: str) -> None:
        """Begin a load (the caller checked it is known and not running)."""
        m = self.models[key]
        self._make_room(key)
        m.status, m.failed, m.exit_code = "loading", False, None
        self.loads.append(key)
        self._event(m, {"value": "loading"})
        m.task = asyncio.create_task(self._finish_load(m))

    async def _finish_load(self, m: RouterModel) -> None:
        await asyncio.sleep(m.spec.load_time_s * self.load_time_scale)
        if m.status != "loading":
            return
        if m.key in self.broken:
            m.status, m.failed, m.exit_code = "unloaded", True, 1
            self._event(m, {"value": "unloaded", "exit_code": 1})
            return
        m.status, m.port, m.last_used_s = "loaded", next(_PORTS), time.monotonic()
        self._event(m, {"value": "loaded"})

    async def wait_loaded(self, key: str) -> bool:
        m = self.models[key]
        if m.task is not None:
            await asyncio.shield(m.task)
        return m.status == "loaded"

    def unload(self, key: str) -> None:
        m = self.models[key]
        if m.task is not None and not m.task.done():
            m.task.cancel()
        m.status, m.port = "unloaded", None
        self._event(m, {"value": "unloaded", "exit_code": 0})

    def _make_room(self, key: str) -> None:
        if self.models_max <= 0:
            return
        running = [m for m in self.models.values() if m.running and m.key != key]
        idle = sorted((m for m in running if m.busy == 0 and m.status == "loaded"),
                      key=lambda m: m.last_used_s)
        while len(running) >= self.models_max and idle:
            victim = idle.pop(0)
            running.remove(victim)
            self.lru_evictions.append(victim.key)
            self.unload(victim.key)

    def restart(self) -> None:
        """The router was killed and started again: every model is unloaded."""
        for key, m in self.models.items():
            if m.running:
                self.unload(key)
            m.failed, m.exit_code = False, None

    # -- views -------------------------------------------------------------------------------
    def entry(self, m: RouterModel) -> dict[str, Any]:
        args = ["llama-server", "--host", "127.0.0.1", "--port", str(m.port or 0),
                "-m", m.path, "--alias", m.key, "-c", "512"]
        if m.spec.type == "embedding":
            args.append("--embeddings")
        status: dict[str, Any] = {"value": m.status, "args": args, "preset": ""}
        if m.failed:
            status.update(failed=True, exit_code=m.exit_code)
        out: dict[str, Any] = {"id": m.key, "aliases": [], "tags": [], "object": "model",
                               "owned_by": "llamacpp", "created": 0, "status": status,
                               "architecture": m.spec.architecture, "source": "models_dir",
                               "can_remove": False}
        if m.status == "loaded":
            out["meta"] = {"vocab_type": 2, "n_vocab": 256, "n_ctx_train": 512,
                           "n_embd": 64, "n_params": m.spec.size_bytes // 4,
                           "size": m.spec.size_bytes}
        return out

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self.subscribers.add(q)
        return q

    def _event(self, m: RouterModel, status: dict[str, Any]) -> None:
        event = {"model": m.key, "event": "model_status", "data": {"status": status}}
        for q in self.subscribers:
            q.put_nowait(event)
