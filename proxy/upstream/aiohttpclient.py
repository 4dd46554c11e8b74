"""The transport on aiohttp's ClientSession (`upstream.client: aiohttp`, and management calls
always): keep-alive pooling, TLS, DNS caching; no cookie jar, no decompression, no redirects."""
from __future__ import annotations

import asyncio
import io
import ssl

import aiohttp

from ..errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from .breaker import CircuitBreaker
from .transport import DEFAULT_SERVER, Body, ErrorScope, ErrorTable, Exchange

_LARGE_BODY_BYTES = 1024 * 1024   # aiohttp warns past this for a body given as bytes


def _detail(exc: BaseException) -> object:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return exc.os_error.strerror or exc   # "Connection refused", not the whole repr
    return exc


# Resolved by the exception's MRO (transport.py). aiohttp's timeouts derive from ClientError
# before TimeoutError, so ServerTimeoutError (and its ConnectionTimeoutError and
# SocketTimeoutError) needs its own row to stay a timeout.
ERRORS = ErrorTable({
    asyncio.TimeoutError: (UpstreamTimeout, "{server} at {url} went silent on {what}"),
    aiohttp.ServerTimeoutError: (UpstreamTimeout, "{server} at {url} went silent on {what}"),
    aiohttp.ClientConnectorError: (UpstreamUnreachable, "cannot reach {server} at {url}: {exc}"),
    aiohttp.ClientPayloadError: (UpstreamError, "{server} at {url} broke off {what}: {exc}"),
    aiohttp.ServerDisconnectedError: (UpstreamError,
                                      "{server} at {url} closed the connection on {what}"),
    aiohttp.ClientError: (UpstreamError, "{server} at {url} failed on {what}: {exc!r}"),
    ConnectionError: (UpstreamError, "{server} at {url} failed on {what}: {exc!r}"),
}, detail=_detail)


class AiohttpTransport:
    errors = ERRORS

    def __init__(self, url: str, *, connect_timeout_s: float, read_timeout_s: float,
                 max_connections: int, ssl_context: ssl.SSLContext | None = None,
                 breaker: CircuitBreaker | None = None, server: str = DEFAULT_SERVER) -> None:
        self.base_url = url.rstrip("/")
        self.server = server
        self.breaker = breaker or CircuitBreaker()
        self.connect_timeout_s = connect_timeout_s
        connector = aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=30,
                                         ttl_dns_cache=300, ssl=ssl_context or True)
        # sock_read bounds silence between bytes, not the length of a generation.
        timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s,
                                        sock_read=read_timeout_s)
        # No cookie jar (a relay must not keep upstream cookies, and it costs per request),
        # no decompression (bytes pass through as sent).
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout,
                                             auto_decompress=False,
                                             cookie_jar=aiohttp.DummyCookieJar())

    def request(self, method: str, path: str, headers: dict[str, str], body: Body, *,
                timeout_s: float | None = None) -> "_Exchange":
        return _Exchange(self, method, path, headers, body, timeout_s)

    async def close(self) -> None:
        await self.session.close()


class _Exchange(Exchange):
    __slots__ = ("transport", "method", "path", "headers", "body", "timeout_s", "resp")

    def __init__(self, transport: AiohttpTransport, method: str, path: str,
                 headers: dict[str, str], body: Body, timeout_s: float | None) -> None:
        self.errors = ErrorScope(transport.errors, transport.base_url, method, path,
                                 transport.breaker, transport.server)
        self.transport, self.method, self.path = transport, method, path
        self.headers, self.body, self.timeout_s = headers, body, timeout_s
        self.resp: aiohttp.ClientResponse | None = None

    async def _open(self) -> "AiohttpResponse":
        t = self.transport
        body = self.body
        if isinstance(body, bytes) and len(body) > _LARGE_BODY_BYTES:
            body = io.BytesIO(body)   # aiohttp sends it in pieces instead of warning
        if self.timeout_s is None:   # the session's connect and silence bounds
            resp = await t.session.request(self.method, t.base_url + self.path,
                                           headers=self.headers, data=body,
                                           allow_redirects=False)
        else:
            resp = await t.session.request(
                self.method, t.base_url + self.path, headers=self.headers, data=body,
                allow_redirects=False, timeout=aiohttp.ClientTimeout(
                    total=self.timeout_s, connect=t.connect_timeout_s))
        self.resp = resp
        return AiohttpResponse(resp, self.errors)

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: object) -> None:
        assert self.resp is not None
        if exc_type is None:
            self.resp.release()
        else:
            self.resp.close()  # drop the connection: the upstream stops generating for nobody


class AiohttpResponse:
    """The project's UpstreamResponse over aiohttp's: every read in the exchange's scope."""
    __slots__ = ("_resp", "_read", "status", "headers", "_errors")

    def __init__(self, resp: aiohttp.ClientResponse, errors: ErrorScope) -> None:
        self._resp = resp
        self._read = resp.content.readany
        self.status = resp.status
        self.headers = resp.headers
        self._errors = errors

    async def read(self) -> bytes:
        with self._errors:
            return await self._resp.read()

    def chunks(self) -> "AiohttpResponse":
        return self

    def __aiter__(self) -> "AiohttpResponse":
        return self

    async def __anext__(self) -> bytes:
        with self._errors:
            data = await self._read()
        if not data:
            raise StopAsyncIteration
        return data
