"""Which host of a fleet the engine works for, named in its log lines: `host gpu-box: loaded
...`. Each host's engine is the same code, so the host travels as a context variable, set where
the fleet calls into one host's engine; the tasks that engine starts there (its admission,
loads, monitoring) inherit it. A single server sets none, and its lines are unchanged."""
from __future__ import annotations

import contextlib
import logging
from contextvars import ContextVar
from typing import Awaitable, Callable, Iterator, TypeVar

HOST: ContextVar[str | None] = ContextVar("proxy_engine_host", default=None)
LOGGERS = ("proxy.engine", "proxy.memory", "proxy.shared")


class HostTag(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        host = HOST.get()
        if host is not None and not getattr(record, "host", None):
            record.host = host
            record.msg = f"host {host}: {record.msg}"
        return True


_TAG = HostTag()


def install() -> None:
    """Tag the engine's loggers' lines (once; a logger keeps a filter added twice once)."""
    for name in LOGGERS:
        logging.getLogger(name).addFilter(_TAG)


@contextlib.contextmanager
def working_for(host: str) -> Iterator[None]:
    token = HOST.set(host)
    try:
        yield
    finally:
        HOST.reset(token)


T = TypeVar("T")


async def run_for(host: str, step: Callable[[], Awaitable[T]]) -> T:
    """`step` of one host's engine, and every task it starts, named in the log lines. (A
    task started outside — asyncio.gather's — takes the context of where it was started: the
    fleet calls each host's engine through this.)"""
    with working_for(host):
        return await step()
