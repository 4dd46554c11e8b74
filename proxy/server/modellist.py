"""`GET /v1/models` as clients see it: the server's own list, under the header policy both
ways. In a fleet, every host that is up is asked at once and their lists are merged by `id`:
a model several hosts list appears once (the first host's entry, in the order of `upstreams`),
and a model a host may not hold (its `models` patterns) is not listed for it. A host that
does not answer within its `probe_timeout_s` is left out, as one known down is. A client that
lists models to offer a choice (a chat UI, an agent framework) then sees every model a request
may name, not only the first host's.
"""
from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from ..errors import ProxyError, UpstreamTimeout, UpstreamUnreachable
from . import headers
from .keys import ENGINE, HOSTS
from .relay import read_upstream

LIST_PATH = "/v1/models"


async def read_model_list(request: web.Request, path: str = LIST_PATH) -> web.Response:
    """`path`: the list's path as the client asked for it (its query passed on)."""
    if not request.app[HOSTS]:
        return await read_upstream(request, "GET", path)
    fleet = request.app[ENGINE]
    hosts = [h for h in fleet.hosts if h.up] or list(fleet.hosts)   # none known up: ask all
    sent = headers.to_upstream(request.headers)

    async def one(h: Any) -> tuple[int, bytes, Any]:
        # A look at a model list, as the host's reconcile takes: one that does not answer
        # within its probe deadline (frozen, swapping) is left out, not waited for.
        deadline_s = h.core.config.upstream.probe_timeout_s
        try:
            async with asyncio.timeout(deadline_s):
                async with h.backend.request("GET", path, sent, None) as up:
                    return up.status, await up.read(), up.headers
        except TimeoutError:
            raise UpstreamTimeout(f"did not answer within {deadline_s:g}s "
                                  "(upstream.probe_timeout_s)") from None

    answers = await asyncio.gather(*(one(h) for h in hosts), return_exceptions=True)
    merged: list[Any] = []
    seen: set[str] = set()
    listed = False
    for h, answer in zip(hosts, answers):
        if isinstance(answer, BaseException):
            if not isinstance(answer, ProxyError):
                raise answer
            continue                        # down: its models are not resident anywhere
        status, body, _ = answer
        data = _entries(body) if status == 200 else None
        if data is None:
            continue
        listed = True
        for entry in data:
            model_id = entry.get("id")
            if isinstance(model_id, str) and model_id not in seen and h.allows(model_id):
                seen.add(model_id)
                merged.append(entry)
    if not listed:
        first = next((a for a in answers if isinstance(a, tuple)), None)
        if first is not None:               # e.g. a server's 401: its answer is the client's
            status, body, up_headers = first
            return web.Response(status=status, body=body,
                                headers=headers.to_client(up_headers))
        raise UpstreamUnreachable("No host answered with its model list: " + "; ".join(
            f"'{h.name}': {a.message}" for h, a in zip(hosts, answers)
            if isinstance(a, ProxyError)))
    return web.Response(body=orjson.dumps({"object": "list", "data": merged}),
                        content_type="application/json")


def _entries(body: bytes) -> list[dict[str, Any]] | None:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        return None
    return [e for e in data if isinstance(e, dict)]
