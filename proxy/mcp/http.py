"""The streamable HTTP transport at /mcp on the proxy's own port (one server, one port)."""
from __future__ import annotations

import ipaddress
import logging
import sys
from contextvars import ContextVar
from typing import Any, Callable

from aiohttp import web
from mcp.server.transport_security import TransportSecuritySettings

from ..origins import WILDCARD_BINDS
from ..server import intake
from ..server.asgi import AIOHTTP_REQUEST, mount
from ..server.auth import presented_secret
from ..server.keys import AUTH, CONFIG
from .client import ProxyClient
from .server import build_server

PATH = "/mcp"


def mount_mcp(app: web.Application, path: str = PATH) -> None:
    """Host and Origin (DNS rebinding, other sites) are checked by the proxy's middleware, with
    the rule every route has (origins.py, `server.allowed_hosts` / `allowed_origins`)."""
    asgi, lifespan = http_app(path)
    mount(app, path, asgi, lifespan, read_body=_read_body)
    # Stateless, the transport ends a "session" of id None after every request and says so at
    # INFO: a line per /mcp request about a session that never was. Its warnings still show.
    logging.getLogger("mcp.server.streamable_http").setLevel(logging.WARNING)


async def _read_body(request: web.Request) -> bytes:
    # The /v1 intake: the body deadline, the size limit (declared and decoded), the encodings.
    return await intake.read_body(request, request.app[CONFIG].current.server)


def http_app(path: str = PATH) -> tuple[Any, Callable[[], Any]]:
    """The streamable HTTP transport, stateless with JSON answers, to mount on the proxy's own
    server: (ASGI app, lifespan). Each call goes back to the proxy it arrived at, at the
    address it listens on, with the key the caller was let in with, so the proxy's auth decides
    as for any HTTP call."""
    def client_for() -> ProxyClient:
        scope = _HTTP_REQUEST.get().scope
        request = scope[AIOHTTP_REQUEST]
        listen = request.app[CONFIG].current.server.host
        # Marked as the proxy's own call: the /mcp request it serves is the one counted.
        return ProxyClient(own_url(scope["server"], listen), presented_secret(request),
                           headers=request.app[AUTH].own_call_headers())

    server = build_server(client_for, middleware=[_remember_request])
    # The SDK's own Host/Origin lists would be a second rule, one that knows neither the
    # proxy's allowed names nor its bind address: the proxy's middleware has already applied
    # its own by the time a request gets here. (The SDK still requires a JSON POST.)
    unchecked = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    # Likewise the size: the proxy's intake has applied server.max_body_bytes (declared and
    # decoded, with its own 413); the SDK's 4 MiB limit would be a second, lower one.
    app = server.streamable_http_app(streamable_http_path=path, stateless_http=True,
                                     json_response=True, transport_security=unchecked,
                                     max_request_body_size=sys.maxsize)
    return app, server.session_manager.run


# The HTTP request an MCP message arrived in, for the handlers (resources get no context).
_HTTP_REQUEST: ContextVar[Any] = ContextVar("mcp_http_request")


async def _remember_request(ctx: Any, call_next: Any) -> Any:
    token = _HTTP_REQUEST.set(ctx.request)
    try:
        return await call_next(ctx)
    finally:
        _HTTP_REQUEST.reset(token)


def own_url(accepted_on: tuple[str, int], listen: str) -> str:
    """The proxy's own address for the tools' calls: the address and port the connection was
    accepted on (the listening socket's port), loopback when the proxy listens on every address
    (`listen`, server.host). Never the Host header: the client names it, and the calls carry
    the client's key."""
    host, port = accepted_on
    ip = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped    # a socket bound to :: reports an IPv4 peer's address this way
        host = str(ip)
    if not ip.is_loopback and listen in WILDCARD_BINDS:
        ip = ipaddress.ip_address("127.0.0.1" if ip.version == 4 else "::1")
        host = str(ip)
    shown = f"[{host.replace('%', '%25')}]" if ip.version == 6 else host
    return f"http://{shown}:{port}"
