"""LM Studio's own websocket protocol (the `lmstudio` SDKs and `lms`), emulated.

One websocket per namespace (`/llm`, `/embedding`, `/system`, ...). The first client frame
authenticates (`{"authVersion": 1, "clientIdentifier", "clientPasskey"}`); then the client sends
`rpcCall`, `channelCreate` and `channelSend` frames and the server answers with `rpcResult`,
`rpcError`, `channelSend`, `channelClose` and `channelError`. The model state is the REST side's
`EmulatorState`: a model loaded over either is visible on both. Message shapes are those the
SDKs validate (lmstudio 1.5, @lmstudio/sdk 1.5): a missing field is an error there.
"""
from __future__ import annotations

import asyncio
import hashlib
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from . import generation as gen
from .catalog import CatalogModel
from .state import EmulatorState, Instance, LoadRefused

NAMESPACES = ("llm", "embedding", "system", "diagnostics", "files", "repository", "plugins",
              "runtime")
MODEL_NAMESPACES = ("llm", "embedding")
NOT_FOUND_CODE = "generic.noModelMatchingQuery"


class NativeError(Exception):
    """An error as LM Studio serializes it: `{title, cause?, suggestion?, displayData?}`."""

    def __init__(self, title: str, **extra: Any) -> None:
        super().__init__(title)
        self.body = {"title": title, **extra}


def instance_reference(instance_id: str) -> str:
    """LM Studio hands out an opaque reference per instance, distinct from its identifier."""
    return "ref-" + hashlib.sha256(instance_id.encode()).hexdigest()[:16]


def model_info(m: CatalogModel) -> dict[str, Any]:
    name = m.key.split("/")[-1]
    info: dict[str, Any] = {
        "type": m.type, "modelKey": m.key,
        "format": "gguf" if m.format == "gguf" else "safetensors",
        "displayName": name, "path": f"{m.publisher}/{name}/{name}-{m.quantization}.{m.format}",
        "sizeBytes": m.size_bytes, "architecture": m.architecture,
        "maxContextLength": m.max_context_length}
    if m.params_string:
        info["paramsString"] = m.params_string
    if m.type == "llm":
        info.update(vision=False, trainedForToolUse=True)
    return info


def instance_info(i: Instance) -> dict[str, Any]:
    return {**model_info(i.model), "identifier": i.instance_id,
            "instanceReference": instance_reference(i.instance_id),
            "contextLength": i.context_length}


class NativeApi:
    def __init__(self, state: EmulatorState, api_token: str | None,
                 tokens_per_s: float) -> None:
        self.state = state
        self.api_token = api_token
        self.tokens_per_s = tokens_per_s
        self.sockets: set[web.WebSocketResponse] = set()

    def add_to(self, app: web.Application) -> None:
        for ns in NAMESPACES:
            app.router.add_get(f"/{ns}", self.handler)
        app.on_shutdown.append(self._going_away)

    async def _going_away(self, app: web.Application) -> None:
        """LM Studio quitting closes its clients' websockets (else shutdown waits for them)."""
        for ws in list(self.sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY)

    async def handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.add(ws)
        try:
            return await self._serve(request, ws)
        finally:
            self.sockets.discard(ws)

    async def _serve(self, request: web.Request, ws: web.WebSocketResponse
                     ) -> web.WebSocketResponse:
        auth = await ws.receive()
        error = self._auth_error(auth)
        if error is not None:
            await ws.send_str(orjson.dumps({"success": False, "error": {"title": error}}).decode())
            await ws.close()
            return ws
        await ws.send_str('{"success":true}')
        await _Session(self, request.path.strip("/"), ws).run()
        return ws

    def _auth_error(self, msg: Any) -> str | None:
        if msg.type is not WSMsgType.TEXT:
            return "Expected an authentication message"
        try:
            auth = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            return "Invalid authentication message"
        if not isinstance(auth, dict) or auth.get("authVersion") != 1 or not isinstance(
                auth.get("clientIdentifier"), str) or not isinstance(
                auth.get("clientPasskey"), str):
            return "Invalid authentication message"
        if self.api_token is not None:
            # LM Studio 0.4's tokens `sk-lm-<id>:<passkey>` travel split in the two fields.
            token = f"{auth['clientIdentifier']}:{auth['clientPasskey']}"
            if token != self.api_token:
                return "Invalid or missing API token."
        return None


