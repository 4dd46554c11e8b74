"""The HTTP calls behind the MCP tools, and the proxy's refusals turned into tool errors."""
from __future__ import annotations

from typing import Any, Mapping

import aiohttp
from mcp.server.mcpserver.exceptions import ToolError

from ..errors import clip

TIMEOUT_S = 600.0   # a load may wait for evictions and a slow disk


class ProxyClient:
    """One proxy, one key: `Authorization: Bearer <key>` on every call when a key is given;
    `headers` are sent as well."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = TIMEOUT_S,
                 headers: dict[str, str] | None = None, key_hint: str = ""):
        self.url = url.rstrip("/")
        self.key_hint = key_hint   # where this server's key comes from, said on a 401
        self.headers = dict(headers or {})
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout_s = timeout_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def get(self, path: str, action: str, params: dict[str, str] | None = None) -> Any:
        return await self._call("GET", path, action, params=params)

    async def post(self, path: str, action: str, body: dict[str, Any] | None = None) -> Any:
        return await self._call("POST", path, action, json=body or {})

    async def _call(self, method: str, path: str, action: str, **kwargs: Any) -> Any:
        try:
            async with aiohttp.ClientSession(timeout=self.timeout) as session:
                async with session.request(method, self.url + path, headers=self.headers,
                                           **kwargs) as resp:
                    data = await resp.json(content_type=None)
                    if resp.status >= 400:
                        hint = self.key_hint if resp.status == 401 else ""
                        raise ToolError(refusal(action, resp.status, data) + hint +
                                        retry_advice(resp.headers))
                    if not isinstance(data, dict) or "error" in data:
                        # LM Studio answers an unknown route 200 {"error": ...}: a "success"
                        # an agent would believe (its model loaded)
                        raise ToolError(f"cannot {action}: the server at {self.url} is not "
                                        f"the proxy: it answered {method} {path} with "
                                        f"{clip(str(data))}; is that LM Studio's or another "
                                        f"server's address rather than the proxy's?")
                    return data
        except aiohttp.ClientError as exc:
            raise ToolError(f"cannot {action}: the proxy at {self.url} did not answer "
                            f"({exc.__class__.__name__}: {exc})") from None
        except TimeoutError:   # aiohttp's total deadline: not a ClientError
            raise ToolError(f"cannot {action}: the proxy at {self.url} did not answer within "
                            f"{self.timeout_s:g} s") from None
        except ValueError:
            raise ToolError(f"cannot {action}: the proxy at {self.url} did not answer "
                            f"with JSON") from None


def refusal(action: str, status: int, data: Any) -> str:
    """The tool error an agent can act on: what was refused, why, and in the proxy's words."""
    error = data.get("error") if isinstance(data, dict) else None
    error = error if isinstance(error, dict) else {}
    message = error.get("message") or f"HTTP {status}"
    code = error.get("code")
    if status == 403 and code == "admin_required":
        return f"admin token required to {action}: {message}"
    if status == 401:
        return f"API key refused, cannot {action} ({code or 'unauthorized'}): {message}"
    if status == 403:
        return f"not allowed to {action} ({code or 'forbidden'}): {message}"
    return f"cannot {action}: HTTP {status}" + (f" {code}" if code else "") + f": {message}"


def retry_advice(headers: Mapping[str, str]) -> str:
    """What HTTP says in headers (Retry-After, x-should-retry), said to the agent in words."""
    if headers.get("x-should-retry") == "false":
        return " (asking again gets the same answer)"
    seconds = headers.get("Retry-After", "")
    return f" (ask again in {seconds} s)" if seconds.isdigit() else ""
