"""The OpenAI surface: forward to the upstream byte for byte, with the model made resident first.

What changes on the way: hop-by-hop headers are dropped, a configured alias in `model` becomes
the real key, and a stream that did not ask for usage gets `include_usage` added upstream and the
usage-only chunk removed again before it reaches the client. Everything else is the original bytes.
"""
from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
from aiohttp import web

from ..engine.usage import RequestRecord
from ..engine.lifecycle import Lease
from ..engine.manager import ModelMemoryManager
from .. import intake
from ..auth import CLIENT_KEY, CREDENTIAL_HEADERS, check_model, visible_models
from ..errors import InvalidRequest, ProxyError, UpstreamError, UpstreamTimeout
from ..inflight import INFLIGHT, write_or_stall
from ..keys import ACCESS_LOG, CONFIG, ENGINE, RESPONSE_STARTED, UPSTREAM
from ..streaming import StreamMeter, usage_of_body


HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host",
                        "content-length"})
RESPONSE_DROP = HOP_BY_HOP | {"date", "server"}
REQUEST_DROP = HOP_BY_HOP | {"content-encoding"}
USAGE_INJECTABLE = frozenset({"/v1/chat/completions", "/v1/completions"})
CLIENT_CLOSED = 499


def forward_headers(headers: "web.BaseRequest.headers", drop: frozenset[str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in drop}


async def read_body(request: web.Request) -> bytes:
    return await intake.read_body(request, request.app[CONFIG].server)


def request_headers(request: web.Request) -> dict[str, str]:
    """Headers to forward: the body is sent decoded, and a key the proxy accepted stays here."""
    drop = REQUEST_DROP if request.get(CLIENT_KEY) is None else REQUEST_DROP | CREDENTIAL_HEADERS
    return forward_headers(request.headers, drop)


def parse_request(body: bytes) -> dict:
    if not body:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = payload.get("model")
    if model is None:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string.", param="model")
    return payload


async def inference(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    engine = request.app[ENGINE]
    name = ""
    try:
        body = await read_body(request)
        payload = parse_request(body)
        name = payload["model"]
        intake.check_model_name(name, request.app[CONFIG].server)
        check_model(request, name)
        key = await engine.resolve(name)
        body, strip = _prepare_upstream_body(request.path, payload, body, key)
        lease = await engine.acquire(key)
    except ProxyError as exc:   # refused before reaching the upstream: still counted
        latency_s = time.perf_counter() - started
        engine.record(RequestRecord(model=name, ok=False, latency_s=latency_s,
                                    at_s=engine.clock.now(), endpoint=request.path,
                                    status=exc.status))
        access = request.app[ACCESS_LOG]
        if access.enabled:
            access.add(request.method, request.path, name or "-", exc.status, latency_s, None,
                       0, 0, False)
        raise
    return await _relay(request, engine, lease, key, body, strip, payload.get("stream") is True,
                        started)


def _prepare_upstream_body(path: str, payload: dict, body: bytes, key: str
                           ) -> tuple[bytes, bool]:
    """The bytes to send upstream, and whether to strip an include_usage chunk we asked for.
    The client's bytes go through untouched unless the alias or include_usage changes them."""
    changed = key != payload["model"]
    if changed:
        payload["model"] = key
    strip = False
    if payload.get("stream") is True and path in USAGE_INJECTABLE:
        opts = payload.get("stream_options")
        if not (isinstance(opts, dict) and opts.get("include_usage")):
            payload["stream_options"] = {**(opts if isinstance(opts, dict) else {}),
                                         "include_usage": True}
            strip = changed = True
    return (orjson.dumps(payload) if changed else body), strip


async def _relay(request: web.Request, engine: ModelMemoryManager, lease: Lease, key: str,
                 body: bytes, strip: bool, stream: bool, started: float) -> web.StreamResponse:
    status, ok, meter = CLIENT_CLOSED, False, None
    prompt_tokens = completion_tokens = 0
    try:
        async with request.app[UPSTREAM].request(
                "POST", request.path_qs, request_headers(request), body) as up:
            status = up.status
            headers = forward_headers(up.headers, RESPONSE_DROP)
            if stream and up.status == 200 and \
                    up.headers.get("Content-Type", "").startswith("text/event-stream"):
                meter = StreamMeter(started, strip_usage_chunk=strip)
                resp = web.StreamResponse(status=up.status, headers=headers)
                await resp.prepare(request)
                request[RESPONSE_STARTED] = True
                request.app[INFLIGHT].stream_started(request, resp)
                async for data in up.content.iter_any():
                    lease.last_activity_s = engine.clock.now()   # not hung: bytes flow
                    out = meter.feed(data)
                    if out:
                        await write_or_stall(request, resp, out)
                tail = meter.flush()
                if tail:
                    await write_or_stall(request, resp, tail)
                await resp.write_eof()
                ok = meter.done or meter.usage_seen or meter.content_events > 0
                prompt_tokens = meter.prompt_tokens
                completion_tokens = meter.completion_tokens_or_estimate()
                return resp
            raw = await up.read()
            ok = up.status < 400
            if ok:
                counted = usage_of_body(raw)
                if counted:
                    prompt_tokens, completion_tokens = counted
            return web.Response(status=up.status, body=raw, headers=headers)
    except (asyncio.CancelledError, ConnectionResetError):
        status, ok = CLIENT_CLOSED, False   # the client went away; upstream is closed with it
        raise
    except ProxyError as exc:               # the upstream could not be reached or timed out
        status, ok = exc.status, False
        raise
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        ok = False                          # the upstream broke off mid-response
        if request.get(RESPONSE_STARTED):
            status = 502
            raise                           # the client sees the stream cut, as it was
        error = UpstreamTimeout if isinstance(exc, asyncio.TimeoutError) else UpstreamError
        mapped = error(f"LM Studio broke off the response: {exc!r}")
        status = mapped.status
        raise mapped from exc
    finally:
        lease.release()
        latency_s = time.perf_counter() - started
        ttft_s = meter.ttft_s if meter is not None else None
        engine.record(RequestRecord(
            model=key, ok=ok, latency_s=latency_s, at_s=engine.clock.now(),
            endpoint=request.path, status=status, ttft_s=ttft_s, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            tokens_estimated=meter is not None and meter.tokens_estimated))
        access = request.app[ACCESS_LOG]
        if access.enabled:
            access.add(request.method, request.path, key, status, latency_s, ttft_s,
                       prompt_tokens, completion_tokens,
                       meter is not None and meter.tokens_estimated and completion_tokens > 0)


async def list_models(request: web.Request) -> web.StreamResponse:
    async with request.app[UPSTREAM].request(
            "GET", request.path_qs, request_headers(request), None) as up:
        raw = await up.read()
        if up.status == 200:
            raw = visible_models(request, raw)
        return web.Response(status=up.status, body=raw,
                            headers=forward_headers(up.headers, RESPONSE_DROP))


def add_routes(app: web.Application) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
                 "/v1/messages"):
        app.router.add_post(path, inference)
    app.router.add_get("/v1/models", list_models)
