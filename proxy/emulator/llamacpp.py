"""An emulated llama.cpp `llama-server` in router mode: `python -m proxy.emulator --flavor
llamacpp`. Its API and texts are the real router's (see router_state.py for its behaviour):

    GET  /health /props /models (= /v1/models) /models/sse
    POST /models/load {"model"}      200 {"success": true} at once; 404 File Not Found;
                                     400 "model is already running"
    POST /models/unload {"model"}    400 "model is not running" / "model is not found"
    POST /v1/chat/completions /v1/completions /v1/embeddings
         400 "model name is missing from the request", "model 'x' not found",
         "model is not loaded" (autoload off; `?autoload=true` overrides), 500 "model name=x
         failed to load", 501 for embeddings of a model started without --embeddings
"""
from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from ..server.serving import Served, serve
from . import generation as gen
from .catalog import CatalogModel
from .router_state import RouterModel, RouterState


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(status: int, message: str, type_: str = "invalid_request_error") -> web.Response:
    return _json({"error": {"code": status, "message": message, "type": type_}}, status)


def _not_found() -> web.Response:
    return _json({"error": {"message": "File Not Found", "type": "not_found_error",
                            "code": 404}}, 404)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}


class _Router:
    def __init__(self, state: RouterState, tokens_per_s: float) -> None:
        self.state = state
        self.delay_s = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0

    async def health(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def props(self, request: web.Request) -> web.Response:
        return _json({"role": "router", "max_instances": self.state.models_max,
                      "models_autoload": self.state.autoload})

    async def models(self, request: web.Request) -> web.Response:
        return _json({"object": "list",
                      "data": [self.state.entry(m) for m in self.state.models.values()]})

    async def events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        q = self.state.subscribe()
        try:
            while True:
                await resp.write(gen.sse(await q.get()))
        finally:
            self.state.subscribers.discard(q)

    async def load(self, request: web.Request) -> web.Response:
        m = self.state.models.get(str((await _body(request)).get("model") or ""))
        if m is None:
            return _not_found()
        if m.running:
            return _error(400, "model is already running")
        self.state.start_load(m.key)
        return _json({"success": True})

    async def unload(self, request: web.Request) -> web.Response:
        m = self.state.models.get(str((await _body(request)).get("model") or ""))
        if m is None:
            return _error(400, "model is not found")
        if not m.running:
            return _error(400, "model is not running")
        self.state.unload(m.key)
        return _json({"success": True})

    def inference(self, kind: str) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            body = await _body(request)
            name = body.get("model")
            if not isinstance(name, str) or not name:
                return _error(400, "model name is missing from the request")
            m = self.state.models.get(name)
            if m is None:
                return _error(400, f"model '{name}' not found")
            if m.status != "loaded":
                if not (self.state.autoload or request.query.get("autoload") == "true"):
                    return _error(400, "model is not loaded")
                if not m.running:
                    self.state.start_load(m.key)
                if not await self.state.wait_loaded(m.key):
                    return _error(500, f"model name={m.key} failed to load", "server_error")
            m.busy += 1
            try:
                return await self._serve(request, kind, m, body)
            finally:
                m.busy -= 1
                m.last_used_s = time.monotonic()
        return handler

    async def _serve(self, request: web.Request, kind: str, m: RouterModel,
                     body: dict[str, Any]) -> web.StreamResponse:
        prompt_tokens = gen.count_tokens(gen.prompt_text(body))
        if kind == "embeddings":
            if m.spec.type != "embedding":
                return _error(501, "This server does not support embeddings. Start it with "
                                   "`--embeddings`", "not_supported_error")
            inputs = body.get("input")
            texts = inputs if isinstance(inputs, list) else [inputs]
            b64 = body.get("encoding_format") == "base64"
            data = [{"object": "embedding", "index": i,
                     "embedding": gen.embed_base64(m.key, str(t)) if b64
                     else gen.embed(m.key, str(t))} for i, t in enumerate(texts)]
            return _json({"object": "list", "model": m.key, "data": data,
                          "usage": {"prompt_tokens": prompt_tokens,
                                    "total_tokens": prompt_tokens}})
        tokens = gen.generate(m.key, body)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                 "total_tokens": prompt_tokens + len(tokens)}
        chat = kind == "chat"
        rid = gen.request_id("chatcmpl-" if chat else "cmpl-", m.key, body)
        base = {"id": rid, "created": int(time.time()), "model": m.key,
                "system_fingerprint": "b0-emulated",
                "object": "chat.completion" if chat else "text_completion"}
        if not body.get("stream"):
            text = "".join(tokens)
            choice = ({"message": {"role": "assistant", "content": text}} if chat
                      else {"text": text})
            return _json({**base, "choices": [{"index": 0, "finish_reason": "length",
                                               **choice}],
                          "usage": usage, "timings": _timings(usage)})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base["object"] = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict[str, Any] | None, **extra: Any) -> bytes:
            return gen.sse({**base, "choices": [{"index": 0, **choice}] if choice else [],
                            **extra})
        if chat:
            await resp.write(chunk({"finish_reason": None,
                                    "delta": {"role": "assistant", "content": None}}))
        for tok in tokens:
            await resp.write(chunk({"finish_reason": None,
                                    **({"delta": {"content": tok}} if chat else {"text": tok})}))
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        await resp.write(chunk({"finish_reason": "length",
                                **({"delta": {}} if chat else {"text": ""})}))
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            await resp.write(chunk(None, usage=usage, timings=_timings(usage)))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _timings(usage: dict[str, int]) -> dict[str, float]:
    return {"prompt_n": usage["prompt_tokens"], "prompt_ms": 1.0,
            "predicted_n": usage["completion_tokens"], "predicted_ms": 1.0}


def create_router_app(state: RouterState, *, tokens_per_s: float = 0.0) -> web.Application:
    api = _Router(state, tokens_per_s)
    app = web.Application()
    r = app.router
    r.add_get("/health", api.health)
    r.add_get("/props", api.props)
    r.add_get("/models", api.models)
    r.add_get("/v1/models", api.models)
    r.add_get("/models/sse", api.events)
    r.add_post("/models/load", api.load)
    r.add_post("/models/unload", api.unload)
    r.add_post("/v1/chat/completions", api.inference("chat"))
    r.add_post("/chat/completions", api.inference("chat"))
    r.add_post("/v1/completions", api.inference("text"))
    r.add_post("/v1/embeddings", api.inference("embeddings"))
    return app


@dataclass
class RouterEmulator:
    state: RouterState
    served: Served
    files: tempfile.TemporaryDirectory | None = None   # its own models directory, if any

    @property
    def url(self) -> str:
        return self.served.url

    async def close(self) -> None:
        for m in self.state.models.values():
            if m.task is not None and not m.task.done():
                m.task.cancel()
        await self.served.close()
        if self.files is not None:
            self.files.cleanup()


async def start_router_emulator(catalog: list[CatalogModel], *, host: str = "127.0.0.1",
                                port: int = 0, tokens_per_s: float = 0.0,
                                files: bool = False, **state_options: Any) -> RouterEmulator:
    """`files`: the models as sparse files in a temporary directory of its own (removed on
    close), so that a proxy on this host sees their sizes before they load."""
    owned = tempfile.TemporaryDirectory(prefix="llamacpp-emulator-") if files else None
    if owned is not None:
        state_options["models_dir"] = Path(owned.name)
    state = RouterState(catalog, **state_options)
    served = await serve(create_router_app(state, tokens_per_s=tokens_per_s), host, port)
    return RouterEmulator(state, served, owned)
