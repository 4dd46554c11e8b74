"""The MCP server where agents get it wrong or things go slow: what a tool call counts, the
errors an agent reads for a bad argument, a tool it does not have or a proxy that does not
answer, and what an open event stream does to a shutdown."""
from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import sys
from typing import Any

import orjson
import pytest
from mcp import Client

from proxy.app import create_app
from proxy.mcp.client import ProxyClient
from proxy.mcp.http import mount_mcp
from proxy.mcp.server import build_server
from proxy.server.serving import serve

from .conftest import proxy_config
from .test_auth import ADMIN, ALICE, AUTH, MODEL, bearer
from .test_hostile import raw_request
from .test_mcp import ROOT, guarded, http_session  # noqa: F401 - the fixture

ACCEPT = "application/json, text/event-stream"


async def rpc(http, url: str, key: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """One JSON-RPC message to /mcp as plain HTTP (the server is stateless: no session)."""
    message = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    async with http.post(f"{url}/mcp", data=io.BytesIO(orjson.dumps(message)), headers={
            **bearer(key), "Accept": ACCEPT, "Content-Type": "application/json"}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def requests_of(http, url: str, name: str) -> int:
    async with http.get(f"{url}/proxy/stats", headers=bearer(ADMIN)) as resp:
        return (await resp.json())["auth"]["requests_by_key"].get(name, 0)


@pytest.mark.parametrize("tool, args", [("list_models", {}), ("model_stats", {"model": "fast"}),
                                        ("memory_stats", {})])
async def test_a_tool_call_counts_once_for_its_key(guarded, http, tool, args):
    """The tool's calls to the proxy's own API are part of the /mcp request, which is the one
    counted in auth.requests_by_key (and proxy_requests_by_key_total)."""
    before = await requests_of(http, guarded.url, "alice")
    answer = await rpc(http, guarded.url, ALICE, "tools/call", {"name": tool, "arguments": args})
    assert answer["result"]["isError"] is False, answer
    assert await requests_of(http, guarded.url, "alice") == before + 1


async def test_the_own_call_mark_needs_the_processes_secret(guarded, http):
    """A client cannot keep its requests out of the counts by sending the header."""
    before = await requests_of(http, guarded.url, "alice")
    async with http.get(f"{guarded.url}/proxy/models",
                        headers={**bearer(ALICE), "X-Proxy-Own-Call": "guess"}) as resp:
        assert resp.status == 200
    status, _ = await raw_request(guarded.url, b"GET /proxy/models HTTP/1.1\r\nHost: "
                                  b"127.0.0.1\r\nAuthorization: Bearer " + ALICE.encode() +
                                  b"\r\nX-Proxy-Own-Call: \xff\xfe\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200"), status   # not UTF-8: no mark, and no 500
    assert await requests_of(http, guarded.url, "alice") == before + 2


async def test_an_open_event_stream_does_not_hold_the_shutdown(emulator, http):
    """GET /mcp's event stream never ends by itself: a shutdown ends it at once, as it ends
    /proxy/events, instead of waiting out its whole drain time for it."""
    app = create_app(proxy_config(emulator.url))
    mount_mcp(app)
    served = await serve(app, shutdown_timeout_s=5.0)
    async with http.get(f"{served.url}/mcp", headers={"Accept": "text/event-stream"}) as resp:
        assert resp.status == 200
        async with asyncio.timeout(2.5):   # half the drain time
            await served.close()
            assert await resp.content.read() == b""   # ended, not cut


async def test_a_proxy_that_never_answers_is_named_with_the_deadline():
    """A connection taken but never answered: the tool error says which proxy and how long it
    waited, not a bare 'Error executing tool'."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with Client(build_server(lambda: ProxyClient(url, None, timeout_s=0.5))) as client:
            result = await client.call_tool("list_models", {})
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    assert result.is_error
    assert result.content[0].text.endswith(
        f"cannot list models: the proxy at {url} did not answer within 0.5 s"), result.content


async def test_a_task_too_long_is_named_as_such(guarded, http):
    """A task is a word; a long one is refused by the tool's schema, not passed on as a query
    string the proxy's own HTTP parser rejects as malformed HTTP."""
    answer = await rpc(http, guarded.url, ALICE, "tools/call",
                       {"name": "recommend_model", "arguments": {"task": "x" * 10_000}})
    text = answer["result"]["content"][0]["text"]
    assert answer["result"]["isError"] is True
    assert "task" in text and "at most 256 characters" in text, text
    assert "malformed" not in text


@pytest.mark.parametrize("url, said", [
    ("127.0.0.1:8080", "is not an http(s) URL with a host: write http://127.0.0.1:8080"),
    ("http://127.0.0.1:8080/v1", "ends in /v1: give the proxy's own address, without it, "
                                 "http://127.0.0.1:8080"),
    ("http://127.0.0.1:8080/mcp", "ends in /mcp"),
])
async def test_the_stdio_server_refuses_an_address_that_is_not_a_proxys(url, said):
    """Started with such a --url it used to serve, and every tool then failed with a puzzle
    ('did not answer (NonHttpUrlClientError)', 'Unknown route: GET /v1/proxy/models')."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "mcp", "--url", url, cwd=ROOT, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 2
    assert f"--url (PROXY_URL): '{url}' {said}" in err.decode(), err.decode()


async def test_an_unknown_tool_is_a_protocol_error(guarded, http):
    """The specification's tools page: an unknown tool is a JSON-RPC error (-32602), which
    names the tools there are; a tool that ran and failed is a result with isError."""
    answer = await rpc(http, guarded.url, ALICE, "tools/call",
                       {"name": "load_modle", "arguments": {"model": "x"}})
    assert "result" not in answer, answer
    assert answer["error"]["code"] == -32602
    assert answer["error"]["message"].startswith("Unknown tool: 'load_modle'; the tools are "
                                                 "list_models, load_model, "), answer


async def test_a_refusal_says_when_to_ask_again(emulator, http):
    """What HTTP says in Retry-After and x-should-retry reaches the agent in the tool error:
    a member of an exclusive group waits for another one's load, past the queue's deadline:
    ask again later; one held by a pinned member: asking again gets the same answer."""
    other = "google/gemma-3-12b"
    app = create_app(proxy_config(emulator.url, **AUTH, **{
        "eviction.queue_timeout_s": 0.5,
        "groups": [{"name": "big", "members": [MODEL, other], "policy": "exclusive"}]}))
    mount_mcp(app)
    served = await serve(app)
    gate = emulator.state.faults.load_gate[MODEL] = asyncio.Event()
    try:
        async with http_session(served.url, ADMIN) as session:
            loading = asyncio.create_task(session.call_tool("load_model", {"model": MODEL}))
            await emulator.state.wait_for(lambda: emulator.state.loading[MODEL] > 0)
            later = await session.call_tool("load_model", {"model": other})
            gate.set()
            await loading   # past the queue's deadline too (504), its load goes on
            await emulator.state.wait_for(lambda: bool(emulator.state.instances_of(MODEL)))
            assert not (await session.call_tool("pin_model", {"model": MODEL})).is_error
            never = await session.call_tool("load_model", {"model": other})
    finally:
        gate.set()
        await served.close()
    assert later.is_error and never.is_error
    assert re.search(r"group_busy: .*\(ask again in \d+ s\)$", later.content[0].text), \
        later.content
    assert re.search(r"group_busy: .*\(asking again gets the same answer\)$",
                     never.content[0].text), never.content


async def test_a_request_logs_no_session_that_never_was(guarded, http, caplog):
    """The server is stateless: the SDK's 'Terminating session: None' after every /mcp request
    is not logged."""
    with caplog.at_level(logging.INFO):
        await rpc(http, guarded.url, ALICE, "tools/call", {"name": "list_models", "arguments": {}})
    assert not [r for r in caplog.records if "Terminating session" in r.getMessage()]


async def test_the_body_limit_is_the_proxys_alone(guarded, http):
    """A 5 MiB call is within server.max_body_bytes (32 MiB): it reaches the tool, and is not
    stopped by the SDK's own 4 MiB limit with a plain-text 413."""
    answer = await rpc(http, guarded.url, ADMIN, "tools/call",
                       {"name": "model_stats", "arguments": {"model": "x" * (5 << 20)}})
    assert answer["result"]["isError"] is True
    text = answer["result"]["content"][0]["text"]
    assert "unknown model 'xxxx" in text
    assert len(text) < 1000, "the name sent is clipped in the error, not echoed whole"


async def test_mcp_needs_a_client_key_even_where_reading_is_open(emulator, http):
    """docs/mcp.md: /mcp is a client route; auth.read_only_access: open opens GET /proxy/*,
    not /mcp."""
    app = create_app(proxy_config(emulator.url, **AUTH, **{"auth.read_only_access": "open"}))
    mount_mcp(app)
    served = await serve(app)
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
               "params": {"name": "list_models", "arguments": {}}}
    try:
        async with http.post(f"{served.url}/mcp", json=message,
                             headers={"Accept": ACCEPT}) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "invalid_api_key"
        answer = await rpc(http, served.url, ALICE, "tools/call", message["params"])
        assert answer["result"]["isError"] is False
    finally:
        await served.close()


@pytest.mark.parametrize("args, said", [
    ({"model": 5, "priority": 11}, "model: Input should be a valid string (got 5); priority: "
                                   "Input should be less than or equal to 10 (got 11)"),
    ({}, "model: Field required"),
])
async def test_arguments_that_do_not_fit_are_named_plainly(guarded, http, args, said):
    """A tool error the model can act on: each field and what it must be, without pydantic's
    internal model name and documentation links."""
    answer = await rpc(http, guarded.url, ADMIN, "tools/call",
                       {"name": "load_model", "arguments": args})
    assert answer["result"]["isError"] is True
    assert answer["result"]["content"][0]["text"] == \
        f"Error executing tool load_model: invalid arguments: {said}"


async def test_a_server_that_is_not_the_proxy_is_named(emulator):
    """LM Studio's own port given for the proxy's: it answers every unknown route 200
    {"error": ...}, which must not pass for a loaded model or a model list."""
    server = build_server(lambda: ProxyClient(emulator.url, None))
    async with Client(server) as client:
        for tool, args in (("load_model", {"model": MODEL}), ("list_models", {}),
                           ("model_stats", {"model": MODEL})):
            result = await client.call_tool(tool, args)
            assert result.is_error, (tool, result.content)
            assert f"the server at {emulator.url} is not the proxy: it answered" in \
                result.content[0].text, (tool, result.content)
    assert not emulator.state.instances_of(MODEL)
