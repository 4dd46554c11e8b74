"""Start an aiohttp application on a real socket; shared by the proxy, the emulator and tests."""
from __future__ import annotations

import socket
from dataclasses import dataclass

from aiohttp import web


@dataclass
class Served:
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        await self.runner.cleanup()


async def serve(app: web.Application, host: str = "127.0.0.1", port: int = 0, *,
                shutdown_timeout_s: float = 5.0, access_log: bool = False) -> Served:
    """Bind (port 0 picks a free one) and start serving; returns the bound address.

    handler_cancellation makes a client disconnect cancel its handler at once, which is what
    lets a dropped stream cancel the upstream request instead of generating into the void.
    """
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout_s,
                           access_log=None if not access_log else web.AccessLogger)
    await runner.setup()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    site = web.SockSite(runner, sock)
    await site.start()
    return Served(runner, host, sock.getsockname()[1])
