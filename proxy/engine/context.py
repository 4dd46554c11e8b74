"""EngineContext: the parts every engine component shares, and the one way a status changes.

The core makes one context and hands it to each part (reconciler, evictor, loader, scheduler,
preloader) instead of the same half-dozen arguments to each.

    ctx.swap(e, expected, new) → bool

is the only status change. Like llama-swap's `swapState(expected, new)`, it first checks that
the model is still in the state the caller saw before its last await: if something else moved
it meanwhile (a request, the reconcile loop, another unload), nothing happens and it returns
False. Otherwise it applies the transition through the lifecycle table, bumps the reconcile
epoch (a model list already in flight is stale for this model), tells the listeners and wakes
the admission task, all here.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable, Iterable

from ..config import Config
from ..upstream.base import ModelBackend
from .accounting import Accounting
from .clock import Clock
from .learner import UsageLearner
from .lifecycle import ModelEntry, ModelStatus, transition
from .listeners import Listeners
from .monitor import MemoryMonitor
from .registry import Registry

if TYPE_CHECKING:
    from .shared import SharedHost


class EngineContext:
    def __init__(self, registry: Registry, monitor: MemoryMonitor, accounting: Accounting,
                 listeners: Listeners, clock: Clock, backend: ModelBackend,
                 learner: UsageLearner) -> None:
        self.registry = registry
        self.monitor = monitor
        self.accounting = accounting
        self.listeners = listeners
        self.clock = clock
        self.backend = backend
        self.learner = learner
        # What this replica shares with the others (engine/shared.py); None: it is alone.
        self.shared: SharedHost | None = None
        self.host_name: str | None = None        # its name in a fleet (None: one server)
        # ... and its config path there, "upstreams[<i>]": messages name its own keys.
        self.host_path: str | None = None
        # In a fleet: is the model resident or loading on another host? (Not preloaded here.)
        self.elsewhere: Callable[[str], bool] = lambda key: False
        self.status_epoch = 0                    # bumps on every status change
        self.status_epochs: dict[str, int] = {}  # model → epoch of its last change
        # The admission task's doorbell: rung by any change that may let a waiting load
        # proceed; `looked` is set again once it has looked at every pending load since.
        self.woken = asyncio.Event()
        self.looked = asyncio.Event()
        self.looked.set()

    @property
    def config(self) -> Config:
        return self.registry.config

    def swap(self, e: ModelEntry, expected: ModelStatus | Iterable[ModelStatus],
             new: ModelStatus) -> bool:
        """Move e from `expected` (one state or several) to `new`; False, and nothing
        changed, if e is no longer in an expected state. Raises IllegalTransition for a move
        the lifecycle table forbids: that is a bug, not a race."""
        if isinstance(expected, ModelStatus):
            if e.status is not expected:
                return False
        elif e.status not in expected:
            return False
        old = transition(e, new)
        self.status_epoch += 1
        self.status_epochs[e.key] = self.status_epoch
        self.listeners.emit("on_state", e.key, old.value, new.value)
        self.wake()
        return True

    def wake(self) -> None:
        """Something changed that may let a waiting load proceed (a status, a released lease,
        a departed client, new config): the admission task looks again."""
        self.woken.set()
        self.looked.clear()


class Part:
    """An engine part: the context's shared members under their own names."""

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.registry = ctx.registry
        self.monitor = ctx.monitor
        self.backend = ctx.backend
        self.accounting = ctx.accounting
        self.listeners = ctx.listeners
        self.clock = ctx.clock
        self.learner = ctx.learner
