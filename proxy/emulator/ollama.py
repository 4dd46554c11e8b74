"""Ollama's HTTP surface, emulated: `python -m proxy.emulator --flavor ollama`.

Native routes as documented (docs.ollama.com/api): /api/version, /api/tags, /api/ps,
/api/generate (an empty prompt loads; with keep_alive 0 it unloads), /api/embed (no input
loads); the OpenAI-compatible /v1/models, /v1/chat/completions, /v1/completions,
/v1/embeddings. Errors have Ollama's shapes: `{"error": "..."}` natively, OpenAI's envelope
(`type` api_error, not_found_error or invalid_request_error; `code` null) under /v1. The
scheduler's quirks (its own evictions, keep-alive expiry, the bounded queue) live in
ollama_state.py. `/__emulator__/stats` is for tests.
"""
from __future__ import annotations

import hashlib
import math
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web

from ..server.serving import serve
from . import Emulator, generation as gen
from .catalog import CatalogModel, load_catalog
from .ollama_state import OllamaRefused, OllamaState, Runner, keep_alive_seconds

VERSION = "0.12.6"
FOREVER_S = (2**63 - 1) / 1e9   # Go adds math.MaxInt64 ns for a negative keep_alive
OLLAMA_STATE = web.AppKey("ollama_state", OllamaState)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _native_error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


def _openai_error(status: int, message: str) -> web.Response:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return _json({"error": {"message": message, "type": kind, "param": None, "code": None}},
                 status)


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()   # a sha256, as Ollama's blobs have


def _time(t_s: float) -> str:
    return datetime.fromtimestamp(t_s, timezone.utc).isoformat()


def create_ollama_app(state: OllamaState) -> web.Application:
    app = web.Application(client_max_size=64 * 2**20)
    app[OLLAMA_STATE] = state
    api = _Api(state)
    r = app.router
    r.add_get("/", api.root)
    r.add_get("/api/version", api.version)
    r.add_get("/api/tags", api.tags)
    r.add_get("/api/ps", api.ps)
    r.add_post("/api/generate", api.generate)
    r.add_post("/api/embed", api.embed)
    r.add_get("/v1/models", api.openai_models)
    for path, kind in (("/v1/chat/completions", "chat"), ("/v1/completions", "text"),
                       ("/v1/embeddings", "embed")):
        r.add_post(path, api.openai_handler(kind))
    r.add_get("/__emulator__/stats", api.stats)
    r.add_route("*", "/{tail:.*}", api.not_found)
    return app


