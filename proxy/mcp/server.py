"""The MCP tools and resources, each one call to the proxy's HTTP API (proxy/handlers/admin.py).

Reading (list_models, memory_stats, recommend_model, model_stats, the resources) needs a client
key when the proxy has keys; changing state (load, unload, pin, unpin, optimize) needs the admin
token, as on HTTP. A refusal comes back as a tool error that names the cause.
"""
from __future__ import annotations

import json
import re
from typing import Annotated, Any, Callable

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, ToolAnnotations
from pydantic import Field

from ..errors import clip
from .client import ProxyClient

INSTRUCTIONS = (
    "Tools for an OpenAI-compatible proxy in front of LM Studio that manages which models are "
    "loaded in memory. Call list_models first: it gives the model keys the other tools take. "
    "Use recommend_model to choose a model for a task, load_model to load it ahead of use, "
    "unload_model or optimize_memory to free memory, pin_model to keep a model from eviction. "
    "Loading, unloading, pinning and optimizing need the proxy's admin token.")

Model = Annotated[str, Field(description="A model key or alias as list_models shows it, "
                                         "e.g. 'qwen/qwen3-4b'.", min_length=1)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
# A task is a word: bounded so that it fits the query string of the proxy's call (HTTP/1.1
# lines are cut at 8 KiB, which would come back as a 400 about malformed HTTP).
TASK_CHARS = 256
READ = ToolAnnotations(read_only_hint=True, open_world_hint=False)
CHANGE = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)


def build_server(client_for: Callable[[], ProxyClient],
                 middleware: list[Any] | None = None) -> MCPServer:
    """`client_for()` is the proxy and key a call goes to: fixed for stdio, the caller's own
    Authorization for streamable HTTP."""
    server = MCPServer("lmstudio-memory-proxy", instructions=INSTRUCTIONS,
                       middleware=middleware)

    def tool(annotations: ToolAnnotations) -> Callable[[Any], Any]:
        # The docstring as one paragraph: its source indentation would reach the model as is.
        return lambda fn: server.tool(annotations=annotations,
                                      description=" ".join(fn.__doc__.split()))(fn)

    @tool(READ)
    async def list_models() -> dict[str, Any]:
        """List every model the proxy knows (to a key limited to models: those), with its
        state (loaded, loading, unloaded...), memory footprint (footprint_mb), owner,
        priority, whether it is pinned, requests in flight, and the queue length and memory
        pressure of the whole proxy. Use the 'model' field of a row as the model argument of
        the other tools."""
        return await client_for().get("/proxy/models", "list models")

    @tool(CHANGE)
    async def load_model(model: Model,
                         priority: Annotated[int | None, Field(
                             ge=1, le=10, description="Eviction priority 1..10; higher is "
                             "kept longer. Omit to keep the configured one.")] = None,
                         ) -> dict[str, Any]:
        """Load a model into memory now, evicting idle models if the proxy's policy must make
        room. Returns the model key and its state afterwards. Needs the admin token."""
        body: dict[str, Any] = {"model": model}
        if priority is not None:
            body["priority"] = priority
        return await client_for().post("/proxy/models/load", "load a model", body)

    @tool(CHANGE)
    async def unload_model(model: Model) -> dict[str, Any]:
        """Unload a model to free its memory. Returns whether it was unloaded and its state
        afterwards. Needs the admin token."""
        return await client_for().post("/proxy/models/unload", "unload a model",
                                          {"model": model})

    @tool(CHANGE)
    async def pin_model(model: Model) -> dict[str, Any]:
        """Pin a model: it is never chosen for eviction, until unpinned or the proxy restarts.
        Needs the admin token."""
        return await client_for().post("/proxy/models/pin", "pin a model",
                                 {"model": model, "pinned": True})

    @tool(CHANGE)
    async def unpin_model(model: Model) -> dict[str, Any]:
        """Unpin a model so that it may be evicted again when memory is needed. Needs the
        admin token."""
        return await client_for().post("/proxy/models/pin", "unpin a model",
                                 {"model": model, "pinned": False})

    @tool(READ)
    async def memory_stats() -> dict[str, Any]:
        """The proxy's memory and load report: system memory (total, available, used percent),
        memory pressure, eviction policy, queue length, the upstream's health, and per-model
        request statistics."""
        return await client_for().get("/proxy/stats", "read memory stats")

    @tool(READ)
    async def recommend_model(
            task: Annotated[str, Field(description="What the model is for: chat, coding, "
                                                   "reasoning, embedding, or a free word.",
                                       min_length=1, max_length=TASK_CHARS)] = "chat",
            complexity: Annotated[Unit, Field(description="0..1; higher favours larger, "
                                                          "more capable models.")] = 0.5,
            urgency: Annotated[Unit, Field(description="0..1; higher favours a model that is "
                                                       "loaded now over one that must load.")]
            = 0.5) -> dict[str, Any]:
        """Recommend the model to use for a task, ranked with reasons, among the models the
        key may use (a 'note' says when it may use none for the task); the same answer as
        the proxy's GET /proxy/recommendations."""
        return await client_for().get("/proxy/recommendations", "recommend a model",
                                {"task_type": task, "complexity": str(complexity),
                                 "urgency": str(urgency)})

    @tool(CHANGE)
    async def optimize_memory() -> dict[str, Any]:
        """Free memory now by unloading what the eviction policy would give up first, until
        memory pressure is normal. Returns what was unloaded. Needs the admin token."""
        return await client_for().post("/proxy/optimize", "optimize memory")

    @tool(READ)
    async def model_stats(model: Model) -> dict[str, Any]:
        """One model's row (state, footprint, owner, pin, requests in flight) and its request
        statistics (counts, success rate, latencies)."""
        models = await client_for().get("/proxy/models", "read model stats")
        row = next((r for r in models["data"] if model in (r["model"], *r.get("aliases", ()))),
                   None)
        if row is None:
            known = ", ".join(r["model"] for r in models["data"]) or "none"
            raise ToolError(f"unknown model '{clip(model)}'; list_models shows: {known}")
        stats = await client_for().get("/proxy/stats", "read model stats")
        return {"model": row["model"], "row": row,
                "stats": stats.get("models", {}).get(row["model"], {})}

    @server.resource("proxy://models", name="models", mime_type="application/json",
                     description="Every model the proxy knows, with state and memory "
                                 "(GET /proxy/models).")
    async def models_resource() -> str:
        return await _read(client_for(), "/proxy/models", "read the model list")

    @server.resource("proxy://health", name="health", mime_type="application/json",
                     description="The proxy's health report with its alerts "
                                 "(GET /proxy/health).")
    async def health_resource() -> str:
        return await _read(client_for(), "/proxy/health", "read the health report")

    server.middleware.append(_unknown_tool_refused(server))
    server.middleware.append(_argument_errors_plain)
    return server


