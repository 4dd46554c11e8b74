"""How RedisState (redis.py) calls Redis: a failure to reach it, or a refusal, becomes
StateUnavailable with the operator's remedy where Redis's own words leave it unclear; a cancel
that meets a blocking read's reply stays a cancel."""
from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

from redis.exceptions import (AuthenticationError, ConnectionError, OutOfMemoryError,
                               ResponseError, TimeoutError)

from ..errors import StateUnavailable

if TYPE_CHECKING:
    from .redis import RedisState

T = TypeVar("T")


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _hint(e: Exception) -> str:
    """What the operator can do about the failures Redis's own words leave unclear."""
    said = str(e)
    if isinstance(e, OutOfMemoryError):
        return ("; Redis refuses writes: it reached its maxmemory under maxmemory-policy "
                "noeviction. Raise maxmemory (the replicas' keys all expire by themselves)")
    if isinstance(e, AuthenticationError) or said.startswith(("NOAUTH", "WRONGPASS")):
        if "WRONGPASS" in said or "invalid username-password" in said:
            return "; the password (or user) in state.url is not the one Redis has"
        return ("; Redis requires a password: give it in state.url as "
                "redis://:PASSWORD@host:port/0 (or redis://USER:PASSWORD@...)")
    return ""


def _guarded(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(method)
    async def call(self: "RedisState", *args: Any, **kwargs: Any) -> T:
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            result = await method(self, *args, **kwargs)
        except (ConnectionError, TimeoutError, ResponseError, OSError) as e:
            raise StateUnavailable(f"shared state unavailable: Redis at {self.url_shown} "
                                   f"failed ({type(e).__name__}: {e}){_hint(e)}",
                                   retry_after_s=1.0) from e
        if task is not None and task.cancelling() > cancels:
            # redis-py finishes a blocking read (XREAD BLOCK) that a cancel interrupted and
            # returns its reply: the cancel is still this task's (else a loop reads on). One
            # delivered before the call (a cancelled task's cleanup) is not raised again.
            raise asyncio.CancelledError()
        return result
    return call
