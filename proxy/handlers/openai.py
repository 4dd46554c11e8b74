"""The OpenAI surface: forward to the upstream byte for byte, with the model made resident first.

What changes on the way: hop-by-hop headers are dropped, a configured alias in `model` becomes
the real key, and a stream that did not ask for usage gets `include_usage` added upstream and the
usage-only chunk removed again before it reaches the client, and the repairs of LM Studio's
OpenAI-compatibility bugs in `proxy/compat.py` (each switchable). Everything else is the original
bytes.
"""
from __future__ import annotations

import asyncio
import time

import orjson
from aiohttp import web

from ..compat import model_object
from ..engine.usage import RequestRecord
from ..engine.lifecycle import Lease
from ..engine.face import Engine
from .. import intake
from ..auth import CREDENTIAL_HEADERS, check_model, visible_models
from ..errors import InvalidRequest, ModelNotFound, ProxyError, UpstreamError
from ..inflight import INFLIGHT, write_or_stall
from ..keys import ACCESS_LOG, COMPAT, CONFIG, ENGINE, RESPONSE_STARTED, ROUTED_TO, TASK, UPSTREAM
from . import routing
from ..streaming import StreamMeter, usage_of_body


HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host",
                        "content-length"})
RESPONSE_DROP = HOP_BY_HOP | {"date", "server"}
# A client's credentials are the proxy's business, never the upstream's: it sees
# upstream.api_token, or nothing (with or without client keys configured).
REQUEST_DROP = HOP_BY_HOP | CREDENTIAL_HEADERS | {"cookie", "content-encoding"}
USAGE_INJECTABLE = frozenset({"/v1/chat/completions", "/v1/completions"})
CLIENT_CLOSED = 499


def error_event(exc: ProxyError) -> bytes:
    """An OpenAI-style error as an SSE event: SDKs raise it instead of returning a cut
    answer as if it were whole."""
    return b"data: " + orjson.dumps(exc.body()) + b"\n\n"


def forward_headers(headers: "web.BaseRequest.headers", drop: frozenset[str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in drop}


def response_headers(headers: "web.BaseRequest.headers") -> list[tuple[str, str]]:
    """The upstream's response headers to pass on, repeated names (Set-Cookie) kept."""
    return [(k, v) for k, v in headers.items() if k.lower() not in RESPONSE_DROP]


async def read_body(request: web.Request) -> bytes:
    return await intake.read_body(request, request.app[CONFIG].server)


def request_headers(request: web.Request) -> dict[str, str]:
    """Headers to forward: the body is sent decoded, and the client's credentials stay here."""
    return forward_headers(request.headers, REQUEST_DROP)


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
        task = routing.task_of(request, payload, name)
        if routing.is_auto(name):
            key = routing.choose(engine, request, payload, task)
            check_model(request, key)          # a key limited to models: the pick too
            request[ROUTED_TO] = key
        else:
            check_model(request, name)
            key = await engine.resolve(name)
        request[TASK] = task
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
    return await _relay(request, engine, lease, key, body, payload, strip,
                        payload.get("stream") is True, started)


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


async def _relay(request: web.Request, engine: Engine, lease: Lease, key: str,
                 body: bytes, payload: dict, strip: bool, stream: bool, started: float
                 ) -> web.StreamResponse:
    status, ok, meter, estimated = CLIENT_CLOSED, False, None, False
    prompt_tokens = completion_tokens = 0
    try:
        async with request.app[UPSTREAM].request(
                "POST", request.path_qs, request_headers(request), body) as up:
            status = up.status
            headers = response_headers(up.headers)
            if ROUTED_TO in request:
                headers.append((routing.ROUTED_HEADER, key))
            if stream and up.status == 200 and \
                    up.headers.get("Content-Type", "").startswith("text/event-stream"):
                meter = StreamMeter(started, strip_usage_chunk=strip)
                chunks = up.chunks()
                # The first byte comes before the headers go out: an upstream silent past
                # read_timeout_s is still a 504, not a 200 that ends in nothing.
                first = await anext(chunks, b"")
                resp = web.StreamResponse(status=up.status, headers=headers)
                await resp.prepare(request)
                request[RESPONSE_STARTED] = True
                request.app[INFLIGHT].stream_started(request, resp)
                try:
                    out = meter.feed(first)
                    if out:
                        await write_or_stall(request, resp, out)
                    async for data in chunks:
                        lease.last_activity_s = engine.clock.now()   # not hung: bytes flow
                        out = meter.feed(data)
                        if out:
                            await write_or_stall(request, resp, out)
                except ProxyError as exc:   # the upstream broke off: say so in the stream
                    status = exc.status
                    await write_or_stall(request, resp, meter.flush() + error_event(exc))
                    await resp.write_eof()
                    return resp
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
                repaired = request.app[COMPAT].repair(request.path, payload, up.status, raw)
                raw, estimated = repaired.body, repaired.tokens_estimated
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
    finally:
        lease.release()
        latency_s = time.perf_counter() - started
        ttft_s = meter.ttft_s if meter is not None else None
        estimated = estimated or (meter is not None and meter.tokens_estimated)
        engine.record(RequestRecord(
            model=key, ok=ok, latency_s=latency_s, at_s=engine.clock.now(),
            endpoint=request.path, status=status, ttft_s=ttft_s, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            tokens_estimated=estimated, task=request.get(TASK)))
        access = request.app[ACCESS_LOG]
        if access.enabled:
            access.add(request.method, request.path, key, status, latency_s, ttft_s,
                       prompt_tokens, completion_tokens,
                       estimated and prompt_tokens + completion_tokens > 0)


async def list_models(request: web.Request) -> web.StreamResponse:
    async with request.app[UPSTREAM].request(
            "GET", request.path_qs, request_headers(request), None) as up:
        raw = await up.read()
        if up.status == 200:
            raw = visible_models(request, raw)
        return web.Response(status=up.status, body=raw,
                            headers=response_headers(up.headers))


async def retrieve_model(request: web.Request) -> web.StreamResponse:
    """GET /v1/models/{id} (the SDKs' models.retrieve), answered from the upstream's list."""
    model_id = request.match_info["model"]
    check_model(request, model_id)    # a key limited to models sees only those
    key = request.app[CONFIG].alias_map().get(model_id, model_id)   # as inference resolves it
    async with request.app[UPSTREAM].request(
            "GET", "/v1/models", request_headers(request), None) as up:
        raw = await up.read()
        if up.status != 200:   # e.g. LM Studio's 401: its answer is the client's answer
            return web.Response(status=up.status, body=raw,
                                headers=response_headers(up.headers))
    try:
        found = model_object(raw, key)
    except ValueError as exc:
        raise UpstreamError(f"LM Studio's model list could not be read: {exc}") from None
    if found is None:
        raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
    request.app[COMPAT].note("models_retrieve")
    return web.Response(body=orjson.dumps(found), content_type="application/json")


def add_routes(app: web.Application) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
                 "/v1/messages"):
        app.router.add_post(path, inference)
    app.router.add_get("/v1/models", list_models)
    if app[CONFIG].compat.models_retrieve:
        app.router.add_get("/v1/models/{model:.+}", retrieve_model)
