"""The floor of a Python relay: one shared ClientSession, StreamResponse, no parsing.

    python -m bench.relay --upstream http://127.0.0.1:1234 --port 8090
"""
from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host",
       "content-length", "proxy-authorization", "proxy-authenticate"}
SESSION = web.AppKey("session", aiohttp.ClientSession)


def create_relay(upstream: str) -> web.Application:
    app = web.Application(client_max_size=32 * 2**20)

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[SESSION] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256), auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=300))
        yield
        await app[SESSION].close()
    app.cleanup_ctx.append(session_ctx)

    async def relay(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        body = await request.read()
        async with app[SESSION].request(request.method, upstream + request.path_qs,
                                        headers=headers, data=body) as up:
            resp = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in HOP})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app.router.add_route("*", "/{tail:.*}", relay)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--upstream", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = p.parse_args()
    if args.event_loop == "uvloop":
        import asyncio

        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(create_relay(args.upstream.rstrip("/")), host=args.host, port=args.port,
                access_log=None, print=None)


if __name__ == "__main__":
    main()
