"""The MCP server, driven by the MCP SDK's own client against a running proxy with client keys
and an admin token, over both transports: stdio (`python -m proxy mcp --url`) and streamable
HTTP at /mcp on the proxy's own port. Every tool, the resources, the refusals."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from proxy.app import create_app
from proxy.mcp.http import mount_mcp
from proxy.server.serving import serve

from .conftest import Proxy, proxy_config
from .test_auth import ADMIN, ALICE, AUTH, BOB, MODEL, bearer

ROOT = Path(__file__).resolve().parent.parent
TOOLS = {"list_models", "load_model", "unload_model", "pin_model", "unpin_model",
         "memory_stats", "recommend_model", "optimize_memory", "model_stats"}
CHANGES = [("load_model", {"model": MODEL}, "load a model"),
           ("unload_model", {"model": MODEL}, "unload a model"),
           ("pin_model", {"model": MODEL}, "pin a model"),
           ("unpin_model", {"model": MODEL}, "unpin a model"),
           ("optimize_memory", {}, "optimize memory")]


@pytest.fixture
async def guarded(emulator) -> AsyncIterator[Proxy]:
    """A proxy with keys and an admin token, serving MCP at /mcp as `python -m proxy` does."""
    app = create_app(proxy_config(emulator.url, **AUTH))
    mount_mcp(app)
    proxy = Proxy(await serve(app), app)
    yield proxy
    await proxy.served.close()


@contextlib.asynccontextmanager
async def stdio_session(url: str, key: str | None) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "proxy", "mcp", "--url", url, *(["--api-key", key] if key else [])],
        cwd=str(ROOT), env={k: v for k, v in os.environ.items() if k != "PROXY_API_KEY"})
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


@contextlib.asynccontextmanager
async def http_session(url: str, key: str | None,
                       headers: dict[str, str] | None = None) -> AsyncIterator[ClientSession]:
    """`headers` instead of `Authorization: Bearer <key>` when given."""
    sent = headers or (bearer(key) if key else None)
    async with create_mcp_http_client(headers=sent) as http, \
            streamable_http_client(f"{url}/mcp", http_client=http) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        yield session


@pytest.fixture(params=["stdio", "http"])
def mcp_client(request):
    """`mcp_client(proxy_url, key)`: a session over the transport the test runs with."""
    return {"stdio": stdio_session, "http": http_session}[request.param]


async def call(session: ClientSession, tool: str, args: dict[str, Any] | None = None) -> Any:
    result = await session.call_tool(tool, args or {})
    assert not result.is_error, result.content[0].text
    return result.structured_content


async def refused(session: ClientSession, tool: str, args: dict[str, Any]) -> str:
    result = await session.call_tool(tool, args)
    assert result.is_error, f"{tool} was not refused: {result.structured_content}"
    return result.content[0].text


async def get(http, url: str, path: str, key: str = ADMIN) -> Any:
    async with http.get(url + path, headers=bearer(key)) as resp:
        assert resp.status == 200
        return await resp.json()


async def row(http, url: str) -> dict[str, Any]:
    models = await get(http, url, "/proxy/models")
    return next(r for r in models["data"] if r["model"] == MODEL)


async def test_tools_have_schemas_and_descriptions(guarded, mcp_client):
    async with mcp_client(guarded.url, ALICE) as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description and len(tool.description) > 40, tool.name
        assert "\n" not in tool.description and "  " not in tool.description, tool.name
        assert tool.input_schema["type"] == "object"
    for name in ("load_model", "unload_model", "pin_model", "unpin_model", "model_stats"):
        assert tools[name].input_schema["required"] == ["model"], name
    rec = tools["recommend_model"].input_schema["properties"]
    assert set(rec) == {"task", "complexity", "urgency"}
    assert rec["complexity"]["maximum"] == rec["urgency"]["maximum"] == 1.0
    assert tools["list_models"].annotations.read_only_hint is True
    assert tools["load_model"].annotations.read_only_hint is False


async def test_every_tool_with_the_admin_token(guarded, emulator, http, mcp_client):
    url = guarded.url
    async with mcp_client(url, ADMIN) as session:
        listed = await call(session, "list_models")
        assert MODEL in [r["model"] for r in listed["data"]]
        assert "memory_pressure" in listed and "queue_length" in listed

        loaded = await call(session, "load_model", {"model": MODEL, "priority": 7})
        assert loaded == {"model": MODEL, "state": "loaded"}
        assert emulator.state.instances_of(MODEL)
        assert (await row(http, url))["priority"] == 7

        assert await call(session, "pin_model", {"model": MODEL}) == \
            {"model": MODEL, "pinned": True}
        assert (await row(http, url))["pinned"] is True
        assert await call(session, "unpin_model", {"model": MODEL}) == \
            {"model": MODEL, "pinned": False}
        assert (await row(http, url))["pinned"] is False

        stats = await call(session, "model_stats", {"model": "fast"})   # an alias
        assert stats["model"] == MODEL and stats["row"]["state"] == "loaded"
        unknown = await refused(session, "model_stats", {"model": "no/such"})
        assert "unknown model 'no/such'" in unknown and MODEL in unknown

        memory = await call(session, "memory_stats")
        direct = await get(http, url, "/proxy/stats")
        assert memory["policy"] == direct["policy"]
        assert memory["memory_pressure"] == direct["memory_pressure"]
        assert MODEL in memory["models"]

        rec = await call(session, "recommend_model",
                         {"task": "coding", "complexity": 0.9, "urgency": 0.1})
        direct = await get(http, url, "/proxy/recommendations?task_type=coding"
                                      "&complexity=0.9&urgency=0.1")
        assert rec == direct
        assert rec["complexity"] == 0.9 and rec["urgency"] == 0.1
        bad = await session.call_tool("recommend_model", {"complexity": 2})
        assert bad.is_error

        optimized = await call(session, "optimize_memory")
        assert set(optimized) == {"unloaded_idle", "evicted_for_pressure", "memory_pressure"}
        assert optimized["memory_pressure"] == memory["memory_pressure"]

        unloaded = await call(session, "unload_model", {"model": MODEL})
        assert unloaded["unloaded"] is True and unloaded["state"] != "loaded"
        assert not emulator.state.instances_of(MODEL)


async def test_resources_are_the_model_list_and_the_health_report(guarded, http, mcp_client):
    async with mcp_client(guarded.url, ALICE) as session:
        uris = {str(r.uri) for r in (await session.list_resources()).resources}
        assert uris == {"proxy://models", "proxy://health"}
        models = await session.read_resource("proxy://models")
        health = await session.read_resource("proxy://health")
    assert json.loads(models.contents[0].text) == await get(http, guarded.url, "/proxy/models")
    assert json.loads(health.contents[0].text)["status"] == \
        (await get(http, guarded.url, "/proxy/health"))["status"]


async def test_a_client_key_reads_but_may_not_change_state(guarded, emulator, http,
                                                          mcp_client):
    async with mcp_client(guarded.url, ALICE) as session:
        assert MODEL in [r["model"] for r in (await call(session, "list_models"))["data"]]
        await call(session, "memory_stats")
        for tool, args, action in CHANGES:
            text = await refused(session, tool, args)
            assert f"admin token required to {action}: This action needs the admin token" \
                in text, text
    assert not emulator.state.instances_of(MODEL)
    assert (await row(http, guarded.url))["pinned"] is False


async def test_a_missing_or_wrong_key_is_named(guarded):
    async with stdio_session(guarded.url, "sk-wrong") as session:
        text = await refused(session, "list_models", {})
        assert "API key refused, cannot list models (invalid_api_key): Invalid API key" \
            in text, text
    async with stdio_session(guarded.url, None) as session:
        text = await refused(session, "load_model", {"model": MODEL})
        assert "Missing API key" in text, text
        assert text.endswith("(this MCP server sends the key given by --api-key or "
                             "PROXY_API_KEY)"), text


async def test_a_proxy_that_does_not_answer_is_named(unused_tcp_port):
    url = f"http://127.0.0.1:{unused_tcp_port}"
    async with stdio_session(url, None) as session:
        text = await refused(session, "list_models", {})
    assert f"cannot list models: the proxy at {url} did not answer" in text, text


async def test_over_http_a_wrong_key_is_refused_before_mcp(guarded, http):
    """/mcp is a client route: the proxy's own auth answers, in OpenAI's error format."""
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    async with http.post(f"{guarded.url}/mcp", json=init, headers=bearer("sk-wrong")) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_api_key"


async def test_python_m_proxy_serves_mcp_at_slash_mcp(tmp_path):
    """The command itself mounts /mcp (the fixtures above mount it as it does)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    env["HOME"] = str(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--demo", "--port", str(port), cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        banner = ""
        while "Stop with Ctrl-C" not in banner:
            line = await proc.stdout.readline()
            assert line, f"the demo ended early:\n{banner}"
            banner += line.decode()
        async with http_session(f"http://127.0.0.1:{port}", None) as session:
            assert {t.name for t in (await session.list_tools()).tools} == TOOLS
            assert (await call(session, "list_models"))["data"]
    finally:
        proc.terminate()
        await proc.wait()


INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "t", "version": "1"}}}
ACCEPT = "application/json, text/event-stream"


