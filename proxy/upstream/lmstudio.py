"""LM Studio adapter: management through /api/v1 (0.4+), state through /api/v0, forwarding.

It survives LM Studio's quirks: unknown routes answer 200 with an error body (so every response
is checked for its shape), loads take instance ids apart from model keys, and a load refused for
lack of memory is told apart from other failures so the engine can evict and retry.
"""
from __future__ import annotations

import asyncio
import base64
import io
import logging
import ssl
from typing import Any, AsyncIterable, Mapping
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp
import orjson

from ..config import UpstreamConfig
from ..errors import ModelLoadFailed, UpstreamError, UpstreamTimeout, UpstreamUnreachable
from . import fastclient
from .base import ApiLevel, LoadResult, UpstreamModel
from .breaker import CircuitBreaker

log = logging.getLogger("proxy.upstream")

_LARGE_BODY_BYTES = 1024 * 1024   # aiohttp warns past this for a body given as bytes
_OOM_MARKERS = ("insufficient system resources", "out of memory", "not enough memory",
                "insufficient memory")


class LMStudioUpstream:
    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        # user:password@ in the URL becomes a Basic header: the URL shown in errors is clean.
        self.base_url, basic = _split_credentials(config.url)
        self.level: ApiLevel | None = None
        self._session: aiohttp.ClientSession | None = None
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown_s)
        self._fast: fastclient.FastPool | None = None
        # Built once: it is added to every forwarded request.
        self._token_header = f"Bearer {config.api_token}" if config.api_token else basic

    async def start(self) -> None:
        if self._session is None:
            c = self.config
            tls = ssl.create_default_context(cafile=c.ca_file) if c.ca_file else None
            connector = aiohttp.TCPConnector(limit=c.max_connections, keepalive_timeout=30,
                                             ttl_dns_cache=300, ssl=tls if tls else True)
            # sock_read bounds silence between bytes, not the length of a generation.
            timeout = aiohttp.ClientTimeout(total=None, connect=c.connect_timeout_s,
                                            sock_read=c.read_timeout_s)
            # No cookie jar (a relay must not keep upstream cookies, and it costs per request),
            # no decompression (bytes pass through as sent).
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout,
                                                  auto_decompress=False,
                                                  cookie_jar=aiohttp.DummyCookieJar())
            if c.client == "fast":
                self._fast = fastclient.FastPool(
                    self.base_url, connect_timeout_s=c.connect_timeout_s,
                    read_timeout_s=c.read_timeout_s, max_connections=c.max_connections,
                    ssl_context=tls)

    async def close(self) -> None:
        if self._fast is not None:
            await self._fast.close()
            self._fast = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("LMStudioUpstream.start() was not awaited")
        return self._session

    def _auth(self) -> dict[str, str]:
        header = self._token_header
        return {"Authorization": header} if header else {}

    # -- forwarding --------------------------------------------------------------------------
    def request(self, method: str, path: str, headers: dict[str, str],
                body: bytes | AsyncIterable[bytes] | None) -> "_Forward | _FastForward":
        """`async with upstream.request(...) as resp`: every transport error becomes an
        UpstreamError; leaving the block early drops the connection. A body may be an async
        iterable of bytes (sent chunked)."""
        if self._token_header:
            headers["Authorization"] = self._token_header
        if self._fast is not None:
            return _FastForward(self, self._fast.request(method, path, headers, body),
                                method, path)
        return _Forward(self, method, path, headers, body)

    # -- management --------------------------------------------------------------------------
    async def detect(self) -> ApiLevel:
        status, body = await self._call("GET", "/api/v1/models")
        if status == 200 and isinstance(body, dict) and isinstance(body.get("models"), list):
            self.level = ApiLevel.MANAGED
        else:
            status, body = await self._call("GET", "/api/v0/models")
            if status == 200 and isinstance(body, dict) and isinstance(body.get("data"), list):
                self.level = ApiLevel.STATE_ONLY
            else:
                status, body = await self._call("GET", "/v1/models")
                if status == 401:
                    raise UpstreamError("LM Studio rejected the API token "
                                        "(set upstream.api_token)")
                if status != 200 or not isinstance(body, dict) or "data" not in body:
                    raise UpstreamError(f"{self.base_url} does not look like LM Studio "
                                        f"(GET /v1/models answered {status})")
                self.level = ApiLevel.JIT_ONLY
        return self.level

    async def list_models(self) -> list[UpstreamModel]:
        level = self.level or await self.detect()
        if level is ApiLevel.MANAGED:
            _, body = await self._expect("GET", "/api/v1/models", "models")
            return [_from_v1(m) for m in body["models"] if isinstance(m, dict) and "key" in m]
        if level is ApiLevel.STATE_ONLY:
            _, body = await self._expect("GET", "/api/v0/models", "data")
            return [_from_v0(m) for m in body["data"] if isinstance(m, dict) and "id" in m]
        _, body = await self._expect("GET", "/v1/models", "data")
        return [UpstreamModel(key=m["id"]) for m in body["data"]
                if isinstance(m, dict) and "id" in m]

    async def load(self, key: str, options: Mapping[str, Any]) -> LoadResult:
        payload = {**options, "model": key}
        timeout = aiohttp.ClientTimeout(total=self.config.load_timeout_s,
                                        connect=self.config.connect_timeout_s)
        status, body = await self._call("POST", "/api/v1/models/load", payload, timeout=timeout)
        if status == 200 and isinstance(body, dict) and "instance_id" in body:
            return LoadResult(str(body["instance_id"]), body.get("load_time_seconds"))
        reason = _error_text(body) or f"HTTP {status}"
        exc = ModelLoadFailed(f"LM Studio could not load '{key}': {reason}")
        exc.out_of_memory = any(m in reason.lower() for m in _OOM_MARKERS)
        raise exc

    async def unload(self, instance_id: str) -> None:
        status, body = await self._call("POST", "/api/v1/models/unload",
                                        {"instance_id": instance_id})
        if status == 200 and isinstance(body, dict) and "instance_id" in body:
            return
        if status == 404:
            return  # already gone: someone else unloaded it, which is the state we wanted
        raise UpstreamError(f"LM Studio could not unload '{instance_id}': "
                            f"{_error_text(body) or f'HTTP {status}'}")

    async def _expect(self, method: str, path: str, list_key: str) -> tuple[int, dict]:
        status, body = await self._call(method, path)
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get(list_key),
                                                                          list):
            raise UpstreamError(f"unexpected answer from {method} {path}: HTTP {status} "
                                f"{_error_text(body) or ''}".rstrip())
        return status, body

    async def _call(self, method: str, path: str, payload: Any = None, *,
                    timeout: aiohttp.ClientTimeout | None = None) -> tuple[int, Any]:
        data = orjson.dumps(payload) if payload is not None else None
        headers = {"Content-Type": "application/json", **self._auth()}
        self.breaker.before()
        try:
            async with self.session.request(method, self.base_url + path, data=data,
                                            headers=headers, timeout=timeout) as resp:
                raw = await resp.read()
                status = resp.status
        except Exception as exc:
            raise self._failed(exc, f"{method} {path}") from exc
        self.breaker.success()
        try:
            return status, orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return status, raw.decode("utf-8", "replace")


    def _failed(self, exc: BaseException, what: str) -> BaseException:
        mapped = map_transport_error(exc, self.base_url, what)
        if isinstance(mapped, UpstreamUnreachable):
            self.breaker.failure(mapped.message)
        return mapped


