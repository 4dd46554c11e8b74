"""The MCP server (`python -m proxy mcp`), driven by the MCP SDK's own client over stdio against
a running proxy with client keys and an admin token: every tool, the resources, the refusals."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from .test_auth import ADMIN, ALICE, AUTH, MODEL, bearer

ROOT = Path(__file__).resolve().parent.parent
TOOLS = {"list_models", "load_model", "unload_model", "pin_model", "unpin_model",
         "memory_stats", "recommend_model", "optimize_memory", "model_stats"}
CHANGES = [("load_model", {"model": MODEL}, "load a model"),
           ("unload_model", {"model": MODEL}, "unload a model"),
           ("pin_model", {"model": MODEL}, "pin a model"),
           ("unpin_model", {"model": MODEL}, "unpin a model"),
           ("optimize_memory", {}, "optimize memory")]


@pytest.fixture
async def guarded(make_proxy, emulator):
    return await make_proxy(emulator.url, **AUTH)


@contextlib.asynccontextmanager
async def mcp_client(url: str, *extra: str) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "proxy", "mcp", "--url", url, *extra],
        cwd=str(ROOT), env={k: v for k, v in os.environ.items() if k != "PROXY_API_KEY"})
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


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


async def test_tools_have_schemas_and_descriptions(guarded):
    async with mcp_client(guarded.url, "--api-key", ALICE) as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description and len(tool.description) > 40, tool.name
        assert tool.input_schema["type"] == "object"
    for name in ("load_model", "unload_model", "pin_model", "unpin_model", "model_stats"):
        assert tools[name].input_schema["required"] == ["model"], name
    rec = tools["recommend_model"].input_schema["properties"]
    assert set(rec) == {"task", "complexity", "urgency"}
    assert rec["complexity"]["maximum"] == rec["urgency"]["maximum"] == 1.0
    assert tools["list_models"].annotations.read_only_hint is True
    assert tools["load_model"].annotations.read_only_hint is False


async def test_every_tool_with_the_admin_token(guarded, emulator, http):
    url = guarded.url
    async with mcp_client(url, "--api-key", ADMIN) as session:
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


async def test_resources_are_the_model_list_and_the_health_report(guarded, http):
    async with mcp_client(guarded.url, "--api-key", ALICE) as session:
        uris = {str(r.uri) for r in (await session.list_resources()).resources}
        assert uris == {"proxy://models", "proxy://health"}
        models = await session.read_resource("proxy://models")
        health = await session.read_resource("proxy://health")
    assert json.loads(models.contents[0].text) == await get(http, guarded.url, "/proxy/models")
    assert json.loads(health.contents[0].text)["status"] == \
        (await get(http, guarded.url, "/proxy/health"))["status"]


async def test_a_client_key_reads_but_may_not_change_state(guarded, emulator, http):
    async with mcp_client(guarded.url, "--api-key", ALICE) as session:
        assert MODEL in [r["model"] for r in (await call(session, "list_models"))["data"]]
        await call(session, "memory_stats")
        for tool, args, action in CHANGES:
            text = await refused(session, tool, args)
            assert f"admin token required to {action}: This action needs the admin token" \
                in text, text
    assert not emulator.state.instances_of(MODEL)
    assert (await row(http, guarded.url))["pinned"] is False


async def test_a_missing_or_wrong_key_is_named(guarded):
    async with mcp_client(guarded.url, "--api-key", "sk-wrong") as session:
        text = await refused(session, "list_models", {})
        assert "API key refused, cannot list models (invalid_api_key): Invalid API key" \
            in text, text
    async with mcp_client(guarded.url) as session:
        text = await refused(session, "load_model", {"model": MODEL})
        assert "Missing API key" in text, text


async def test_a_proxy_that_does_not_answer_is_named(unused_tcp_port):
    url = f"http://127.0.0.1:{unused_tcp_port}"
    async with mcp_client(url) as session:
        text = await refused(session, "list_models", {})
    assert f"cannot list models: the proxy at {url} did not answer" in text, text
