"""What every JSON-over-HTTP backend protocol shares: credentials taken out of the URL, a
forwarding transport and a management transport on one circuit breaker, JSON management calls,
and the error text of an answer whatever its shape.
"""
from __future__ import annotations

import base64
from typing import Any, AsyncIterable
from urllib.parse import unquote, urlsplit, urlunsplit

import orjson

from ..config import UpstreamConfig
from .breaker import CircuitBreaker
from .transport import Exchange, Transport, create_transport


class HttpBackend:
    """start/close/request and `_call` for a protocol subclass; `name` is used in messages."""
    name = "the upstream"
    kind = "openai"     # its upstream.kind
    # Set by detect() when the server answers but is another kind than configured (a
    # sentence for the log and /readyz); None when it is what it should be.
    kind_hint: str | None = None

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        # user:password@ in the URL becomes a Basic header: the URL shown in errors is clean.
        self.base_url, basic = split_credentials(config.url)
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown_s)
        self._forward: Transport | None = None
        self._manage: Transport | None = None
        self._token_header = f"Bearer {config.api_token}" if config.api_token else basic

    async def start(self) -> None:
        if self._forward is None:
            c = self.config
            # Management calls keep a pool of their own: a load must not queue behind streams.
            self._manage = create_transport(c, "aiohttp", self.breaker, url=self.base_url,
                                            server=self.name)
            self._forward = (self._manage if c.client == "aiohttp"
                             else create_transport(c, c.client, self.breaker,
                                                   url=self.base_url, server=self.name))

    async def close(self) -> None:
        forward, manage = self._forward, self._manage
        self._forward = self._manage = None
        if forward is not None and forward is not manage:
            await forward.close()
        if manage is not None:
            await manage.close()

    @property
    def started(self) -> bool:
        return self._forward is not None

    def request(self, method: str, path: str, headers: dict[str, str],
                body: bytes | AsyncIterable[bytes] | None) -> Exchange:
        if self._forward is None:
            raise RuntimeError(f"{type(self).__name__}.start() was not awaited")
        if self._token_header:
            headers["Authorization"] = self._token_header
        return self._forward.request(method, path, headers, body)

    async def _call(self, method: str, path: str, payload: Any = None, *,
                    timeout_s: float | None = None) -> tuple[int, Any]:
        """(status, the body parsed as JSON, or as text when it is not JSON)."""
        if self._manage is None:
            raise RuntimeError(f"{type(self).__name__}.start() was not awaited")
        data = orjson.dumps(payload) if payload is not None else None
        headers = {"Content-Type": "application/json"}
        if self._token_header:
            headers["Authorization"] = self._token_header
        async with self._manage.request(method, path, headers, data,
                                        timeout_s=timeout_s) as resp:
            raw = await resp.read()
            status = resp.status
        try:
            return status, orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return status, raw.decode("utf-8", "replace")


def split_credentials(url: str) -> tuple[str, str | None]:
    """(the URL without user:password@, the Basic Authorization header they make, or None)."""
    parts = urlsplit(url.rstrip("/"))
    if "@" not in parts.netloc:
        return url.rstrip("/"), None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
    return urlunsplit(parts._replace(netloc=host)), f"Basic {token}"


def error_text(body: Any) -> str | None:
    """The message of an error answer: a plain string, {"error": "..."} or OpenAI's envelope."""
    if isinstance(body, str):
        return body.strip() or None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, str):
            return err
        if isinstance(err, dict):
            return str(err.get("message") or err)
    return None