class _Api:
    def __init__(self, state: OllamaState) -> None:
        self.state = state

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def not_found(self, request: web.Request) -> web.Response:
        return web.Response(status=404, text="404 page not found")   # Gin's own answer

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": VERSION})

    def _details(self, m: CatalogModel) -> dict[str, Any]:
        family = "bert" if m.type == "embedding" else m.architecture
        return {"parent_model": "", "format": m.format, "family": family, "families": [family],
                "parameter_size": m.params_string or "", "quantization_level": m.quantization}

    async def tags(self, request: web.Request) -> web.Response:
        return _json({"models": [
            {"name": name, "model": name, "modified_at": _time(1_735_689_600),
             "size": m.size_bytes, "digest": _digest(name),
             "details": self._details(m)} for name, m in self.state.models.items()]})

    async def ps(self, request: web.Request) -> web.Response:
        self.state.expire()
        now = self.state.clock()
        out = []
        for r in self.state.runners.values():
            ttl_s = r.keep_alive_s if r.expires_at_s is None else r.expires_at_s - now
            expires = now + (FOREVER_S if math.isinf(ttl_s) else ttl_s)
            out.append({"name": r.name, "model": r.name, "size": r.size_bytes,
                        "digest": _digest(r.name),
                        "details": self._details(r.model), "expires_at": _time(expires),
                        "size_vram": r.size_vram_bytes,
                        "context_length": min(r.model.max_context_length, 4096)})
        return _json({"models": out})

    async def stats(self, request: web.Request) -> web.Response:
        s = self.state
        return _json({"runners": sorted(s.runners), "waiting": s.waiting,
                      "rejected": s.rejected, "evictions": s.evictions,
                      "load_calls": dict(s.load_calls), "unload_calls": dict(s.unload_calls),
                      "inference_calls": dict(s.inference_calls)})

    # -- native ------------------------------------------------------------------------------
    async def _native_body(self, request: web.Request) -> tuple[dict[str, Any], float | None]:
        body = await _body(request)
        if not isinstance(body, dict):
            raise OllamaRefused(400, "invalid request body")
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise OllamaRefused(400, "model is required")
        try:
            return body, keep_alive_seconds(body.get("keep_alive"))
        except ValueError as exc:
            raise OllamaRefused(400, str(exc)) from None

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body, keep_alive_s = await self._native_body(request)
            name = body["model"]
            full, model = self.state.lookup(name)
            prompt = body.get("prompt") or ""
            if not prompt and keep_alive_s == 0:
                self.state.stop(full)
                return _json({"model": name, "created_at": _time(self.state.clock()),
                              "response": "", "done": True, "done_reason": "unload"})
            if model.type == "embedding":
                raise OllamaRefused(400, f'"{name}" does not support generate')
            started = self.state.clock()
            runner = await self.state.schedule(full, keep_alive_s)
        except OllamaRefused as exc:
            return _native_error(exc.status, exc.message)
        try:
            load_ns = int((self.state.clock() - started) * 1e9)
            if not prompt:
                return _json({"model": name, "created_at": _time(self.state.clock()),
                              "response": "", "done": True, "done_reason": "load",
                              "load_duration": load_ns})
            self.state.inference_calls[full] += 1
            tokens = gen.generate(full, {"prompt": prompt, **body})
            final = {"model": name, "created_at": _time(self.state.clock()), "done": True,
                     "done_reason": "stop", "load_duration": load_ns,
                     "prompt_eval_count": gen.count_tokens(prompt),
                     "eval_count": len(tokens)}
            if body.get("stream") is False:
                return _json({**final, "response": "".join(tokens)})
            resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await resp.prepare(request)
            for tok in tokens:
                await resp.write(orjson.dumps({"model": name, "created_at": final["created_at"],
                                               "response": tok, "done": False}) + b"\n")
            await resp.write(orjson.dumps({**final, "response": ""}) + b"\n")
            await resp.write_eof()
            return resp
        finally:
            self.state.release(runner)

    async def embed(self, request: web.Request) -> web.Response:
        try:
            body, keep_alive_s = await self._native_body(request)
            raw = body.get("input")
            texts = [raw] if isinstance(raw, str) and raw else raw if isinstance(raw, list) \
                else []
            started = self.state.clock()
            full, _ = self.state.lookup(body["model"])
            runner = await self.state.schedule(full, keep_alive_s)
        except OllamaRefused as exc:
            return _native_error(exc.status, exc.message)
        try:
            self.state.inference_calls[full] += bool(texts)
            return _json({"model": body["model"],
                          "embeddings": [gen.embed(full, str(t)) for t in texts],
                          "load_duration": int((self.state.clock() - started) * 1e9),
                          "prompt_eval_count": sum(gen.count_tokens(str(t)) for t in texts)})
        finally:
            self.state.release(runner)

    # -- OpenAI-compatible -------------------------------------------------------------------
    async def openai_models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [
            {"id": name, "object": "model", "created": 1_735_689_600,
             "owned_by": name.split("/")[0] if "/" in name else "library"}
            for name in self.state.models]})

    def openai_handler(self, kind: str) -> Callable[[web.Request], Awaitable]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._openai(request, kind)
        return handler

    async def _openai(self, request: web.Request, kind: str) -> web.StreamResponse:
        body = await _body(request)
        if not isinstance(body, dict):
            return _openai_error(400, "invalid request body")
        name = body.get("model")
        if not isinstance(name, str) or not name:
            return _openai_error(400, "model is required")
        try:
            full, model = self.state.lookup(name)
            if kind != "embed" and model.type == "embedding":
                what = "chat" if kind == "chat" else "generate"
                raise OllamaRefused(400, f'"{name}" does not support {what}')
            runner = await self.state.schedule(full, None)   # /v1 carries no keep_alive
        except OllamaRefused as exc:
            return _openai_error(exc.status, exc.message)
        try:
            self.state.inference_calls[full] += 1
            if kind == "embed":
                return self._embeddings(name, full, body)
            return await self._generation(request, kind, name, runner, body)
        finally:
            self.state.release(runner)

    def _embeddings(self, name: str, full: str, body: dict[str, Any]) -> web.Response:
        raw = body.get("input", "")
        texts = raw if isinstance(raw, list) else [raw]
        n = sum(gen.count_tokens(str(t)) for t in texts)
        return _json({"object": "list", "data": [
            {"object": "embedding", "embedding": gen.embed(full, str(t)), "index": i}
            for i, t in enumerate(texts)], "model": name,
            "usage": {"prompt_tokens": n, "total_tokens": n}})

    async def _generation(self, request: web.Request, kind: str, name: str, runner: Runner,
                          body: dict[str, Any]) -> web.StreamResponse:
        tokens = gen.generate(runner.name, body)
        prompt_tokens = gen.count_tokens(gen.prompt_text(body))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                 "total_tokens": prompt_tokens + len(tokens)}
        chat = kind == "chat"
        rid = gen.request_id("chatcmpl-" if chat else "cmpl-", name, body)
        created = int(self.state.clock())
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": created, "model": name, "system_fingerprint": "fp_ollama"}
        if not body.get("stream"):
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
            if chat:
                choice["message"] = {"role": "assistant", "content": "".join(tokens)}
            else:
                choice["text"] = "".join(tokens)
            return _json({**head, "choices": [choice], "usage": usage})
        head["object"] = "chat.completion.chunk" if chat else "text_completion"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for tok in tokens:
            part = {"delta": {"role": "assistant", "content": tok}} if chat else {"text": tok}
            await resp.write(gen.sse({**head, "choices": [
                {"index": 0, **part, "finish_reason": None}]}))
        end = {"delta": {"role": "assistant", "content": ""}} if chat else {"text": ""}
        await resp.write(gen.sse({**head, "choices": [{"index": 0, **end,
                                                       "finish_reason": "stop"}]}))
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            await resp.write(gen.sse({**head, "choices": [], "usage": usage}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def _body(request: web.Request) -> Any:
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return None


OllamaEmulator = Emulator[OllamaState]


async def start_ollama_emulator(catalog: list[CatalogModel] | None = None, *,
                                host: str = "127.0.0.1", port: int = 0,
                                **options: Any) -> OllamaEmulator:
    """Serve an emulated Ollama; `options` go to OllamaState (max_loaded_models, max_queue,
    vram_bytes, default_keep_alive_s, load_time_scale, clock)."""
    state = OllamaState(catalog if catalog is not None else load_catalog(), **options)
    served = await serve(create_ollama_app(state), host, port)
    return Emulator(state, served)