def _unknown_tool_refused(server: MCPServer) -> Callable[[Any, Any], Any]:
    """A call of a tool the server does not have is a protocol error (JSON-RPC -32602, as the
    MCP specification's tools page has it), not a tool's failure: the SDK would answer it as a
    tool result with isError."""
    async def middleware(ctx: Any, call_next: Any) -> Any:
        params = ctx.params if ctx.method == "tools/call" else None
        name = params.get("name") if isinstance(params, dict) else None
        if isinstance(name, str):
            names = sorted(tool.name for tool in await server.list_tools())
            if name not in names:
                raise MCPError(INVALID_PARAMS, f"Unknown tool: {name[:100]!r}; the tools "
                                               f"are {', '.join(names)}")
        return await call_next(ctx)
    return middleware


_VALIDATION = re.compile(r"(Error executing tool \S+: )\d+ validation errors? for \S+\n(.*)",
                         re.S)
_DETAIL = re.compile(r" \[type=(\w+), input_value=(.*), input_type=\w+\]$")


async def _argument_errors_plain(ctx: Any, call_next: Any) -> Any:
    """Arguments that do not fit a tool's schema, said as 'field: what it must be (got x)':
    the SDK passes pydantic's report on as is, with the name of an internal model and a link to
    pydantic's documentation after every field, for the model to read."""
    result = await call_next(ctx)
    if ctx.method != "tools/call" or not isinstance(result, dict) or not result.get("isError"):
        return result
    for item in result.get("content") or ():
        found = _VALIDATION.match(item.get("text") or "") if isinstance(item, dict) else None
        if found is not None:
            item["text"] = found.group(1) + "invalid arguments: " + _fields(found.group(2))
    return result


def _fields(report: str) -> str:
    said, field = [], ""
    for line in report.splitlines():
        if not line.startswith(" "):
            field = line
        elif not line.startswith("    "):   # the deeper lines are the links
            detail = _DETAIL.search(line)
            what = line[:detail.start()].strip() if detail else line.strip()
            got = f" (got {detail.group(2)})" if detail and detail.group(1) != "missing" else ""
            said.append(f"{field}: {what}{got}")
    return "; ".join(said)


async def _read(client: ProxyClient, path: str, action: str) -> str:
    try:
        return json.dumps(await client.get(path, action))
    except ToolError as exc:
        raise ResourceError(str(exc)) from None


def run_stdio(url: str, api_key: str | None) -> int:
    client = ProxyClient(url, api_key, key_hint=" (this MCP server sends the key given "
                                                "by --api-key or PROXY_API_KEY)")
    build_server(lambda: client).run("stdio")
    return 0

