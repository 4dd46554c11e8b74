"""The MCP server through a client that is not ours: the official MCP Inspector's command line
(`@modelcontextprotocol/inspector-cli`, Node, the TypeScript MCP SDK), non-interactive, against a
running proxy with client keys and an admin token. Over streamable HTTP at /mcp, and over stdio
with `python -m proxy mcp --url ...` started from an `mcp.json` entry shaped as docs/mcp.md's.

tests/js holds the pinned package; the README's test command installs it with `npm ci`.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from .test_auth import ADMIN, ALICE, MODEL, bearer
from .test_mcp import TOOLS, guarded  # noqa: F401 - the fixture

JS_DIR = Path(__file__).parent / "js"
PACKAGE = JS_DIR / "node_modules" / "@modelcontextprotocol" / "inspector-cli"
CLI = PACKAGE / "build" / "cli.js"


async def inspector(target: list[str], *method: str) -> tuple[int, Any, str]:
    """Run `mcp-inspector-cli --cli` once: (exit code, its JSON answer or None, its stderr).

    Its cwd is the package's build/ folder: the CLI finds its own package.json through a path
    it checks against the cwd (modelcontextprotocol/inspector#1503), and fails elsewhere."""
    if shutil.which("node") is None:
        pytest.fail("node is not on PATH: the MCP Inspector tests need Node.js 20+")
    if not CLI.is_file():
        pytest.fail("tests/js/node_modules is missing @modelcontextprotocol/inspector-cli: run "
                    "`npm ci --prefix tests/js` (.ci/run does) before the suite")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    proc = await asyncio.create_subprocess_exec(
        "node", str(CLI), "--cli", *target, *method, cwd=CLI.parent, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 40)
    assert proc.returncode is not None
    return proc.returncode, json.loads(out) if proc.returncode == 0 else None, err.decode()


def over_http(url: str, key: str) -> list[str]:
    return [f"{url}/mcp", "--transport", "http", "--header", f"Authorization: Bearer {key}"]


def over_stdio(url: str, key: str, tmp_path: Path) -> list[str]:
    """An MCP host's config for the stdio server, as docs/mcp.md shows it."""
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"lm-proxy": {
        "command": sys.executable, "args": ["-m", "proxy", "mcp", "--url", url],
        "env": {"PROXY_API_KEY": key}}}}))
    return ["--config", str(config), "--server", "lm-proxy"]


@pytest.fixture(params=["http", "stdio"])
def target(request, tmp_path):
    """`target(proxy_url, key)`: the inspector's arguments that reach the proxy's MCP server
    over the transport the test runs with."""
    if request.param == "http":
        return over_http
    return lambda url, key: over_stdio(url, key, tmp_path)


async def run(target: list[str], *method: str) -> Any:
    code, out, err = await inspector(target, *method)
    assert code == 0, err
    return out


async def call(target: list[str], tool: str, *args: str) -> dict[str, Any]:
    result = await run(target, "--method", "tools/call", "--tool-name", tool,
                       *(["--tool-arg", *args] if args else []))
    assert not result.get("isError"), result["content"][0]["text"]
    # Both forms of the answer: the text for clients that read only text, and the JSON.
    assert json.loads(result["content"][0]["text"]) == result["structuredContent"]
    return result["structuredContent"]


def timeless(row: dict[str, Any]) -> dict[str, Any]:
    """A model row without its clock reading, which moves between two requests."""
    return {k: v for k, v in row.items() if k != "last_used_s_ago"}


async def get(http, url: str, path: str) -> Any:
    async with http.get(url + path, headers=bearer(ADMIN)) as resp:
        assert resp.status == 200
        return await resp.json()