# One table for every transport failure of either client, wherever it happens: connecting,
# waiting for the answer, or reading its body half-way. Order matters: the first match wins.
_TRANSPORT_ERRORS: tuple[tuple[type[BaseException], type[UpstreamError], str], ...] = (
    (fastclient.ConnectTimeout, UpstreamTimeout,
     "LM Studio at {url} did not accept a connection for {what}: {exc}"),
    (asyncio.TimeoutError, UpstreamTimeout, "LM Studio at {url} went silent on {what}"),
    (fastclient.ConnectFailed, UpstreamUnreachable, "cannot reach LM Studio at {url}: {exc}"),
    (fastclient.Disconnected, UpstreamError, "LM Studio at {url} broke off {what}: {exc}"),
    (fastclient.ProtocolError, UpstreamError, "LM Studio at {url} failed on {what}: {exc}"),
    (aiohttp.ClientConnectorError, UpstreamUnreachable, "cannot reach LM Studio at {url}: {exc}"),
    (aiohttp.ClientPayloadError, UpstreamError, "LM Studio at {url} broke off {what}: {exc}"),
    (aiohttp.ServerDisconnectedError, UpstreamError,
     "LM Studio at {url} closed the connection on {what}"),
    (aiohttp.ClientError, UpstreamError, "LM Studio at {url} failed on {what}: {exc!r}"),
    (ConnectionError, UpstreamError, "LM Studio at {url} failed on {what}: {exc!r}"),
)


def map_transport_error(exc: BaseException, url: str, what: str) -> BaseException:
    if isinstance(exc, UpstreamError):
        return exc
    for cls, mapped, text in _TRANSPORT_ERRORS:
        if isinstance(exc, cls):
            if isinstance(exc, aiohttp.ClientConnectorError):
                detail: object = exc.os_error.strerror or exc
            else:
                detail = exc
            return mapped(text.format(url=url, what=what, exc=detail))
    return exc


class _Response:
    """An aiohttp response behind the project's UpstreamResponse; reads map their errors."""
    __slots__ = ("_resp", "status", "headers", "_url", "_what")

    def __init__(self, resp: aiohttp.ClientResponse, url: str, what: str) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = resp.headers
        self._url, self._what = url, what

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except Exception as exc:
            raise map_transport_error(exc, self._url, self._what) from exc

    def chunks(self) -> "_Chunks":
        return _Chunks(self)


