"""The streamable HTTP transport at /mcp as a door of the proxy: where the tools' calls go (the
proxy itself, never a name the client puts in Host), which key they carry (the one the door
took), how the body is taken in (the /v1 intake: deadline, size limit, encodings), and when the
event stream's headers leave."""
from __future__ import annotations

import asyncio
import gzip
from typing import Any, AsyncIterator

import orjson
import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.mcp.http import mount_mcp, own_url
from proxy.config import ServerConfig
from proxy.server import intake
from proxy.server.asgi import mount
from proxy.server.serving import Served, serve

from .conftest import Proxy, proxy_config
from .test_auth import ADMIN, ALICE, AUTH, MODEL, bearer
from .test_hostile import raw_request
from .test_mcp import call, http_session

ACCEPT = "application/json, text/event-stream"


@pytest.fixture
async def make_mcp_proxy(emulator) -> AsyncIterator[Any]:
    """`make(**overrides)`: a proxy serving /mcp as `python -m proxy` does."""
    started: list[Proxy] = []

    async def make(**overrides: Any) -> Proxy:
        app = create_app(proxy_config(emulator.url, **overrides))
        mount_mcp(app)
        started.append(Proxy(await serve(app), app))
        return started[-1]

    yield make
    for proxy in started:
        await proxy.served.close()


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Served, list[str]]]:
    """Another local service: it records every request and answers JSON of its own."""
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path} {request.headers.get('Authorization')}")
        return web.json_response({"object": "list", "data": [{"model": "NOT-THE-PROXY"}]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    served = await serve(app)
    yield served, seen
    await served.close()


def tool_call(tool: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments or {}}}


async def post_mcp(http, proxy: Proxy, message: Any, headers: dict[str, str]) -> Any:
    async with http.post(f"{proxy.url}/mcp", json=message,
                         headers={"Accept": ACCEPT, **headers}) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json())["result"]


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost", "attacker.invalid:{port}"])
async def test_tools_call_the_proxy_itself_whatever_host_names(make_mcp_proxy, recorder, http,
                                                              host):
    """A Host naming another local service (allowed: a loopback name), a bare `localhost`
    (port 80 is nobody), any name once allowed_hosts is `*`: the calls reach the proxy."""
    served, seen = recorder
    host = host.format(port=served.port)
    proxy = await make_mcp_proxy(**AUTH, **{"server.allowed_hosts": ["*"]})
    listed = await post_mcp(http, proxy, tool_call("list_models"),
                            {"Host": host, **bearer(ALICE)})
    assert not listed["isError"], listed["content"][0]["text"]
    assert MODEL in [r["model"] for r in listed["structuredContent"]["data"]]
    stats = await post_mcp(http, proxy, tool_call("memory_stats"),
                           {"Host": host, **bearer(ALICE)})
    assert not stats["isError"] and "memory_pressure" in stats["structuredContent"]
    unloaded = await post_mcp(http, proxy, tool_call("unload_model", {"model": "fast"}),
                              {"Host": host, **bearer(ADMIN)})
    assert not unloaded["isError"], unloaded["content"][0]["text"]
    assert unloaded["structuredContent"]["model"] == MODEL
    assert seen == []


@pytest.mark.parametrize("accepted_on, listen, url", [
    (("127.0.0.1", 8080), "127.0.0.1", "http://127.0.0.1:8080"),
    (("192.168.1.5", 8080), "0.0.0.0", "http://127.0.0.1:8080"),
    (("::ffff:192.168.1.5", 8080), "::", "http://127.0.0.1:8080"),
    (("2001:db8::5", 8080), "::", "http://[::1]:8080"),
    (("::1", 8080), "::", "http://[::1]:8080"),
    (("192.168.1.5", 8080), "192.168.1.5", "http://192.168.1.5:8080"),
    (("fe80::1%eth0", 8080), "fe80::1%eth0", "http://[fe80::1%25eth0]:8080")])
def test_the_tools_address_is_the_listening_one(accepted_on, listen, url):
    """Bound to every address, the calls stay on loopback; bound to one, they go to it."""
    assert own_url(accepted_on, listen) == url


async def test_the_tools_use_the_key_the_door_took_from_x_api_key(make_mcp_proxy):
    proxy = await make_mcp_proxy(**AUTH)
    async with http_session(proxy.url, None, {"x-api-key": ALICE}) as session:
        assert MODEL in [r["model"] for r in (await call(session, "list_models"))["data"]]
        models = await session.read_resource("proxy://models")
    assert MODEL in [r["model"] for r in orjson.loads(models.contents[0].text)["data"]]


async def test_a_trickling_mcp_body_gets_408(make_mcp_proxy):
    proxy = await make_mcp_proxy(**{"server.body_timeout_s": 0.3})
    head = (b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Accept: application/json, text/event-stream\r\nContent-Length: 1000\r\n\r\n")
    async with asyncio.timeout(10):   # without the deadline it never answers
        status, rest = await raw_request(proxy.url, head, b"{")
    assert status.startswith(b"HTTP/1.1 408"), status
    assert orjson.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"


async def test_an_mcp_body_is_held_to_the_size_limit(make_mcp_proxy, http):
    proxy = await make_mcp_proxy(**{"server.max_body_bytes": 1024})
    padded = {**tool_call("list_models"), "pad": "x" * 2048}
    async with http.post(f"{proxy.url}/mcp", json=padded, headers={"Accept": ACCEPT}) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "request_too_large"


async def test_a_gzip_mcp_body_is_decoded(make_mcp_proxy, http):
    proxy = await make_mcp_proxy()
    body = gzip.compress(orjson.dumps(tool_call("list_models")))
    async with http.post(f"{proxy.url}/mcp", data=body, headers={
            "Accept": ACCEPT, "Content-Type": "application/json",
            "Content-Encoding": "gzip"}) as resp:
        assert resp.status == 200, await resp.text()
        listed = (await resp.json())["result"]
    assert MODEL in [r["model"] for r in listed["structuredContent"]["data"]]


async def test_the_event_streams_headers_leave_at_once(make_mcp_proxy, http):
    """GET /mcp opens the server's event stream: its headers must not wait for the first
    event (the SDK's first ping comes after 15 s)."""
    proxy = await make_mcp_proxy()
    async with asyncio.timeout(5):
        async with http.get(f"{proxy.url}/mcp", headers={"Accept": "text/event-stream"}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")


async def test_a_decoded_body_reaches_the_app_described_as_decoded(http):
    """Through `mount` with the intake, a gzip body reaches the ASGI app decoded, with no
    Content-Encoding and the decoded body's Content-Length (an app reading either would
    otherwise decode it again or cut it)."""
    async def echo(scope: dict, receive: Any, send: Any) -> None:
        body = (await receive())["body"]
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": orjson.dumps(
            {"body": body.decode(), "headers": headers})})

    app = web.Application()
    mount(app, "/echo", echo, read_body=lambda r: intake.read_body(r, ServerConfig()))
    served = await serve(app)
    try:
        plain = b'{"hello": "world"}' * 10
        async with http.post(f"{served.url}/echo", data=gzip.compress(plain), headers={
                "Content-Type": "application/json", "Content-Encoding": "gzip"}) as resp:
            assert resp.status == 200
            seen = await resp.json()
    finally:
        await served.close()
    assert seen["body"] == plain.decode()
    assert "content-encoding" not in seen["headers"]
    assert seen["headers"]["content-length"] == str(len(plain))
    assert seen["headers"]["content-type"] == "application/json"
