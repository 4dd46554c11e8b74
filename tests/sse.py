"""A small Server-Sent Events reader for tests: parses `id`, `event` and `data` lines."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson


@dataclass
class Sse:
    type: str
    data: Any
    id: str | None


class SseReader:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def next(self) -> Sse:
        fields: dict[str, str] = {}
        while True:
            line = await self.resp.content.readline()
            if not line:
                raise EOFError("the event stream ended")
            line = line.rstrip(b"\r\n")
            if not line:
                if "data" in fields:
                    return Sse(fields.get("event", "message"), orjson.loads(fields["data"]),
                               fields.get("id"))
                fields = {}
                continue
            if line.startswith(b":"):
                continue
            name, _, value = line.decode().partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value

    async def until(self, predicate: Any) -> list[Sse]:
        """Every event up to and including the first for which predicate(event) holds."""
        seen = []
        while True:
            ev = await self.next()
            seen.append(ev)
            if predicate(ev):
                return seen