async def test_tools_list_shows_every_tool_with_its_schema(guarded, target):
    tools = {t["name"]: t for t in
             (await run(target(guarded.url, ALICE), "--method", "tools/list"))["tools"]}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert len(tool["description"]) > 40, tool["name"]
        assert tool["inputSchema"]["type"] == "object", tool["name"]
        assert tool["outputSchema"]["type"] == "object", tool["name"]
    for name in ("load_model", "unload_model", "pin_model", "unpin_model", "model_stats"):
        model = tools[name]["inputSchema"]
        assert model["required"] == ["model"], name
        assert model["properties"]["model"]["type"] == "string", name
    assert tools["load_model"]["inputSchema"]["properties"]["priority"]["anyOf"][0] == \
        {"type": "integer", "minimum": 1, "maximum": 10}
    rec = tools["recommend_model"]["inputSchema"]["properties"]
    assert set(rec) == {"task", "complexity", "urgency"}
    assert rec["complexity"]["maximum"] == rec["urgency"]["maximum"] == 1
    assert tools["list_models"]["annotations"]["readOnlyHint"] is True
    assert tools["unload_model"]["annotations"]["readOnlyHint"] is False


async def test_list_models_and_memory_stats_are_the_proxys_data(guarded, http, target):
    async with http.post(f"{guarded.url}/proxy/models/load", json={"model": MODEL},
                         headers=bearer(ADMIN)) as resp:   # rows that differ by state
        assert resp.status == 200
    reached = target(guarded.url, ALICE)
    listed = await call(reached, "list_models")
    direct = await get(http, guarded.url, "/proxy/models")
    rows = [timeless(r) for r in listed.pop("data")]
    assert rows == [timeless(r) for r in direct.pop("data")]
    assert listed == direct
    assert {r["model"]: r["state"] for r in rows}[MODEL] == "loaded"
    memory = await call(reached, "memory_stats")
    direct = await get(http, guarded.url, "/proxy/stats")
    for key in ("policy", "memory_pressure", "model_counts", "loaded_models", "queue_length"):
        assert memory[key] == direct[key], key
    assert memory["models"][MODEL]["state"] == "loaded"
    assert set(memory["models"]) == set(direct["models"])


async def test_a_typed_argument_reaches_the_proxy(guarded, emulator, http, target):
    """--tool-arg priority=7 arrives as the integer the schema asks for, with the admin token."""
    loaded = await call(target(guarded.url, ADMIN), "load_model", f"model={MODEL}",
                        "priority=7")
    assert loaded == {"model": MODEL, "state": "loaded"}
    assert emulator.state.instances_of(MODEL)
    rows = (await get(http, guarded.url, "/proxy/models"))["data"]
    assert next(r for r in rows if r["model"] == MODEL)["priority"] == 7


async def test_a_client_key_changing_state_gets_an_error_naming_the_cause(guarded, emulator,
                                                                          target):
    result = await run(target(guarded.url, ALICE), "--method", "tools/call",
                       "--tool-name", "load_model", "--tool-arg", f"model={MODEL}")
    assert result["isError"] is True
    assert "admin token required to load a model: This action needs the admin token" in \
        result["content"][0]["text"], result
    assert not emulator.state.instances_of(MODEL)


async def test_resources_list_and_read(guarded, http, target):
    reached = target(guarded.url, ALICE)
    listed = (await run(reached, "--method", "resources/list"))["resources"]
    assert {(r["uri"], r["mimeType"]) for r in listed} == \
        {("proxy://models", "application/json"), ("proxy://health", "application/json")}
    models = (await run(reached, "--method", "resources/read", "--uri", "proxy://models"))
    assert json.loads(models["contents"][0]["text"]) == \
        await get(http, guarded.url, "/proxy/models")
    health = (await run(reached, "--method", "resources/read", "--uri", "proxy://health"))
    assert json.loads(health["contents"][0]["text"])["status"] == \
        (await get(http, guarded.url, "/proxy/health"))["status"]


async def test_a_wrong_key_over_http_stops_the_inspector_with_the_proxys_error(guarded):
    """/mcp is a client route: the inspector cannot connect and shows the proxy's refusal."""
    code, _, err = await inspector(over_http(guarded.url, "sk-wrong"), "--method", "tools/list")
    assert code == 1
    assert "Failed to connect to MCP server" in err, err
    assert '"message":"Invalid API key."' in err and '"code":"invalid_api_key"' in err, err