@pytest.mark.parametrize("bind, status", [("127.0.0.1", 421), ("0.0.0.0", 200)])
async def test_another_host_header_is_refused_only_on_loopback(emulator, http, bind, status):
    """DNS rebinding: a loopback proxy answers only to its loopback names; one bound wider is
    reached by names it cannot know. /mcp has the rule every route has (origins.py)."""
    app = create_app(proxy_config(emulator.url, **{"server.host": bind}))
    mount_mcp(app)
    proxy = Proxy(await serve(app), app)
    try:
        async with http.post(f"{proxy.url}/mcp", json=INIT,
                             headers={"Host": "proxy.lan:8080", "Accept": ACCEPT}) as resp:
            assert resp.status == status, await resp.text()
            if status == 421:
                assert (await resp.json())["error"]["code"] == "host_not_allowed"
    finally:
        await proxy.served.close()


async def test_a_call_from_another_sites_page_is_refused(emulator, http):
    """A page elsewhere may POST to /mcp from the browser (tools that unload models); its
    Origin says so. The proxy's own origin, or none (an MCP client), goes on."""
    app = create_app(proxy_config(emulator.url))
    mount_mcp(app)
    proxy = Proxy(await serve(app), app)
    try:
        for origin, status in (("https://evil.example", 403), (proxy.url, 200), (None, 200)):
            headers = {"Accept": ACCEPT, **({"Origin": origin} if origin else {})}
            async with http.post(f"{proxy.url}/mcp", json=INIT, headers=headers) as resp:
                assert resp.status == status, (origin, await resp.text())
        async with http.post(f"{proxy.url}/mcp", json=INIT,
                             headers={"Accept": ACCEPT, "Origin": "https://evil.example"}) as resp:
            assert (await resp.json())["error"]["code"] == "origin_not_allowed"
    finally:
        await proxy.served.close()


async def test_a_key_limited_to_models_reads_and_is_recommended_only_those(guarded, http,
                                                                          mcp_client):
    """The key limited to `fast`: the tools read and recommend its model only, as HTTP does."""
    async with mcp_client(guarded.url, BOB) as session:
        assert [r["model"] for r in (await call(session, "list_models"))["data"]] == [MODEL]
        unknown = await refused(session, "model_stats", {"model": "zzz"})
        assert unknown.endswith(f"unknown model 'zzz'; list_models shows: {MODEL}"), unknown
        memory = await call(session, "memory_stats")
        assert list(memory["models"]) == [MODEL]
        assert list(memory["auth"]["requests_by_key"]) == ["bob"]
        for task in ("coding", "chat"):
            rec = await call(session, "recommend_model", {"task": task, "complexity": 0.9})
            assert rec["recommended_models"] == [MODEL], rec
        embedding = await call(session, "recommend_model", {"task": "embedding"})
        assert embedding["recommended_models"] == []
        assert embedding["note"] == ("This API key ('bob') may use no embedding model for "
                                     "the task 'embedding'.")
        models = json.loads((await session.read_resource("proxy://models")).contents[0].text)
        assert [r["model"] for r in models["data"]] == [MODEL]
