"""The original design's integration API: make a model resident around any async call.

- `ModelMemoryMiddleware(manager)`: an aiohttp middleware (`web.Application(middlewares=
  [mw.aiohttp])`, the model named by `X-Model` or `?model=`) and a plain pipeline step
  (`await mw(context, handler)`, the model in `context["model"]`).
- `CognitiveModelIntegrator(manager)`: wraps an object's async method
  (`integrate_with_kernel(kernel)`, `integrate_with_strategist(strategist)`) so that the model
  is ensured before each call and its usage recorded after.
- `create_model_memory_manager(...)`: an async factory, started and monitoring.

Around each call: a USE lease on the model (loading it first, never evicted while the call
runs), then the latency, success and tokens (from a result's `usage` when it has one) are
recorded against the model. In aiohttp, a model that cannot be had is answered as the proxy
answers it (its status, OpenAI's error body), a request with no route never loads the model,
and a 4xx (the client's mistake) is not recorded at all: only a 5xx is the model's failure.
"""
from __future__ import annotations

import asyncio
import functools
import time
from typing import Any, Awaitable, Callable, Mapping

from aiohttp import web

from ..engine.usage import CLIENT_CLOSED, RequestRecord
from ..errors import ProxyError
from .manager import ModelMemoryManager

Handler = Callable[[Mapping[str, Any]], Awaitable[Any]]


async def create_model_memory_manager(**kwargs: Any) -> ModelMemoryManager:
    """A ModelMemoryManager, connected and monitoring; close it with `await m.cleanup()`."""
    manager = ModelMemoryManager(**kwargs)
    await manager.start()
    await manager.start_monitoring()
    return manager


def _tokens(result: Any) -> tuple[int, int]:
    usage = result.get("usage") if isinstance(result, Mapping) else getattr(result, "usage",
                                                                             None)
    if isinstance(usage, Mapping):
        get = usage.get
    elif usage is not None:
        def get(name: str, default: Any = 0) -> Any:
            return getattr(usage, name, default)
    else:
        return 0, 0
    prompt, completion = get("prompt_tokens", 0) or 0, get("completion_tokens", 0) or 0
    return (prompt if isinstance(prompt, int) else 0,
            completion if isinstance(completion, int) else 0)


class _Use:
    """One use of a model: lease, time, record."""

    def __init__(self, manager: ModelMemoryManager, model: str, source: str) -> None:
        self.manager, self.model, self.source = manager, model, source

    async def run(self, call: Callable[[], Awaitable[Any]],
                  status_of: Callable[[Any], int] | None = None,
                  refused: Callable[[ProxyError], Any] | None = None) -> Any:
        """`status_of`: the outcome of a result; `refused`: the answer instead of the call
        when the model cannot be had (else the ProxyError is raised)."""
        m = self.manager
        try:
            lease = await m.acquire(self.model)
        except ProxyError as exc:
            if refused is None:
                raise
            return refused(exc)
        started = time.perf_counter()
        result, status = None, 500
        try:
            result = await call()
            status = 200 if status_of is None else status_of(result)
            return result
        except asyncio.CancelledError:
            status = CLIENT_CLOSED        # its caller gave up: no failure of the model's
            raise
        except web.HTTPException as exc:  # an answer raised (aiohttp's way): its status
            status = exc.status
            raise
        finally:
            lease.release()
            # A 4xx refused the client's request: neither a use of the model nor its failure
            # (as the proxy does not count its own refusals of a request).
            if status == CLIENT_CLOSED or not 400 <= status < 500:
                ok = status < 400
                prompt, completion = _tokens(result) if ok else (0, 0)
                m.record(RequestRecord(model=lease.model, ok=ok,
                                       latency_s=time.perf_counter() - started,
                                       at_s=m.clock.now(), endpoint=self.source,
                                       status=status, prompt_tokens=prompt,
                                       completion_tokens=completion))


def _status(response: web.StreamResponse) -> int:
    return response.status


def _refusal(exc: ProxyError) -> web.Response:
    """The engine's refusal as the proxy answers it: its status, OpenAI's error body."""
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers())


class ModelMemoryMiddleware:
    def __init__(self, manager: ModelMemoryManager, *,
                 model_of: Callable[[web.Request], str | None] | None = None) -> None:
        self.manager = manager
        self._model_of = model_of or (lambda r: r.headers.get("X-Model") or
                                      r.query.get("model"))

    async def __call__(self, context: Mapping[str, Any], handler: Handler) -> Any:
        model = context.get("model")
        if not isinstance(model, str) or not model:
            return await handler(context)     # nothing to make resident
        return await _Use(self.manager, model, "middleware").run(lambda: handler(context))

    @property
    def aiohttp(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        @web.middleware
        async def middleware(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                             ) -> web.StreamResponse:
            model = self._model_of(request)
            # No route (404) or no such method on it (405): nothing to load the model for.
            if not model or request.match_info.http_exception is not None:
                return await handler(request)
            return await _Use(self.manager, model, "middleware").run(
                lambda: handler(request), _status, _refusal)
        return middleware


class CognitiveModelIntegrator:
    def __init__(self, manager: ModelMemoryManager) -> None:
        self.manager = manager

    def integrate_with_kernel(self, kernel: Any, *, model: str, method: str = "process"
                              ) -> Any:
        return self._wrap(kernel, method, model, "kernel")

    def integrate_with_strategist(self, strategist: Any, *, model: str, method: str = "plan"
                                  ) -> Any:
        return self._wrap(strategist, method, model, "strategist")

    def _wrap(self, obj: Any, method: str, model: str, role: str) -> Any:
        original = getattr(obj, method)
        manager = self.manager

        @functools.wraps(original)
        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            return await _Use(manager, model, role).run(lambda: original(*args, **kwargs))
        setattr(obj, method, wrapped)
        return obj
