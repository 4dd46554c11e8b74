"""An MCP server for agents: the proxy's operator surface (/proxy/*) as MCP tools and resources.

It is a client of a running proxy's HTTP API, like `python -m proxy status`: every tool is one
HTTP call, under the key it was started with, so the proxy's own auth decides what it may do.
Needs the optional `mcp` extra (pip install 'lmstudio-memory-proxy[mcp]').
"""