class _Session:
    """One client connection of one namespace."""

    def __init__(self, api: NativeApi, namespace: str, ws: web.WebSocketResponse) -> None:
        self.api, self.state, self.ns, self.ws = api, api.state, namespace, ws
        self.tasks: set[asyncio.Task] = set()
        self.channels: dict[int, asyncio.Task] = {}
        self.cancelled: set[int] = set()

    async def send(self, message: dict[str, Any]) -> None:
        if not self.ws.closed:
            await self.ws.send_str(orjson.dumps(message).decode())

    async def run(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                try:
                    frame = orjson.loads(msg.data)
                except orjson.JSONDecodeError:
                    continue
                self._dispatch(frame)
        finally:
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _dispatch(self, frame: Any) -> None:
        kind = frame.get("type") if isinstance(frame, dict) else None
        if kind == "rpcCall":
            self._spawn(self._rpc(frame.get("callId"), frame.get("endpoint"),
                                  frame.get("parameter")))
        elif kind == "channelCreate":
            cid = frame.get("channelId")
            self.channels[cid] = self._spawn(self._channel(
                cid, frame.get("endpoint"), frame.get("creationParameter") or {}))
        elif kind == "channelSend":
            cid = frame.get("channelId")
            message = frame.get("message")
            task = self.channels.get(cid)
            if task is not None and isinstance(message, dict) and \
                    message.get("type") == "cancel":
                self.cancelled.add(cid)
                task.cancel()

    # -- rpc ---------------------------------------------------------------------------------
    async def _rpc(self, call_id: Any, endpoint: Any, param: Any) -> None:
        handler = RPCS.get(endpoint) if isinstance(endpoint, str) else None
        try:
            if handler is None:
                raise NativeError(f"Unknown RPC endpoint: {self.ns}.{endpoint}")
            result = await handler(self, param if isinstance(param, dict) else {})
        except NativeError as exc:
            await self.send({"type": "rpcError", "callId": call_id, "error": exc.body})
            return
        out: dict[str, Any] = {"type": "rpcResult", "callId": call_id}
        if result is not None:
            out["result"] = result
        await self.send(out)

    def _find(self, spec: Any) -> Instance | None:
        """The loaded instance a model specifier names, in this namespace."""
        name = None
        if isinstance(spec, dict):
            if spec.get("type") == "instanceReference":
                ref = spec.get("instanceReference")
                return next((i for i in self._loaded() if instance_reference(i.instance_id)
                             == ref), None)
            query = spec.get("query") if spec.get("type") == "query" else spec
            name = query.get("identifier") if isinstance(query, dict) else None
        loaded = self._loaded()
        if name is None:
            return loaded[0] if loaded else None
        found = self.state.resolve(name)
        return found if found in loaded else None

    def _loaded(self) -> list[Instance]:
        return [i for i in self.state.instances.values() if i.model.type == self.ns]

    def _not_found(self, spec: Any) -> NativeError:
        query = spec.get("query", {}) if isinstance(spec, dict) else {}
        loaded = [i.instance_id for i in self._loaded()]
        return NativeError(
            "No loaded model satisfies all requirements specified in the query.",
            displayData={"code": NOT_FOUND_CODE, "query": query if isinstance(query, dict)
                         else {}, "loadedModelsSample": loaded[:10],
                         "totalLoadedModels": len(loaded)})

    async def list_downloaded(self, param: dict) -> Any:
        return [model_info(m) for m in self.state.catalog.values()]

    async def list_loaded(self, param: dict) -> Any:
        return [instance_info(i) for i in self._loaded()]

    async def get_model_info(self, param: dict) -> Any:
        inst = self._find(param.get("specifier"))
        if inst is None:
            if param.get("throwIfNotFound"):
                raise self._not_found(param.get("specifier"))
            return None
        return instance_info(inst)

    async def unload_model(self, param: dict) -> Any:
        identifier = param.get("identifier")
        if identifier not in self.state.instances:
            raise NativeError(f"No model found that fits the query \"{identifier}\"",
                              displayData={"code": NOT_FOUND_CODE, "query": {
                                  "identifier": identifier}, "loadedModelsSample": [],
                                  "totalLoadedModels": len(self._loaded())})
        await self.state.unload(identifier)
        return None

    async def embed_string(self, param: dict) -> Any:
        inst = self._find(param.get("modelSpecifier"))
        if inst is None:
            raise self._not_found(param.get("modelSpecifier"))
        self.state.inference_calls[inst.model.key] += 1
        inst.last_used_at = self.state.clock()
        self.state.notify()
        return {"embedding": gen.embed(inst.model.key, str(param.get("inputString", "")))}

    async def processing_state(self, param: dict) -> Any:
        inst = self._find(param.get("specifier"))
        if inst is None:
            raise self._not_found(param.get("specifier"))
        return {"status": "generating" if inst.generations else "idle",
                "queued": max(0, len(inst.generations) - 1)}

    async def count_tokens(self, param: dict) -> Any:
        return {"tokenCount": gen.count_tokens(str(param.get("inputString", "")))}

    async def load_config(self, param: dict) -> Any:
        return {"fields": []}

    # -- channels ----------------------------------------------------------------------------
    async def _channel(self, cid: Any, endpoint: Any, param: Any) -> None:
        handler = CHANNELS.get(endpoint) if isinstance(endpoint, str) else None
        try:
            if handler is None:
                raise NativeError(f"Unknown channel endpoint: {self.ns}.{endpoint}")
            await handler(self, cid, param if isinstance(param, dict) else {})
        except NativeError as exc:
            await self.send({"type": "channelError", "channelId": cid, "error": exc.body})
        except LoadRefused as exc:
            await self.send({"type": "channelError", "channelId": cid,
                             "error": {"title": exc.message}})
        except asyncio.CancelledError:
            if cid not in self.cancelled:
                raise
            await self.send({"type": "channelClose", "channelId": cid})
        finally:
            self.channels.pop(cid, None)
            self.cancelled.discard(cid)

    async def _to_client(self, cid: Any, message: dict[str, Any]) -> None:
        await self.send({"type": "channelSend", "channelId": cid, "message": message})

    def _model(self, key: Any) -> CatalogModel:
        m = self.state.catalog.get(key) if isinstance(key, str) else None
        if m is None or m.type != self.ns:
            raise NativeError(f"No model found that fits the query \"{key}\"",
                              displayData={"code": NOT_FOUND_CODE, "query": {"identifier": key},
                                           "loadedModelsSample": [],
                                           "totalLoadedModels": len(self._loaded())})
        return m

    async def _load(self, m: CatalogModel, identifier: Any, ttl_ms: Any) -> Instance:
        inst = await self.state.load(m.key, instance_id=identifier if isinstance(
            identifier, str) else None)
        if isinstance(ttl_ms, int) and ttl_ms > 0:
            inst.ttl_s = ttl_ms / 1000
        return inst

    async def load_model(self, cid: Any, param: dict) -> None:
        m = self._model(param.get("modelKey"))
        await self._to_client(cid, {"type": "resolved", "info": model_info(m)})
        await self._to_client(cid, {"type": "progress", "progress": 0.0})
        inst = await self._load(m, param.get("identifier"), param.get("ttlMs"))
        await self._to_client(cid, {"type": "progress", "progress": 1.0})
        await self._to_client(cid, {"type": "success", "info": instance_info(inst)})
        await self.send({"type": "channelClose", "channelId": cid})

    async def get_or_load(self, cid: Any, param: dict) -> None:
        name = param.get("identifier")
        inst = self._find({"type": "query", "query": {"identifier": name}})
        if inst is not None:
            await self._to_client(cid, {"type": "alreadyLoaded", "info": instance_info(inst)})
        else:
            m = self._model(name)
            await self._to_client(cid, {"type": "startLoading", "identifier": m.key,
                                        "info": model_info(m)})
            inst = await self._load(m, None, param.get("loadTtlMs"))
            await self._to_client(cid, {"type": "loadProgress", "progress": 1.0})
            await self._to_client(cid, {"type": "loadSuccess", "info": instance_info(inst)})
        await self.send({"type": "channelClose", "channelId": cid})

    async def predict(self, cid: Any, param: dict) -> None:
        spec = param.get("modelSpecifier")
        inst = self._find(spec)
        if inst is None:
            raise self._not_found(spec)
        task = asyncio.current_task()
        assert task is not None
        self.state.inference_calls[inst.model.key] += 1
        inst.generations.add(task)
        self.state.notify()
        history = param.get("history")
        body = {"messages": history.get("messages", []) if isinstance(history, dict) else []}
        tokens = gen.generate(inst.model.key, body)
        delay_s = 1.0 / self.api.tokens_per_s if self.api.tokens_per_s > 0 else 0.0
        stop_reason = "eosFound"
        try:
            for i, tok in enumerate(tokens):
                if delay_s and i:
                    await asyncio.sleep(delay_s)
                await self._to_client(cid, {"type": "fragment", "fragment": {
                    "content": tok, "tokensCount": 1, "containsDrafted": False,
                    "reasoningType": "none", "isStructural": False}})
                gate = self.state.faults.stream_gate
                if i == 0 and gate is not None:
                    await gate.wait()
        except asyncio.CancelledError:
            if cid not in self.cancelled:   # the model was unloaded under it
                self.state.cancelled_streams += 1
                self.state.notify()
                await self.send({"type": "channelError", "channelId": cid, "error": {
                    "title": "The model was unloaded during the prediction",
                    "displayData": {"code": "generic.specificModelUnloaded"}}})
                return
            stop_reason = "userStopped"
        finally:
            inst.generations.discard(task)
            inst.last_used_at = self.state.clock()
        prompt_tokens = gen.count_tokens(gen.prompt_text(body))
        await self._to_client(cid, {"type": "success", "stats": {
            "stopReason": stop_reason, "tokensPerSecond": self.api.tokens_per_s or 1000.0,
            "timeToFirstTokenSec": 0.01, "promptTokensCount": prompt_tokens,
            "predictedTokensCount": len(tokens), "totalTokensCount": prompt_tokens + len(tokens)},
            "modelInfo": instance_info(inst), "loadModelConfig": {"fields": []},
            "predictionConfig": {"fields": []}})
        await self.send({"type": "channelClose", "channelId": cid})
        self.state.completed_streams += 1
        self.state.notify()


RpcHandler = Callable[[_Session, dict], Awaitable[Any]]
RPCS: dict[str, RpcHandler] = {
    "listDownloadedModels": _Session.list_downloaded, "listLoaded": _Session.list_loaded,
    "getModelInfo": _Session.get_model_info, "unloadModel": _Session.unload_model,
    "embedString": _Session.embed_string, "getInstanceProcessingState": _Session.processing_state,
    "countTokens": _Session.count_tokens, "getLoadConfig": _Session.load_config}
CHANNELS: dict[str, Callable[[_Session, Any, dict], Awaitable[None]]] = {
    "loadModel": _Session.load_model, "getOrLoad": _Session.get_or_load,
    "predict": _Session.predict}
