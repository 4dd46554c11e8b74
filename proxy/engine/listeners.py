"""Engine events to subscribers. A listener is any object with some of these methods:

    on_request(record)                    a request finished (RequestRecord)
    on_state(model, old, new)             a status change (ModelStatus values)
    on_load(model, duration_s, ok)        a load finished or failed
    on_evict(model, reason, for_model)    an unload is about to start; for_model: the load it
                                          makes room for (reason: admission, pressure, idle,
                                          manual; backend: the server dropped it
                                          by itself)
    on_unload(model, reason)              an unload finished
    on_queue(model, waiting)              the number of requests waiting for a model changed
    on_queue_wait(model, seconds)         a load waited this long for admission
    on_memory(sample, level)              a memory sample was taken (level: pressure value)
    on_pressure(level)                    the pressure level changed (MemoryPressure)
    on_preload(model, why)                a speculative load started

A listener that raises is logged and skipped: it can never break an unload or a request.
Listeners are called synchronously and must not block.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger("proxy.engine")
EVENTS = ("on_request", "on_state", "on_load", "on_evict", "on_unload", "on_queue",
          "on_queue_wait", "on_memory", "on_pressure", "on_preload")


class Listeners:
    def __init__(self) -> None:
        self._hooks: dict[str, list[Callable[..., Any]]] = {e: [] for e in EVENTS}
        self.on_request = self._hooks["on_request"]   # the per-request fast path reads it

    def add(self, listener: Any) -> None:
        for event, hooks in self._hooks.items():
            hook = getattr(listener, event, None)
            if hook is not None:
                hooks.append(hook)

    def emit(self, event: str, *args: Any) -> None:
        for hook in self._hooks[event]:
            try:
                hook(*args)
            except Exception:
                log.exception("listener %r failed on %s; ignored", hook, event)
