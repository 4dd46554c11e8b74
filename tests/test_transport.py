"""The transport seam: each client's one error table, resolved by class and not by order, and
the time bounds of an exchange, on both transports over real loopback sockets."""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from proxy.config import UpstreamConfig
from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from proxy.upstream import aiohttpclient, fastclient, fastconn
from proxy.upstream.breaker import CircuitBreaker
from proxy.upstream.transport import ErrorTable, Transport, create_transport

from .test_upstream_conformance import Exchange, client, servers, upstream  # noqa: F401 (fixtures)

URL = "http://127.0.0.1:9"
WHAT = "POST /v1/chat/completions"


def test_a_class_under_two_mapped_bases_takes_its_mro_not_the_table_order():
    class Slow(Exception):
        pass

    class Broken(Exception):
        pass

    class SlowAndBroken(Slow, Broken):
        pass
    rows: list[tuple[type[BaseException], tuple[type[UpstreamError], str]]] = [
        (Slow, (UpstreamTimeout, "slow")), (Broken, (UpstreamError, "broken"))]
    for ordered in (rows, rows[::-1]):
        table = ErrorTable(dict(ordered))
        assert type(table.map(SlowAndBroken(), URL, WHAT)) is UpstreamTimeout
        assert table.map(ValueError(), URL, WHAT) is None    # unmapped: passes unchanged


@pytest.mark.parametrize("exc, expected", [
    (asyncio.TimeoutError(), UpstreamTimeout),
    # ClientError comes before TimeoutError in these MROs: a timeout all the same.
    (aiohttp.ServerTimeoutError("read"), UpstreamTimeout),
    (aiohttp.ConnectionTimeoutError("connect"), UpstreamTimeout),
    (aiohttp.SocketTimeoutError("sock_read"), UpstreamTimeout),
    (aiohttp.ServerDisconnectedError(), UpstreamError),
    (aiohttp.ClientPayloadError("cut"), UpstreamError),
    (aiohttp.ClientConnectionResetError("reset"), UpstreamError),
    (ConnectionResetError(), UpstreamError),
])
def test_aiohttp_errors(exc: BaseException, expected: type) -> None:
    mapped = aiohttpclient.ERRORS.map(exc, URL, WHAT)
    assert type(mapped) is expected
    assert URL in mapped.message


def test_aiohttp_connect_failures_are_unreachable_with_the_reason_alone():
    from aiohttp.client_reqrep import ConnectionKey
    key = ConnectionKey("127.0.0.1", 9, False, True, None, None, None)
    refused = ConnectionRefusedError(111, "Connection refused")
    for cls in (aiohttp.ClientConnectorError, aiohttp.ClientConnectorDNSError,
                aiohttp.ClientProxyConnectionError):
        mapped = aiohttpclient.ERRORS.map(cls(key, refused), URL, WHAT, "Ollama")
        assert type(mapped) is UpstreamUnreachable
        assert mapped.message == f"cannot reach Ollama at {URL}: Connection refused"


def test_every_failure_of_the_fast_client_has_its_own_row():
    failures = fastconn.FastClientError.__subclasses__()
    assert {c.__name__ for c in failures} == {"ConnectFailed", "ConnectTimeout", "ReadTimeout",
                                              "Disconnected", "ProtocolError"}
    for cls in failures:
        assert cls in fastclient.ERRORS.rows
    assert type(fastclient.ERRORS.map(fastconn.ReadTimeout("x"), URL, WHAT)) is UpstreamTimeout
    assert type(fastclient.ERRORS.map(fastconn.ConnectTimeout("x"), URL, WHAT)) \
        is UpstreamTimeout


@pytest.fixture
async def transport(client: str) -> AsyncIterator[Callable[..., Awaitable[Transport]]]:
    made: list[Transport] = []

    async def make(url: str, **config: Any) -> Transport:
        t = create_transport(UpstreamConfig(url=url, **config), client, CircuitBreaker())
        made.append(t)
        return t
    yield make
    for t in made:
        await t.close()


async def trickle(ex: Exchange) -> None:
    """An answer of 50 bytes, one every 0.1 s: never silent for long, whole after 5 s."""
    await ex.request()
    ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
    for _ in range(50):
        ex.writer.write(b"x")
        await asyncio.sleep(0.1)
    await ex.wait_closed_by_client()


async def test_an_exchange_timeout_bounds_the_whole_answer(servers, transport):
    srv = await servers(trickle)
    t = await transport(srv.url, read_timeout_s=1.0)
    with pytest.raises(UpstreamTimeout):
        async with t.request("POST", "/api/v1/models/load", {}, b"{}", timeout_s=0.5) as resp:
            await resp.read()


async def test_an_exchange_timeout_replaces_the_silence_bound(servers, transport):
    async def slow_load(ex: Exchange) -> None:
        await ex.request()
        await asyncio.sleep(0.5)                  # a load: silent while it works
        ex.answer(b'{"instance_id": "m"}')
        await ex.wait_closed_by_client()
    srv = await servers(slow_load)
    t = await transport(srv.url, read_timeout_s=0.2)
    async with t.request("POST", "/api/v1/models/load", {}, b"{}", timeout_s=5.0) as resp:
        assert await resp.read() == b'{"instance_id": "m"}'


async def test_a_management_call_that_goes_silent_is_a_timeout(servers, upstream):
    async def silent(ex: Exchange) -> None:
        await ex.request()
        await ex.wait_closed_by_client()
    srv = await servers(silent)
    up = await upstream(srv.url, read_timeout_s=0.2)
    async with asyncio.timeout(5):                # unbounded, it would hang: fail fast instead
        with pytest.raises(UpstreamTimeout):
            await up.list_models()
