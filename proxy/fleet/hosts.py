"""One host of a fleet: its engine (an EngineCore of its own, as for a single server), its
backend, and the configuration that engine sees — the fleet's, narrowed to this host.

A host's engine reads a Config like any other: `upstream` is this host, `memory` its budget (or
this machine's), its own history database, and the pins and priorities that name another host
dropped. `host_config()` builds it; every reload rebuilds it for each host.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
from pathlib import Path

from typing import Any

from ..config import Config, HostConfig, ModelConfig, UpstreamConfig
from ..engine.core import EngineCore
from ..engine.listeners import EVENTS
from ..engine.lifecycle import ModelEntry, ModelStatus
from ..errors import ModelNotFound
from ..liveconfig import LiveConfig
from ..store import default_path
from ..upstream.base import Upstream

S = ModelStatus
_UPSTREAM_FIELDS = tuple(f.name for f in dataclasses.fields(UpstreamConfig))
_DEFAULT_MODEL = ModelConfig()


def host_upstream(h: HostConfig) -> UpstreamConfig:
    """The host as a single upstream (its token read from the environment if so configured)."""
    values = {name: getattr(h, name) for name in _UPSTREAM_FIELDS}
    if h.api_token_env:
        values["api_token"] = os.environ.get(h.api_token_env) or None
    return UpstreamConfig(**values)


def host_storage_path(config: Config, name: str) -> Path:
    """Each host learns its own footprints and load times: one history file per host."""
    base = Path(config.storage.path) if config.storage.path else default_path()
    return base.with_name(f"{base.stem}.{name}{base.suffix}")


def host_config(config: Config, h: HostConfig) -> Config:
    memory = config.memory
    if h.budget() is not None:
        memory = dataclasses.replace(memory, sampler="budget", budget_gb=h.budget())
    elif h.sampler in ("local", "auto"):
        memory = dataclasses.replace(memory, sampler="local")
    models = {key: m if m.host in (None, h.name) else
              dataclasses.replace(m, pinned=False, priority=_DEFAULT_MODEL.priority)
              for key, m in config.models.items()}
    storage = dataclasses.replace(config.storage, path=str(host_storage_path(config, h.name)))
    return dataclasses.replace(config, upstream=host_upstream(h), upstreams=(), memory=memory,
                               models=models, storage=storage)


class Host:
    """A server of the fleet and its engine. `suspect` is set when a request could not reach
    it; it takes traffic again once its engine has reconciled with it."""

    def __init__(self, config: HostConfig, core: EngineCore, backend: Upstream,
                 live: LiveConfig) -> None:
        self.name = config.name
        self.config = config
        self.core = core
        self.backend = backend
        self.live = live
        self.suspect = False
        self._breaker = getattr(backend, "breaker", None)
        self._allowed: dict[str, bool] = {}   # model → may it hold it (its patterns decide)
        self._lost: asyncio.Future[None] | None = None
        core.reconciler.on_down = self.lose

    def lost(self) -> asyncio.Future[None]:
        """Done when this host is next counted down (at once while it is down): a request
        still waiting for its answer goes to another host rather than wait read_timeout_s."""
        f = self._lost
        if f is None or f.done():
            f = self._lost = asyncio.get_running_loop().create_future()
            if not self.up:
                f.set_result(None)
        return f

    def lose(self) -> None:
        """Its reconcile's look failed: it is counted down."""
        f = self._lost
        if f is not None and not f.done():
            f.set_result(None)

    @property
    def up(self) -> bool:
        breaker = self._breaker
        return self.core.reconciler.upstream_ok and not self.suspect and \
            (breaker is None or not breaker.open)

    def down_reason(self) -> str:
        """Why it is down, for the answers that name it."""
        if not self.core.reconciler.upstream_ok:
            return self.core.upstream_error or "its model list did not answer"
        if self._breaker is not None and self._breaker.open:
            return f"{self._breaker.last_error} (its circuit breaker is open)"
        return "a request could not reach it; set aside until it answers again"

    def allows(self, key: str) -> bool:
        if self.config.models is None:
            return True
        allowed = self._allowed.get(key)
        if allowed is None:
            allowed = self._allowed[key] = self.config.allows(key)
        return allowed

    def reconfigure(self, config: HostConfig) -> None:
        self.config = config
        self._allowed.clear()

    def entry(self, key: str) -> ModelEntry | None:
        """The model as this host holds it, if the host lists it and may hold it."""
        e = self.core.registry.entries.get(key)
        return e if e is not None and self.allows(key) else None

    def not_holding(self, key: str) -> ModelNotFound:
        """Why `entry(key)` is None: its `models:` patterns exclude it, or it is not listed."""
        why = (f"may not hold '{key}' (its models: {', '.join(self.config.models or ())})"
               if not self.allows(key) else f"does not list '{key}'")
        return ModelNotFound(f"Host '{self.name}' {why}", param="model")

    # -- what is resident here: the one answer every view of the fleet reads -----------------
    def status(self, e: ModelEntry) -> ModelStatus:
        """The model's state on this host as the fleet counts it: while the host is down
        nothing is resident there (its engine keeps the entry; the host's return reconciles
        it with what the server still has)."""
        return S.UNLOADED if e.status is S.LOADED and not self.up else e.status

    def shown_state(self, e: ModelEntry) -> str:
        """Its state here as the views show it (`unknown` where the server does not say)."""
        status = self.status(e)
        return self.core.state_of(e) if status is e.status else status.value

    def resident(self, key: str) -> bool:
        e = self.entry(key)
        return e is not None and e.status is S.LOADED and self.up

    def loaded_models(self) -> list[str]:
        """The models resident here that it may hold; none while it is down."""
        if not self.up:
            return []
        return [k for k in self.core.loaded_models() if self.allows(k)]


class HostTagged:
    """A listener of the fleet, subscribed to one host's engine: each event is passed on with
    `host=` when the listener takes it (it says so with `takes_host = True`)."""

    def __init__(self, listener: Any, host: str) -> None:
        tags = getattr(listener, "takes_host", False)
        for event in EVENTS:
            hook = getattr(listener, event, None)
            if hook is not None:
                # partial: the tag is added without a Python frame (on_request: every request)
                setattr(self, event, functools.partial(hook, host=host) if tags else hook)