class _Chunks:
    __slots__ = ("_read", "_r")

    def __init__(self, r: _Response) -> None:
        self._r = r
        self._read = r._resp.content.readany

    def __aiter__(self) -> "_Chunks":
        return self

    async def __anext__(self) -> bytes:
        try:
            data = await self._read()
        except Exception as exc:
            raise map_transport_error(exc, self._r._url, self._r._what) from exc
        if not data:
            raise StopAsyncIteration
        return data


class _Forward:
    """A class-based async context manager: cheaper per request than asynccontextmanager."""
    __slots__ = ("upstream", "method", "path", "headers", "body", "resp")
    # The response body is read through _Response, whose reads map transport errors.

    def __init__(self, upstream: LMStudioUpstream, method: str, path: str,
                 headers: dict[str, str], body: bytes | None) -> None:
        self.upstream, self.method, self.path = upstream, method, path
        self.headers, self.body = headers, body
        self.resp: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> _Response:
        up = self.upstream
        what = f"{self.method} {self.path}"
        up.breaker.before()
        body = self.body
        if isinstance(body, bytes) and len(body) > _LARGE_BODY_BYTES:
            body = io.BytesIO(body)   # aiohttp sends it in pieces instead of warning
        try:
            self.resp = await up.session.request(self.method, up.base_url + self.path,
                                                 headers=self.headers, data=body,
                                                 allow_redirects=False)
        except Exception as exc:
            raise up._failed(exc, what) from exc
        up.breaker.success()
        return _Response(self.resp, up.base_url, what)

    async def __aexit__(self, exc_type: type | None, exc: BaseException | None,
                        tb: object) -> None:
        assert self.resp is not None
        if exc_type is None:
            self.resp.release()
        else:
            self.resp.close()  # drop the connection: the upstream stops generating for nobody


class _FastResponse:
    """A fastclient response behind the project's UpstreamResponse; reads map their errors."""
    __slots__ = ("_resp", "_next", "status", "headers", "_forward")

    def __init__(self, resp: fastclient.FastResponse, forward: "_FastForward") -> None:
        self._resp = resp
        self._next = resp.next_chunk   # one await per read, no iterator layer between
        self.status = resp.status
        self.headers = resp.headers
        self._forward = forward

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except Exception as exc:
            raise self._forward.mapped(exc) from exc

    def chunks(self) -> "_FastResponse":
        return self

    def __aiter__(self) -> "_FastResponse":
        return self

    async def __anext__(self) -> bytes:
        try:
            data = await self._next()
        except Exception as exc:
            raise self._forward.mapped(exc) from exc
        if not data:
            raise StopAsyncIteration
        return data


class _FastForward:
    __slots__ = ("upstream", "exchange", "method", "path")

    def __init__(self, upstream: LMStudioUpstream, exchange: fastclient.Exchange, method: str,
                 path: str) -> None:
        self.upstream, self.exchange, self.method, self.path = upstream, exchange, method, path

    def mapped(self, exc: BaseException) -> BaseException:
        return map_transport_error(exc, self.upstream.base_url, f"{self.method} {self.path}")

    async def __aenter__(self) -> _FastResponse:
        up = self.upstream
        up.breaker.before()
        try:
            resp = await self.exchange.__aenter__()
        except Exception as exc:
            raise up._failed(exc, f"{self.method} {self.path}") from exc
        up.breaker.success()
        return _FastResponse(resp, self)

    async def __aexit__(self, exc_type: type | None, exc: BaseException | None,
                        tb: object) -> None:
        await self.exchange.__aexit__(exc_type, exc, tb)


def _split_credentials(url: str) -> tuple[str, str | None]:
    """(the URL without user:password@, the Basic Authorization header they make, or None)."""
    parts = urlsplit(url.rstrip("/"))
    if "@" not in parts.netloc:
        return url.rstrip("/"), None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
    return urlunsplit(parts._replace(netloc=host)), f"Basic {token}"


def _error_text(body: Any) -> str | None:
    if isinstance(body, str):
        return body.strip() or None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, str):
            return err
        if isinstance(err, dict):
            return str(err.get("message") or err)
    return None


def _from_v1(m: dict[str, Any]) -> UpstreamModel:
    instances = tuple(str(i["id"]) for i in m.get("loaded_instances") or [] if "id" in i)
    return UpstreamModel(key=m["key"], type="embedding" if m.get("type") == "embedding"
                         else "llm", size_bytes=m.get("size_bytes"), instance_ids=instances,
                         max_context_length=m.get("max_context_length"),
                         extra={k: m[k] for k in ("publisher", "params_string", "format")
                                if k in m})


def _from_v0(m: dict[str, Any]) -> UpstreamModel:
    state = m.get("state")
    return UpstreamModel(key=m["id"], type="embedding" if m.get("type") == "embeddings"
                         else "llm", instance_ids=(m["id"],) if state == "loaded" else (),
                         loading=state == "loading",
                         max_context_length=m.get("max_context_length"))
