"""LM Studio's HTTP surface, emulated: /v1 (OpenAI-compatible), /api/v0, /api/v1, quirks included.

See lmstudio-api.md in the design notes. Besides LM Studio's own routes it serves
`/__emulator__/*` so that tests and the demo can inspect counters and inject faults.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web

from . import answers, generation as gen
from .native import NAMESPACES, NativeApi
from .state import EmulatorState, Instance, LoadRefused

LOAD_KEYS = {"model", "context_length", "eval_batch_size", "flash_attention", "num_experts",
             "offload_kv_cache_to_gpu", "echo_load_config"}
# The load body's option types, as LM Studio's schema checks them (a wrong type is a 400).
LOAD_INTS = ("context_length", "eval_batch_size", "num_experts")
LOAD_BOOLS = ("flash_attention", "offload_kv_cache_to_gpu", "echo_load_config")
STATE_KEY = web.AppKey("emulator_state", EmulatorState)
# The SDKs' probe and websockets carry no Authorization header: the token travels in frames.
NATIVE_PATHS = {"/lmstudio-greeting", *(f"/{ns}" for ns in NAMESPACES)}
# 0.4: /api/v1 (load, unload); 0.3: /api/v0 (what is loaded); 0.2: before 0.3.6, /v1 only.
VERSIONS = ("0.4", "0.3", "0.2")


class EmulatorOptions:
    def __init__(self, *, version: str = "0.4", api_token: str | None = None,
                 tokens_per_s: float = 0.0, created_s: int | None = None,
                 zero_embedding_usage: bool = False, honour_encoding_format: bool = False
                 ) -> None:
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {', '.join(VERSIONS)}")
        self.version = version
        self.api_token = api_token
        self.tokens_per_s = tokens_per_s
        self.created_s = created_s
        # LM Studio 0.4.3 reported 0 tokens for every embedding (its tracker #1546).
        self.zero_embedding_usage = zero_embedding_usage
        # LM Studio ignores encoding_format (#756); True plays a version that fixed it.
        self.honour_encoding_format = honour_encoding_format

    @property
    def has_v1_api(self) -> bool:
        return self.version == "0.4"

    @property
    def has_v0_api(self) -> bool:
        """/api/v0 (what is loaded, no load call) came with 0.3.6; "0.2" plays one before."""
        return self.version != "0.2"


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(status: int, message: str, *, type_: str = "invalid_request_error",
           code: str | None = None, param: str | None = None, legacy: bool = False
           ) -> web.Response:
    if legacy:  # LM Studio before 0.4 answers many errors with a plain string
        return _json({"error": message}, status)
    return _json({"error": {"message": message, "type": type_, "param": param, "code": code}},
                 status)


def create_emulator_app(state: EmulatorState, options: EmulatorOptions | None = None
                        ) -> web.Application:
    opts = options or EmulatorOptions()
    app = web.Application(middlewares=[_auth_middleware(opts)], client_max_size=64 * 2**20)
    app[STATE_KEY] = state
    api = _Api(state, opts)
    r = app.router
    r.add_get("/lmstudio-greeting", api.greeting)
    r.add_get("/v1/models", api.openai_models)
    for path, kind in (("/v1/chat/completions", "chat"), ("/v1/completions", "text"),
                       ("/v1/embeddings", "embed"), ("/v1/responses", "responses")):
        r.add_post(path, api.inference_handler(kind))
    if opts.has_v1_api:
        r.add_post("/v1/messages", api.inference_handler("messages"))
    if opts.has_v0_api:
        for path, kind in (("/api/v0/chat/completions", "chat-v0"),
                           ("/api/v0/completions", "text"), ("/api/v0/embeddings", "embed")):
            r.add_post(path, api.inference_handler(kind))
        r.add_get("/api/v0/models", api.v0_models)
        r.add_get("/api/v0/models/{key:.+}", api.v0_model)
    if opts.has_v1_api:
        r.add_get("/api/v1/models", api.v1_models)
        r.add_post("/api/v1/models/load", api.v1_load)
        r.add_post("/api/v1/models/unload", api.v1_unload)
    r.add_get("/__emulator__/stats", api.stats)
    r.add_post("/__emulator__/faults", api.set_faults)
    r.add_post("/__emulator__/reset", api.reset)
    NativeApi(state, opts.api_token, opts.tokens_per_s).add_to(app)
    r.add_route("*", "/{tail:.*}", api.unexpected)
    return app


def _auth_middleware(opts: EmulatorOptions) -> Callable:
    @web.middleware
    async def auth(request: web.Request, handler: Callable[[web.Request], Awaitable]
                   ) -> web.StreamResponse:
        if opts.api_token and not request.path.startswith("/__emulator__/") and \
                request.path not in NATIVE_PATHS:
            if request.headers.get("Authorization") != f"Bearer {opts.api_token}":
                return _json({"error": {"type": "invalid_request", "code": "invalid_api_key",
                                        "message": "Invalid or missing API token."}}, 401)
        return await handler(request)
    return auth


class _Api:
    def __init__(self, state: EmulatorState, opts: EmulatorOptions) -> None:
        self.state = state
        self.opts = opts

    def created(self) -> int:
        return self.opts.created_s if self.opts.created_s is not None else int(time.time())

    # -- discovery ---------------------------------------------------------------------------
    async def greeting(self, request: web.Request) -> web.Response:
        return _json({"lmstudio": True})

    async def unexpected(self, request: web.Request) -> web.Response:
        # LM Studio's quirk: an unknown route is a 200 with an error string.
        return _json({"error": f"Unexpected endpoint or method. ({request.method} "
                               f"{request.path})"})

    async def openai_models(self, request: web.Request) -> web.Response:
        # With JIT on, LM Studio lists every downloaded model, loaded or not.
        keys = list(self.state.catalog) if self.state.jit else sorted(
            {i.instance_id for i in self.state.instances.values()})
        return _json({"object": "list", "data": [
            {"id": k, "object": "model", "owned_by": k.split("/")[0]} for k in keys]})

    def _v0_entry(self, key: str) -> dict[str, Any]:
        m = self.state.catalog[key]
        if self.state.instances_of(key):
            status = "loaded"
        elif self.state.loading[key]:
            status = "loading"
        else:
            status = "not-loaded"
        return {"id": key, "object": "model", "type": "embeddings" if m.type == "embedding"
                else "llm", "publisher": m.publisher, "arch": m.architecture,
                "compatibility_type": m.format, "quantization": m.quantization,
                "state": status, "max_context_length": m.max_context_length}

    async def v0_models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [self._v0_entry(k) for k in self.state.catalog]})

    async def v0_model(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if key not in self.state.catalog:
            return _error(404, f"Model \"{key}\" not found", code="model_not_found")
        return _json(self._v0_entry(key))

    async def v1_models(self, request: web.Request) -> web.Response:
        out = []
        for key, m in self.state.catalog.items():
            out.append({
                "type": m.type, "publisher": m.publisher, "key": key,
                "display_name": key.split("/")[-1], "architecture": m.architecture,
                "quantization": {"name": m.quantization, "bits_per_weight": m.bits_per_weight},
                "size_bytes": m.size_bytes, "params_string": m.params_string,
                "max_context_length": m.max_context_length, "format": m.format,
                "capabilities": {"vision": False, "trained_for_tool_use": m.type == "llm"},
                "loaded_instances": [{"id": i.instance_id,
                                      "config": {**i.load_config,
                                                 "context_length": i.context_length}}
                                     for i in self.state.instances_of(key)]})
        return _json({"models": out})

    # -- management (0.4.0+) -----------------------------------------------------------------
    async def v1_load(self, request: web.Request) -> web.Response:
        body = await _body(request)
        if not isinstance(body, dict):
            return _error(400, "Invalid JSON body")
        unknown = sorted(set(body) - LOAD_KEYS)
        if unknown:
            names = ", ".join(f"'{k}'" for k in unknown)
            return _error(400, f"Unrecognized key(s) in object: {names}")
        for name in LOAD_INTS:
            v = body.get(name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                return _error(400, f"Invalid '{name}': expected a positive integer")
        for name in LOAD_BOOLS:
            if body.get(name) is not None and not isinstance(body[name], bool):
                return _error(400, f"Invalid '{name}': expected a boolean")
        key = body.get("model")
        if key not in self.state.catalog:
            return _error(404, f"Model \"{key}\" not found", code="model_not_found",
                          param="model")
        started = time.monotonic()
        try:
            options = {k: v for k, v in body.items()
                       if k not in ("model", "context_length", "echo_load_config")}
            inst = await self.state.load(key, context_length=body.get("context_length"),
                                         options=options)
        except LoadRefused as exc:
            return _error(exc.status, exc.message, type_=exc.error_type)
        out = {"type": inst.model.type, "instance_id": inst.instance_id,
               "load_time_seconds": round(time.monotonic() - started, 3), "status": "loaded"}
        if body.get("echo_load_config"):
            out["load_config"] = {**inst.load_config, "context_length": inst.context_length}
        return _json(out)

    async def v1_unload(self, request: web.Request) -> web.Response:
        body = await _body(request)
        instance_id = body.get("instance_id") if isinstance(body, dict) else None
        if instance_id not in self.state.instances:
            return _error(404, f"No loaded model instance with id \"{instance_id}\"",
                          code="model_not_found", param="instance_id")
        await self.state.unload(instance_id)
        return _json({"instance_id": instance_id})

    # -- test hooks --------------------------------------------------------------------------
    async def stats(self, request: web.Request) -> web.Response:
        s = self.state
        return _json({"load_calls": dict(s.load_calls), "unload_calls": dict(s.unload_calls),
                      "inference_calls": dict(s.inference_calls),
                      "instances": sorted(s.instances), "used_bytes": s.used_bytes(),
                      "capacity_bytes": s.capacity_bytes,
                      "cancelled_streams": s.cancelled_streams,
                      "completed_streams": s.completed_streams})

    async def set_faults(self, request: web.Request) -> web.Response:
        body = await _body(request)
        f = self.state.faults
        if not isinstance(body, dict):
            return _error(400, "expected an object")
        f.load_fail = dict(body.get("load_fail", f.load_fail))
        f.inference_status = body.get("inference_status", f.inference_status)
        f.drop_stream_after_chunks = body.get("drop_stream_after_chunks",
                                              f.drop_stream_after_chunks)
        f.first_token_delay_s = float(body.get("first_token_delay_s", f.first_token_delay_s))
        f.hang_inference = bool(body.get("hang_inference", f.hang_inference))
        f.no_stream_usage = bool(body.get("no_stream_usage", f.no_stream_usage))
        return _json({"ok": True})

    async def reset(self, request: web.Request) -> web.Response:
        await self.state.unload_all()
        return _json({"ok": True})

    # -- inference ---------------------------------------------------------------------------
    def inference_handler(self, kind: str) -> Callable[[web.Request], Awaitable]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._inference(request, kind)
        return handler

    async def _inference(self, request: web.Request, kind: str) -> web.StreamResponse:
        legacy = not self.opts.has_v1_api
        body = await _body(request)
        if not isinstance(body, dict):
            return _error(400, "'messages' field is required" if kind.startswith("chat")
                          else "Invalid JSON body", legacy=legacy)
        f = self.state.faults
        if f.hang_inference:
            self.state.hung_requests += 1
            self.state.notify()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.state.abandoned_hung_requests += 1
                self.state.notify()
                raise
        if f.inference_status:
            return _error(f.inference_status, "Injected upstream failure", type_="server_error")
        name = body.get("model")
        if not isinstance(name, str):
            return _error(400, "'model' field is required", param="model", legacy=legacy)
        inst = self.state.resolve(name)
        if inst is None:
            if name not in self.state.catalog:
                return _error(400 if not legacy else 404,
                              f"Invalid model identifier \"{name}\". Please specify a valid "
                              f"downloaded model.", param="model", code="model_not_found")
            if not self.state.jit:
                return _error(400, "No models loaded. Please load a model in the developer "
                                   "page or use the `lms load` command.", legacy=legacy)
            try:
                inst = await self.state.jit_load(name)
            except LoadRefused as exc:
                return _error(exc.status, exc.message, type_=exc.error_type, legacy=legacy)
        self.state.inference_calls[inst.model.key] += 1
        self.state.notify()
        inst.last_used_at = self.state.clock()
        task = asyncio.current_task()
        assert task is not None
        inst.generations.add(task)
        try:
            if kind == "embed":
                return self._embeddings(inst, body)
            tokens = gen.generate(inst.model.key, body)
            prompt_tokens = gen.count_tokens(gen.prompt_text(body))
            if body.get("stream"):
                return await self._stream(request, kind, inst, body, tokens, prompt_tokens)
            return _json(answers.completion(kind, inst, body, tokens, prompt_tokens,
                                                self.created(), self.opts.tokens_per_s))
        finally:
            inst.generations.discard(task)
            inst.last_used_at = self.state.clock()

    def _embeddings(self, inst: Instance, body: dict[str, Any]) -> web.Response:
        raw = body.get("input", "")
        inputs = raw if isinstance(raw, list) else [raw]
        n = 0 if self.opts.zero_embedding_usage else sum(gen.count_tokens(str(t)) for t in inputs)
        as_base64 = self.opts.honour_encoding_format and body.get("encoding_format") == "base64"
        return _json({"object": "list", "model": inst.instance_id, "data": [
            {"object": "embedding", "index": i,
             "embedding": (gen.embed_base64 if as_base64 else gen.embed)(inst.model.key, str(t))}
            for i, t in enumerate(inputs)], "usage": {"prompt_tokens": n, "total_tokens": n}})

    async def _stream(self, request: web.Request, kind: str, inst: Instance,
                      body: dict[str, Any], tokens: list[str], prompt_tokens: int
                      ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        events = answers.stream_events(kind, inst, body, tokens, prompt_tokens, self.created(),
                                       not self.state.faults.no_stream_usage)
        f = self.state.faults
        delay_s = 1.0 / self.opts.tokens_per_s if self.opts.tokens_per_s > 0 else 0.0
        try:
            for i, event in enumerate(events):
                if i == 0 and f.first_token_delay_s:
                    await asyncio.sleep(f.first_token_delay_s)
                elif delay_s and i:
                    await asyncio.sleep(delay_s)
                if f.drop_stream_after_chunks is not None and i >= f.drop_stream_after_chunks:
                    assert request.transport is not None
                    request.transport.close()  # the connection dies mid-generation
                    return resp
                await resp.write(event)
                if i == 0 and f.stream_gate is not None:
                    await f.stream_gate.wait()
            if f.stream_end_gate is not None:
                await f.stream_end_gate.wait()
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            self.state.cancelled_streams += 1
            self.state.notify()
            raise
        self.state.completed_streams += 1
        self.state.notify()
        return resp

async def _body(request: web.Request) -> Any:
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return None
