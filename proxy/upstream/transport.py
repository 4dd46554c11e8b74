"""How a backend protocol reaches its server: a `Transport` sends one HTTP exchange and returns
the project's `UpstreamResponse`; nothing of the HTTP client underneath crosses it.

Two implementations, chosen by `upstream.client`: `FastTransport` (fastclient.py, a pooled
httptools client) and `AiohttpTransport` (aiohttpclient.py). Both share what is here:

- `ErrorTable`, each transport's one mapping from its client's exceptions to the project's
  `UpstreamError`s, applied by `ErrorScope` (a `with` block, like httpx's
  `map_httpcore_exceptions()`) around connecting, sending, waiting for the head and every body
  read. An exception resolves to the row of the most specific class in its MRO, so the table
  has no order to get wrong; a class that inherits two mapped bases gets a row of its own.
  Anything unmapped (a cancel, a proxy error raised by an upload's source) passes unchanged.
- `Exchange`, the `async with` that opens an exchange through the circuit breaker: refused at
  once while it is open, a failure to reach the server counts against it, a head of any status
  closes it again.
"""
from __future__ import annotations

import abc
import ssl
from typing import TYPE_CHECKING, AsyncIterable, Callable, Mapping, Protocol

from ..errors import UpstreamError, UpstreamUnreachable
from .base import UpstreamResponse
from .breaker import CircuitBreaker

if TYPE_CHECKING:
    from ..config import UpstreamConfig

Body = bytes | AsyncIterable[bytes] | None
DEFAULT_SERVER = "the server"   # what errors call a server whose product is not known


class Transport(Protocol):
    base_url: str
    server: str          # what its errors call the server: "LM Studio", "Ollama", ...
    breaker: CircuitBreaker

    def request(self, method: str, path: str, headers: dict[str, str], body: Body, *,
                timeout_s: float | None = None) -> "Exchange":
        """`async with transport.request(...) as resp`. `headers` are sent as given (the
        transport frames the body); an async iterable body is sent chunked as it comes.
        `timeout_s` bounds the whole exchange in place of the silence bound, for calls that
        are silent while the server works (a load). Leaving the block before the body is read
        to its end, or with an exception, drops the connection."""
        ...

    async def close(self) -> None: ...


class ErrorTable:
    """A transport's exception classes → (UpstreamError class, message template). Templates
    may use {server} (its product: "LM Studio", "llama.cpp", ...), {url}, {what}
    ("METHOD /path") and {exc} (formatted by `detail`)."""

    def __init__(self, rows: Mapping[type[BaseException], tuple[type[UpstreamError], str]],
                 detail: Callable[[BaseException], object] = lambda exc: exc) -> None:
        self.rows = dict(rows)
        self.detail = detail
        self._resolved: dict[type, tuple[type[UpstreamError], str] | None] = {}

    def row(self, exc_type: type[BaseException]) -> tuple[type[UpstreamError], str] | None:
        try:
            return self._resolved[exc_type]
        except KeyError:
            found = next((self.rows[c] for c in exc_type.__mro__ if c in self.rows), None)
            self._resolved[exc_type] = found
            return found

    def map(self, exc: BaseException, url: str, what: str, server: str = DEFAULT_SERVER
            ) -> UpstreamError | None:
        """The project's error for `exc`, or None when the table does not map it."""
        if isinstance(exc, UpstreamError):
            return exc
        row = self.row(type(exc))
        if row is None:
            return None
        error, text = row
        return error(text.format(server=server, url=url, what=what, exc=self.detail(exc)))


class ErrorScope:
    """`with scope:` re-raises a transport failure as its UpstreamError (chained), and counts a
    failure to reach the server against the breaker. One per exchange; reused for each read."""
    __slots__ = ("table", "url", "method", "path", "breaker", "server")

    def __init__(self, table: ErrorTable, url: str, method: str, path: str,
                 breaker: CircuitBreaker, server: str = DEFAULT_SERVER) -> None:
        self.table, self.url, self.method, self.path = table, url, method, path
        self.breaker, self.server = breaker, server

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> bool:
        if exc is None or isinstance(exc, UpstreamError):
            return False
        mapped = self.table.map(exc, self.url, f"{self.method} {self.path}", self.server)
        if mapped is None:
            return False
        if isinstance(mapped, UpstreamUnreachable):
            self.breaker.failure(mapped.message)
        raise mapped from exc


class Exchange(abc.ABC):
    """The breaker and the error scope around opening an exchange, for every transport: a
    subclass implements `_open()` (connect, send, wait for the head) and `__aexit__`."""
    __slots__ = ("errors",)
    errors: ErrorScope   # set by the subclass's constructor

    async def __aenter__(self) -> UpstreamResponse:
        errors = self.errors
        errors.breaker.before()
        with errors:
            resp = await self._open()
        errors.breaker.success()
        return resp

    @abc.abstractmethod
    async def _open(self) -> UpstreamResponse: ...

    @abc.abstractmethod
    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: object) -> None: ...


def create_transport(config: "UpstreamConfig", client: str, breaker: CircuitBreaker, *,
                     url: str | None = None, server: str = DEFAULT_SERVER) -> Transport:
    """A transport to `url` (default `config.url`; pass it without credentials, since it is
    shown in errors) with the given client ("fast" or "aiohttp"); its errors call the server
    `server`. Call it with the event loop running."""
    tls = ssl.create_default_context(cafile=config.ca_file) if config.ca_file else None
    options = dict(connect_timeout_s=config.connect_timeout_s,
                   read_timeout_s=config.read_timeout_s, max_connections=config.max_connections,
                   ssl_context=tls, breaker=breaker, server=server)
    if client == "fast":
        from .fastclient import FastTransport
        return FastTransport(url or config.url, **options)
    if client == "aiohttp":
        from .aiohttpclient import AiohttpTransport
        return AiohttpTransport(url or config.url, **options)
    raise ValueError(f"unknown upstream client {client!r}")
